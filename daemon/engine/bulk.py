"""Bulk actions: cancel or replay every run a filter matches (or a list of ids), in the daemon.

As Trigger.dev's ``runs.bulk``: the action is a record (``bulk_actions``) with its progress,
and the daemon works through it in chunks of ``CHUNK_RUNS`` runs, newest first, writing its
cursor and counts after each chunk. A daemon restart resumes a ``RUNNING`` action from its
cursor. The filter is bounded when the action starts (``created_before`` defaults to then),
so runs triggered while it works, replays included, are never taken.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from ember._errors import BadRequest, EmberError, NotFound
from ember._types import BulkAction, CreateBulkActionRequest, RunsFilter
from ember.daemon.engine.ids import ulid
from ember.daemon.store import bulk as bulk_store
from ember.daemon.store import listing as listing_store
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember._types import TriggerResponse
    from ember.daemon.store.db import Database


class BulkEngine(Protocol):
    """What bulk actions use of the engine (a Protocol: no import of the engine's module)."""

    db: Database
    # Wall-clock seconds: an action's times and its filter's bound read it.
    clock: Callable[[], float]

    @property
    def closing(self) -> bool:
        """True once the daemon has begun to stop."""
        ...

    async def cancel(self, run_id: str) -> None:
        """Cancel a run and the runs it triggered."""
        ...

    async def replay(self, env: str, run_id: str, version: str | None) -> TriggerResponse:
        """Trigger a new run like another."""
        ...


CHUNK_RUNS = 500
MAX_RUN_IDS = 10_000


def _run_filter(env: str, flt: RunsFilter) -> listing_store.RunFilter:
    return listing_store.RunFilter(
        env=env,
        statuses=tuple(s.value for s in flt.status),
        tasks=tuple(flt.task),
        tags=tuple(flt.tag),
        version=flt.version,
        batch=flt.batch,
        created_from=flt.created_after.timestamp() if flt.created_after else None,
        created_to=flt.created_before.timestamp() if flt.created_before else None,
    )


class BulkActions:
    """Creates bulk actions and works through them.

    Args:
        engine: the engine that cancels and replays the runs.
    """

    def __init__(self, engine: BulkEngine) -> None:
        self.engine = engine
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._aborted: set[str] = set()

    def recover(self) -> None:
        """Resume the actions that were running when the daemon stopped (startup)."""
        for action_id in self.engine.db.read_now(bulk_store.running_actions):
            self._start(action_id)

    async def create(self, env: str, req: CreateBulkActionRequest) -> BulkAction:
        """Record an action and start it; returns it as recorded.

        Raises:
            BadRequest: neither or both of ``filter`` and ``run_ids``, or too many ids.
        """
        if (req.filter is None) == (not req.run_ids):
            raise BadRequest(
                400,
                'give either filter (e.g. {"status": ["QUEUED"]}) or run_ids, not both '
                "and not neither",
            )
        if len(req.run_ids) > MAX_RUN_IDS:
            raise BadRequest(
                400, f"run_ids: at most {MAX_RUN_IDS:,} ids; use a filter for more runs"
            )
        now = self.engine.clock()
        flt = req.filter
        if flt is not None and flt.created_before is None:
            flt = msgspec.structs.replace(flt, created_before=store.ts(now))
        action_id = "bulk_" + ulid()

        def write(conn: sqlite3.Connection) -> BulkAction:
            if flt is not None:
                total = bulk_store.count_matching(conn, _run_filter(env, flt))
            else:
                total = len(req.run_ids)
            return bulk_store.insert_action(
                conn, action_id, env, req.action, flt, req.run_ids, total, now
            )

        action: BulkAction = await self.engine.db.write(write)
        self._start(action_id)
        return action

    def _start(self, action_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._work(action_id))
        self._workers[action_id] = task
        task.add_done_callback(lambda _: self._workers.pop(action_id, None))

    async def _work(self, action_id: str) -> None:
        db = self.engine.db
        env, kind, runs_filter, ids, cursor = db.read_point(
            lambda conn: bulk_store.action_cursor(conn, action_id)
        )
        flt = _run_filter(env, runs_filter) if runs_filter is not None else None
        while action_id not in self._aborted and not self.engine.closing:
            if flt is not None:
                chunk = await db.read(
                    functools.partial(
                        bulk_store.matching_ids, flt=flt, cursor=cursor, limit=CHUNK_RUNS
                    )
                )
                next_cursor = chunk[-1] if chunk else cursor
            else:
                start = int(cursor or 0)
                chunk = ids[start : start + CHUNK_RUNS]
                next_cursor = str(start + len(chunk))
            if not chunk:
                break
            outcomes = await asyncio.gather(
                *(self._one(env, kind, run_id, by_id=flt is None) for run_id in chunk)
            )
            ok = sum(outcomes)
            cursor = next_cursor
            await db.write(
                functools.partial(
                    bulk_store.save_progress,
                    action_id=action_id,
                    cursor=cursor,
                    done=len(chunk),
                    ok=ok,
                )
            )
        if self.engine.closing and action_id not in self._aborted:
            return  # the next start resumes it from its cursor
        status = "ABORTED" if action_id in self._aborted else "COMPLETED"
        self._aborted.discard(action_id)
        now = self.engine.clock()
        await db.write(lambda conn: bulk_store.finish_action(conn, action_id, status, now))

    async def _one(self, env: str, kind: str, run_id: str, by_id: bool) -> bool:
        """Cancel or replay one run; False when it cannot be (final, gone, elsewhere)."""
        try:
            if by_id:
                summary = self.engine.db.read_point(lambda conn: store.get_summary(conn, run_id))
                if summary is None or summary.env != env:
                    return False
            if kind == "cancel":
                await self.engine.cancel(run_id)
            else:
                await self.engine.replay(env, run_id, None)
        except EmberError:
            return False
        return True

    async def abort(self, env: str, action_id: str) -> BulkAction:
        """Stop a running action after its current chunk.

        Raises:
            NotFound: no such action in this environment.
        """
        action = await self.retrieve(env, action_id)
        task = self._workers.get(action_id)
        if action.status == "RUNNING" and task is not None:
            self._aborted.add(action_id)
            await asyncio.shield(task)
        return await self.retrieve(env, action_id)

    async def retrieve(self, env: str, action_id: str) -> BulkAction:
        """An action and its progress.

        Raises:
            NotFound: no such action in this environment.
        """

        found = await self.engine.db.read(lambda conn: bulk_store.get_action(conn, action_id, env))
        if found is None:
            raise NotFound(404, f"bulk action {action_id} does not exist in environment {env}")
        return found

    async def list(self, env: str, limit: int = 50) -> list[BulkAction]:
        """The environment's actions, newest first."""
        return await self.engine.db.read(lambda conn: bulk_store.list_actions(conn, env, limit))

    async def close(self) -> None:
        """Let running actions stop at their next chunk (they resume on the next start)."""
        for task in list(self._workers.values()):
            task.cancel()
