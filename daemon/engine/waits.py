"""Waitpoints: the journal of each run's waits.

A run's ``seq``-th wait of a generation is one row of ``waits``: the daemon owns its deadline
(DATETIME), its child runs (RUN, BATCH) or its token (TOKEN), and writes the result there
when it completes. The row outlives the run's process, so a wait survives a crashed process
and a restarted daemon; a run re-executed from the top finds the results of its completed
waits in this journal (sent with ``Execute``) and does not wait or trigger children again.
A generation ends when an attempt fails by an exception: like Trigger.dev's retries, the
next attempt waits afresh (children are found again through their idempotency keys).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from ember._errors import BadRequest
from ember._types import RunError
from ember.daemon.engine.ids import ulid
from ember.daemon.engine.tokens import Tokens
from ember.daemon.model import WaitRecord
from ember.daemon.store import runs as store
from ember.daemon.store import waits as waits_store

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun
    from ember.daemon.store.blobs import BlobStore
    from ember.daemon.store.db import Database

_json = msgspec.json.Encoder()
_list_decoder = msgspec.json.Decoder(list[str])


class _ChildResult(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    id: str
    task_id: str
    output: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: RunError | None = None


class WaitsEngine(Protocol):
    """The engine as the journal sees it (the engine builds the journal: no import back)."""

    @property
    def clock(self) -> Callable[[], float]:
        """Wall-clock seconds (the daemon's clock)."""
        ...

    @property
    def active(self) -> Mapping[str, ActiveRun]:
        """The runs that are not final, by id."""
        ...

    @property
    def db(self) -> Database:
        """The state database."""
        ...

    @property
    def blobs(self) -> BlobStore:
        """Large payloads and outputs."""
        ...

    def wait_completed(self, record: WaitRecord, result: bytes) -> None:
        """A wait is over: resume its run."""
        ...


class Waitpoints:
    """Registers, times and completes waits (tokens are :attr:`tokens`)."""

    def __init__(self, engine: WaitsEngine) -> None:
        self.engine = engine
        self.pending: dict[str, WaitRecord] = {}
        self._by_child: dict[str, set[str]] = {}
        self.tokens = Tokens(engine, self)

    # -- journal ------------------------------------------------------------------------

    async def journal(self, run: ActiveRun) -> bytes:
        """The completed waits of the run's current generation, as ``Execute.journal``."""
        rows = await self.engine.db.read(
            lambda conn: waits_store.completed_waits(conn, run.id, run.generation)
        )
        parts = [
            b'{"seq":%d,"kind":%s,"task_ids":%s,"result":%s}'
            % (seq, _json.encode(kind), bytes(task_ids), bytes(result))
            for seq, kind, task_ids, result in rows
        ]
        return b"[" + b",".join(parts) + b"]"

    async def register(
        self,
        run: ActiveRun,
        seq: int,
        kind: str,
        resume_at: float | None,
        targets: list[str],
        task_ids: list[str],
    ) -> tuple[WaitRecord, bytes | None]:
        """Record a wait (or find it in the journal) and return it with its result if done.

        Raises:
            BadRequest: the wait names no target, or another run's token is unknown.
        """
        if kind not in ("DATETIME", "RUN", "BATCH", "TOKEN"):
            raise BadRequest(400, f"unknown wait kind {kind!r}")
        if kind == "DATETIME" and resume_at is None:
            raise BadRequest(400, "a DATETIME wait needs resume_at")
        if kind != "DATETIME" and not targets:
            raise BadRequest(400, f"a {kind} wait needs targets")
        now = self.engine.clock()
        engine = self.engine

        def write(conn: sqlite3.Connection) -> waits_store.StoredWait:
            return waits_store.find_or_insert_wait(
                conn,
                run.id,
                run.generation,
                seq,
                kind,
                resume_at,
                targets,
                task_ids,
                now,
                lambda: "waitpoint_" + ulid(),
            )

        (
            wait_id,
            stored_kind,
            stored_at,
            stored_targets,
            stored_tasks,
            result,
        ) = await engine.db.write(write)
        record = WaitRecord(
            id=wait_id,
            run_id=run.id,
            generation=run.generation,
            seq=seq,
            kind=stored_kind,
            # A replayed wait keeps the deadline it was first given.
            resume_at=stored_at,
            targets=_list_decoder.decode(stored_targets),
            task_ids=_list_decoder.decode(stored_tasks),
        )
        if stored_kind != kind or record.task_ids != task_ids:
            raise NonDeterministic(
                f"wait {seq} of run {run.id} was {stored_kind} {record.task_ids} when the run "
                f"first executed and is {kind} {task_ids} now: code before a wait must take "
                "the same path every time"
            )
        if result is not None:
            return record, result
        return record, await self._result_now(record)

    async def _result_now(self, record: WaitRecord) -> bytes | None:
        """The result if the wait is already over, else None (and nothing is armed)."""
        if record.kind == "DATETIME":
            assert record.resume_at is not None
            return b"null" if record.resume_at <= self.engine.clock() else None
        if record.kind == "TOKEN":
            return await self.tokens.result(record.targets[0])
        if any(child in self.engine.active for child in record.targets):
            return None
        return await self._children_result(record.targets)

    async def _children_result(self, child_ids: Sequence[str]) -> bytes | None:
        found = await self.engine.db.read(lambda conn: waits_store.child_rows(conn, child_ids))
        rows = {r[0]: r for r in found}
        results = []
        for child in child_ids:
            row = rows.get(child)
            if row is None:
                raise BadRequest(400, f"child run {child} does not exist")
            if row[2] not in {s.value for s in store.FINAL}:
                return None
            ok = row[2] == "COMPLETED"
            output = self.engine.blobs.get(row[4]) if row[4] else (row[3] or b"null")
            error = msgspec.json.decode(row[5], type=RunError) if row[5] else None
            if not ok and error is None:
                error = RunError(name="RunEnded", message=f"the child run ended {row[2]}")
            results.append(
                _ChildResult(
                    ok=ok,
                    id=child,
                    task_id=row[1],
                    output=msgspec.Raw(bytes(output)) if ok else msgspec.Raw(b"null"),
                    error=None if ok else error,
                )
            )
        return _json.encode(results)

    def arm(self, record: WaitRecord) -> None:
        """Watch a wait that is not over: a timer, a child, or a token."""
        self.pending[record.id] = record
        if record.kind == "DATETIME":
            assert record.resume_at is not None
            delay = max(0.0, record.resume_at - self.engine.clock())
            record.timer = asyncio.get_running_loop().call_later(
                delay, self._complete_soon, record, b"null"
            )
        elif record.kind == "TOKEN":
            self.tokens.watch(record)
        else:
            for child in record.targets:
                self._by_child.setdefault(child, set()).add(record.id)

    def disarm(self, record: WaitRecord) -> None:
        """Stop watching a wait (its run was canceled)."""
        record.done = True
        self.pending.pop(record.id, None)
        if record.timer is not None:
            record.timer.cancel()
        for child in record.targets:
            waits = self._by_child.get(child)
            if waits is not None:
                waits.discard(record.id)
        if record.kind == "TOKEN":
            self.tokens.unwatch(record)

    def _complete_soon(self, record: WaitRecord, result: bytes) -> None:
        asyncio.get_running_loop().create_task(self.complete(record, result))

    async def complete(self, record: WaitRecord, result: bytes) -> None:
        """Record a wait's result and hand it to its run."""
        if record.done:
            return
        self.disarm(record)
        now = self.engine.clock()
        await self.engine.db.write(
            lambda conn: waits_store.complete_wait(conn, record.id, result, now)
        )
        self.engine.wait_completed(record, result)

    def on_run_final(self, run_id: str) -> None:
        """A run ended: complete the waits of parents waiting on it (once all are final)."""
        active = self.engine.active
        for wait_id in list(self._by_child.pop(run_id, ())):
            record = self.pending.get(wait_id)
            if record is None:
                continue
            targets, i = record.targets, record.ended_upto
            while i < len(targets) and targets[i] not in active:
                i += 1
            record.ended_upto = i
            if i == len(targets):
                asyncio.get_running_loop().create_task(self._complete_children(record))

    async def _complete_children(self, record: WaitRecord) -> None:
        result = await self._children_result(record.targets)
        if result is not None:
            await self.complete(record, result)

    async def recover(self) -> list[tuple[WaitRecord, bytes | None]]:
        """Load tokens and the waits that were pending when the daemon stopped."""
        self.tokens.recover()
        rows = self.engine.db.read_now(waits_store.waiting_waits)
        found = []
        for row in rows:
            record = WaitRecord(
                id=row[0],
                run_id=row[1],
                generation=row[2],
                seq=row[3],
                kind=row[4],
                resume_at=row[5],
                targets=_list_decoder.decode(row[6]),
                task_ids=_list_decoder.decode(row[7]),
            )
            found.append((record, await self._result_now(record)))
        return found


class NonDeterministic(Exception):
    """A replayed wait differs from the journal (reported to the run, which then fails)."""
