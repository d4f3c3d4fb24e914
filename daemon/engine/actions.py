"""Actions on runs from outside: cancel (with the runs it triggered), reschedule, read, wait.

Cancellation goes parent first, so that a parent does not resume on its children's
cancellation, then through every descendant that is not final.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

import msgspec

from ember._duration import resolve_instant
from ember._errors import BadRequest, ConfigError, Conflict, NotFound
from ember._types import Run, RunStatus
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.dispatch import QUEUE_WAITING, Dispatch
from ember.daemon.engine.dormant import DormantRuns
from ember.daemon.engine.holds import Holds
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.model import ActiveRun, Snapshot
from ember.daemon.store import idempotency as idempotency_store
from ember.daemon.store import runs as store


class Actions(EnginePart):
    """Cancel, reschedule, read and wait for runs.

    Args:
        ctx: the engine's shared state.
        lifecycle: where runs change state.
        dispatch: the queue and slots a canceled run leaves.
        dormant: brings a dormant DELAYED run in before an action on it.
        holds: a canceled waiting run's hold is dropped.
    """

    def __init__(
        self,
        ctx: EngineContext,
        lifecycle: Lifecycle,
        dispatch: Dispatch,
        dormant: DormantRuns,
        holds: Holds,
    ) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.active = lifecycle.active
        self.dispatch = dispatch
        self.dormant = dormant
        self.holds = holds

    async def cancel(self, run_id: str) -> None:
        """Cancel a run and, like Trigger.dev, every run it triggered that is not final.

        An executing attempt gets SIGTERM, then SIGKILL after the grace. The parent goes
        first, so that it does not resume on its children's cancellation; then its
        children, grandchildren and so on.

        Raises:
            NotFound: no such run.
            Conflict: the run is already final.
        """
        run = self.dormant.held(run_id)
        if run is None:
            summary = await self.db.read(lambda conn: store.get_summary(conn, run_id))
            if summary is None:
                raise NotFound(404, f"run {run_id} does not exist")
            raise Conflict(409, f"run {run_id} is already {summary.status.value}")
        if run.status.is_final:  # its end is being recorded
            raise Conflict(409, f"run {run_id} is already {run.status.value}")
        await self._cancel_run(run)
        await self._cancel_descendants(run_id)

    async def _cancel_descendants(self, root_id: str) -> None:
        parents = [root_id]
        seen = {root_id}
        while parents:
            parent_id = parents.pop()
            child_ids = self.db.read_point(
                functools.partial(store.open_children, parent_run_id=parent_id)
            )
            for child_id in child_ids:
                if child_id in seen:
                    continue
                seen.add(child_id)
                parents.append(child_id)
                child = self.dormant.held(child_id)
                if child is not None and not child.status.is_final:
                    await self._cancel_run(child)

    async def cancel_orphans(self, runs: Sequence[ActiveRun]) -> None:
        """Cancel new children whose parent was canceled while they were being triggered."""
        parent_ids = {r.parent_run_id for r in runs if r.parent_run_id is not None}
        for parent_id in parent_ids:
            parent = self.active.get(parent_id)
            if parent is not None:
                canceled = parent.status is RunStatus.CANCELED
            else:
                summary = self.db.read_point(functools.partial(store.get_summary, run_id=parent_id))
                canceled = summary is not None and summary.status is RunStatus.CANCELED
            if canceled:
                await self._cancel_descendants(parent_id)

    async def _cancel_run(self, run: ActiveRun) -> None:
        self.holds.drop_hold(run)
        if run.status in QUEUE_WAITING:
            self.dispatch.leave_waiting(run)
        elif run.status is RunStatus.WAITING:
            pass
        elif run.status is RunStatus.DEQUEUED:
            self.dispatch.release_slot(run)
        elif run.status is RunStatus.EXECUTING:
            worker = run.worker
            self.dispatch.release_slot(run)
            if worker is not None:
                worker.run = None
                worker.canceled = run  # what its on_cancel hooks log is kept
                self.ctx.supervisor.terminate(worker, self.config.cancel_grace_s)
        await self.lifecycle.finish(
            run,
            RunStatus.CANCELED,
            error=None,
            attempt_status="CANCELED" if run.status is RunStatus.EXECUTING else None,
        )

    async def reset_idempotency_key(self, env: str, task_id: str, key: str) -> list[str]:
        """Free an idempotency key of a task; returns the runs that held it.

        Raises:
            NotFound: no run of the task holds the key.
        """

        held = await self.db.write(
            lambda conn: idempotency_store.reset_idempotency_slot(conn, env, task_id, key)
        )
        if not held:
            raise NotFound(
                404,
                f"no run of task {task_id!r} in environment {env} holds idempotency key "
                f"{key!r} (it expired, its run failed, or it was reset)",
            )
        return held

    async def reschedule(self, run_id: str, delay: Any) -> None:
        """Move a DELAYED run's start.

        Raises:
            NotFound: no such run.
            Conflict: the run is not DELAYED.
            BadRequest: the delay is not a duration or date.
        """
        run = self.dormant.held(run_id)
        if run is None or run.status is not RunStatus.DELAYED:
            if run is None and not await self._exists(run_id):
                raise NotFound(404, f"run {run_id} does not exist")
            state = run.status.value if run else "final"
            raise Conflict(409, f"run {run_id} is {state}; only DELAYED runs can be rescheduled")
        now = self.clock()
        try:
            when = resolve_instant(delay, now)
        except ConfigError as exc:
            raise BadRequest(400, f"delay: {exc}") from None
        self.dispatch.leave_waiting(run)
        run.delay_until = when
        await self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.DELAYED,
                now,
                Snapshot.DELAYED,
                description="rescheduled",
                delay_until=when,
            )
        )
        self.dispatch.admit(run, now)
        self.lifecycle.publish(run)

    async def _exists(self, run_id: str) -> bool:
        return await self.db.read(lambda conn: store.get_summary(conn, run_id)) is not None

    async def get_run(self, run_id: str, history: bool = True) -> Run:
        """A run, with its attempts and execution snapshots unless ``history`` is False.

        Raises:
            NotFound: no such run.
        """
        run = self.db.read_point(lambda conn: store.get_run(conn, self.blobs, run_id, history))
        if run is None:
            raise NotFound(404, f"run {run_id} does not exist")
        active = self.active.get(run_id)
        if run.status is RunStatus.QUEUED and active is not None:
            reason = self.queue.why_queued(active)
            full = self.dispatch.busy >= self.config.max_concurrent_runs
            if reason is None and active.in_queue and full:
                reason = f"the daemon runs its maximum of {self.config.max_concurrent_runs} runs"
            if reason is not None:
                return msgspec.structs.replace(run, queued_reason=reason)
        return run

    async def wait_final(self, run_id: str, timeout_s: float, history: bool = True) -> Run:
        """Return a run once it is final, or as it is after ``timeout_s``."""
        if self.ctx.closing:
            return await self.get_run(run_id, history)
        if run_id not in self.active:
            # One read answers for a final run; only a dormant DELAYED one is brought in.
            run = await self.get_run(run_id, history)
            if run.status is not RunStatus.DELAYED or self.dormant.held(run_id) is None:
                return run
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lifecycle.waiters.setdefault(run_id, []).append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            waiters = self.lifecycle.waiters.get(run_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
        return await self.get_run(run_id, history)
