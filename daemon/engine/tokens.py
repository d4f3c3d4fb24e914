"""Tokens: waitpoints a human or another system completes (Trigger.dev's ``wait.forToken``).

A token is a row of ``tokens``: created with an optional timeout and idempotency key,
completed once with JSON data (over the API or its callback URL), or timed out. The runs
waiting on it are TOKEN waits of the journal, completed when it settles.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from ember._errors import BadRequest, Conflict, NotFound
from ember._types import TokenInfo, WaitToken
from ember.daemon.engine.ids import ulid
from ember.daemon.model import WaitRecord
from ember.daemon.store import runs as store
from ember.daemon.store import waits as waits_store

if TYPE_CHECKING:
    from ember.daemon.store.db import Database

DEFAULT_TOKEN_KEY_TTL_S = 3600.0


@dataclass(slots=True)
class _Token:
    id: str
    env: str
    status: str
    timeout_at: float | None
    timer: asyncio.TimerHandle | None = None
    waits: set[str] = field(default_factory=set)


class TokensEngine(Protocol):
    """The engine as tokens see it: its clock and database."""

    @property
    def clock(self) -> Callable[[], float]:
        """Wall-clock seconds."""
        ...

    @property
    def db(self) -> Database:
        """The state database."""
        ...


class TokenWaits(Protocol):
    """The journal's waits, as tokens complete them."""

    @property
    def pending(self) -> Mapping[str, WaitRecord]:
        """The waits not yet over, by id."""
        ...

    async def complete(self, record: WaitRecord, result: bytes) -> None:
        """Record a wait's result and hand it to its run."""
        ...


class Tokens:
    """The tokens still waiting, their timeouts, and the waits on each.

    Args:
        engine: the clock and database.
        waits: the journal whose TOKEN waits a settled token completes.
    """

    def __init__(self, engine: TokensEngine, waits: TokenWaits) -> None:
        self.engine = engine
        self._waits = waits
        self._by_id: dict[str, _Token] = {}

    def recover(self) -> None:
        """Arm the tokens that were waiting when the daemon stopped."""
        for token_id, env, status, timeout_at in self.engine.db.read_now(
            waits_store.waiting_tokens
        ):
            self._arm(_Token(token_id, env, status, timeout_at))

    def watch(self, record: WaitRecord) -> None:
        """A TOKEN wait is armed: complete it when its token settles."""
        token = self._by_id.get(record.targets[0])
        if token is not None:
            token.waits.add(record.id)

    def unwatch(self, record: WaitRecord) -> None:
        """A TOKEN wait is over or dropped."""
        token = self._by_id.get(record.targets[0])
        if token is not None:
            token.waits.discard(record.id)

    async def create(
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
            self._arm(_Token(found_id, env, "WAITING", found_timeout))
        return WaitToken(id=found_id, is_cached=cached, timeout_at=store.opt_ts(found_timeout))

    def _arm(self, token: _Token) -> None:
        self._by_id[token.id] = token
        if token.timeout_at is not None:
            delay = max(0.0, token.timeout_at - self.engine.clock())
            token.timer = asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.get_running_loop().create_task(self._time_out(token))
            )

    async def _time_out(self, token: _Token) -> None:
        if token.status != "WAITING":
            return
        await self._settle(token, "TIMED_OUT", None)

    async def complete(self, env: str, token_id: str, data: bytes) -> None:
        """Complete a token with JSON data.

        Raises:
            NotFound: no such token in the environment.
            Conflict: it is already completed or timed out.
        """
        token = self._by_id.get(token_id)
        if token is None or token.env != env:
            info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
            if info is None or info.env != env:
                raise NotFound(404, f"token {token_id} does not exist in environment {env}")
            raise Conflict(409, f"token {token_id} is already {info.status}")
        await self._settle(token, "COMPLETED", data)

    async def _settle(self, token: _Token, status: str, data: bytes | None) -> None:
        token.status = status
        if token.timer is not None:
            token.timer.cancel()
        self._by_id.pop(token.id, None)
        now = self.engine.clock()
        await self.engine.db.write(
            lambda conn: waits_store.settle_token(conn, token.id, status, now, data)
        )
        result = _token_result_json(status, data)
        for wait_id in list(token.waits):
            record = self._waits.pending.get(wait_id)
            if record is not None:
                await self._waits.complete(record, result)

    async def result(self, token_id: str) -> bytes | None:
        """A settled token's result for a wait on it; None while it waits.

        Raises:
            BadRequest: no such token.
        """
        token = self._by_id.get(token_id)
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

    async def env_of(self, token_id: str) -> str | None:
        """The environment of a token, None when there is no such token."""
        token = self._by_id.get(token_id)
        if token is not None:
            return token.env
        info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
        return info.env if info is not None else None

    async def retrieve(self, env: str, token_id: str) -> TokenInfo:
        """A token with the runs waiting on it.

        Raises:
            NotFound: no such token in the environment.
        """
        info = await self.engine.db.read(lambda conn: waits_store.token_row(conn, token_id))
        if info is None or info.env != env:
            raise NotFound(404, f"token {token_id} does not exist in environment {env}")
        return msgspec.structs.replace(info, waiting_runs=self._waiting_on(token_id))

    def _waiting_on(self, token_id: str) -> list[str]:
        token = self._by_id.get(token_id)
        if token is None:
            return []
        pending = self._waits.pending
        return sorted({pending[w].run_id for w in token.waits if w in pending})

    async def page(
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


def _token_result_json(status: str, data: bytes | None) -> bytes:
    if status == "COMPLETED":
        return b'{"ok":true,"output":' + (data or b"null") + b"}"
    return b'{"ok":false,"error":"the token timed out before it was completed"}'
