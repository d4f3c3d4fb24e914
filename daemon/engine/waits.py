"""Waitpoints: the journal of each run's waits, and the tokens humans complete.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from ember._errors import BadRequest, Conflict, NotFound
from ember._types import RunError, TokenInfo, WaitToken
from ember.daemon.engine.ids import ulid
from ember.daemon.model import WaitRecord
from ember.daemon.store import runs as store
from ember.daemon.store import waits as waits_store

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun
    from ember.daemon.store.db import Database
    from ember.daemon.store.runs import BlobStore

_json = msgspec.json.Encoder()
_list_decoder = msgspec.json.Decoder(list[str])
DEFAULT_TOKEN_KEY_TTL_S = 3600.0


class _ChildResult(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    id: str
    task_id: str
    output: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: RunError | None = None


@dataclass(slots=True)
class _Token:
    id: str
    env: str
    status: str
    timeout_at: float | None
    timer: asyncio.TimerHandle | None = None
    waits: set[str] = field(default_factory=set)


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
    """Registers, times and completes waits; creates and completes tokens."""

    def __init__(self, engine: WaitsEngine) -> None:
        self.engine = engine
        self.pending: dict[str, WaitRecord] = {}
        self._by_child: dict[str, set[str]] = {}
        self._tokens: dict[str, _Token] = {}

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
            return await self._token_result(record.targets[0])
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
            token = self._tokens.get(record.targets[0])
            if token is not None:
                token.waits.add(record.id)
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
        token = self._tokens.get(record.targets[0]) if record.kind == "TOKEN" else None
        if token is not None:
            token.waits.discard(record.id)

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
        for token_id, env, status, timeout_at in self.engine.db.read_now(
            waits_store.waiting_tokens
        ):
            self._arm_token(_Token(token_id, env, status, timeout_at))
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

    # -- tokens -------------------------------------------------------------------------

    async def create_token(
        self,
        env: str,
        timeout_s: float | None,
        key: str | None,
        key_ttl_s: float | None,
        tags: list[str],
        run_id: str | None,
    ) -> WaitToken:
        """Create a token (or return the one holding the idempotency key)."""
        now = self.engine.clock()
        token_id = "waitpoint_" + ulid()
        timeout_at = now + timeout_s if timeout_s is not None else None
        key_expires = now + (key_ttl_s if key_ttl_s is not None else DEFAULT_TOKEN_KEY_TTL_S)

        def write(conn: sqlite3.Connection) -> tuple[str, float | None, bool]:
            return waits_store.insert_token(
                conn,
                token_id=token_id,
                env=env,
                now=now,
                timeout_at=timeout_at,
                key=key,
                key_expires=key_expires,
                tags=tags,
                run_id=run_id,
            )

        found_id, found_timeout, cached = await self.engine.db.write(write)
        if not cached:
            self._arm_token(_Token(found_id, env, "WAITING", found_timeout))
        return WaitToken(id=found_id, is_cached=cached, timeout_at=store.opt_ts(found_timeout))

    def _arm_token(self, token: _Token) -> None:
        self._tokens[token.id] = token
        if token.timeout_at is not None:
            delay = max(0.0, token.timeout_at - self.engine.clock())
            token.timer = asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.get_running_loop().create_task(self._time_out(token))
            )

    async def _time_out(self, token: _Token) -> None:
        if token.status != "WAITING":
            return
        await self._settle_token(token, "TIMED_OUT", None)

    async def complete_token(self, env: str, token_id: str, data: bytes) -> None:
        """Complete a token with JSON data.

        Raises:
            NotFound: no such token in the environment.
            Conflict: it is already completed or timed out.
        """
        token = self._tokens.get(token_id)
        if token is None or token.env != env:
            info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
            if info is None or info.env != env:
                raise NotFound(404, f"token {token_id} does not exist in environment {env}")
            raise Conflict(409, f"token {token_id} is already {info.status}")
        await self._settle_token(token, "COMPLETED", data)

    async def _settle_token(self, token: _Token, status: str, data: bytes | None) -> None:
        token.status = status
        if token.timer is not None:
            token.timer.cancel()
        self._tokens.pop(token.id, None)
        now = self.engine.clock()
        await self.engine.db.write(
            lambda conn: waits_store.settle_token(conn, token.id, status, now, data)
        )
        result = _token_result_json(status, data)
        for wait_id in list(token.waits):
            record = self.pending.get(wait_id)
            if record is not None:
                await self.complete(record, result)

    async def _token_result(self, token_id: str) -> bytes | None:
        token = self._tokens.get(token_id)
        if token is not None:
            return None
        info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
        if info is None:
            raise BadRequest(
                400, f"token {token_id} does not exist: create it with wait.create_token"
            )
        if info.status == "WAITING":
            return None
        return _token_result_json(
            info.status, bytes(info.output) if info.status == "COMPLETED" else None
        )

    async def token_env(self, token_id: str) -> str | None:
        """The environment of a token, None when there is no such token."""
        token = self._tokens.get(token_id)
        if token is not None:
            return token.env
        info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
        return info.env if info is not None else None

    async def retrieve_token(self, env: str, token_id: str) -> TokenInfo:
        """A token with the runs waiting on it.

        Raises:
            NotFound: no such token in the environment.
        """
        info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
        if info is None or info.env != env:
            raise NotFound(404, f"token {token_id} does not exist in environment {env}")
        return msgspec.structs.replace(info, waiting_runs=self._waiting_on(token_id))

    def _waiting_on(self, token_id: str) -> list[str]:
        token = self._tokens.get(token_id)
        if token is None:
            return []
        return sorted({self.pending[w].run_id for w in token.waits if w in self.pending})

    async def list_tokens(
        self, env: str, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[TokenInfo], str | None]:
        """Tokens of an environment, newest first."""

        rows = await self.engine.db.read(
            lambda conn: waits_store.list_tokens(conn, env, status, cursor, limit + 1)
        )
        page = [
            msgspec.structs.replace(info, waiting_runs=self._waiting_on(info.id))
            for info in rows[:limit]
        ]
        return page, (page[-1].id if len(rows) > limit and page else None)


class NonDeterministic(Exception):
    """A replayed wait differs from the journal (reported to the run, which then fails)."""


def _token_result_json(status: str, data: bytes | None) -> bytes:
    if status == "COMPLETED":
        return b'{"ok":true,"output":' + (data or b"null") + b"}"
    return b'{"ok":false,"error":"the token timed out before it was completed"}'
