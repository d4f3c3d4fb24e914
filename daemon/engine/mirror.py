"""The interface a :class:`ember.sync.SyncLink` talks to, on the daemon's database: the
outbox, the mirror and the cursor of forwarded environments (``store/sync.py``), with each
mirrored change published on the local event stream and long polls woken."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from ember._types import LogLine, Run, RunEvent, RunSummary, SyncMark
from ember.daemon.config import SyncTarget
from ember.daemon.engine.events import EventHub
from ember.daemon.store import runs as store
from ember.daemon.store import sync as sync_store
from ember.daemon.store.db import Database
from ember.daemon.store.sync import MirrorRow
from ember.sync._link import Delivered, OutboxItem


@dataclass
class _EnvState:
    profile: str
    url: str
    live: bool = False
    contact_at: float | None = None
    saved_contact_at: float | None = None
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MirrorDb:
    """The outbox, mirror and cursor of forwarded environments, on the daemon's database.

    Args:
        db: the daemon's database.
        events: the local event hub: mirrored changes are published on it, so the dashboard
            and ``runs.subscribe`` see production's runs as they change.
        clock: wall-clock seconds (the daemon's): when rows were mirrored and the remote
            last answered.
    """

    def __init__(self, db: Database, events: EventHub, clock: Callable[[], float]) -> None:
        self.db = db
        self.events = events
        self.clock = clock
        self.envs: dict[str, _EnvState] = {}

    async def add_envs(self, targets: Sequence[SyncTarget]) -> None:
        """Serve the environments forwarded to these profiles, each with its last contact."""
        for target in targets:
            _, _, at = await self.db.read(functools.partial(sync_store.cursor, env=target.env))
            self.envs[target.env] = _EnvState(
                target.profile, target.url, contact_at=at, saved_contact_at=at
            )

    def mark(self, env: str, row: MirrorRow) -> SyncMark:
        """How fresh a row is, for showing it."""
        state = self.envs[env]
        kind = "outbox" if row.remote_id is None else "mirrored"
        if row.summary.error is not None and row.summary.error.code == "SYNC_REFUSED":
            kind = "refused"
        as_of = self.clock() if state.live else state.contact_at
        return SyncMark(
            profile=state.profile,
            url=state.url,
            state=kind,  # type: ignore[arg-type]
            local_id=row.local_id,
            remote_id=row.remote_id,
            as_of=store.opt_ts(as_of),
            live=state.live,
            error=state.error,
        )

    def shown(self, env: str, row: MirrorRow) -> RunSummary:
        """A row as listed, with its mark."""
        return msgspec.structs.replace(row.summary, id=row.id, sync=self.mark(env, row))

    async def changed(self, env: str, ids: Sequence[str]) -> None:
        """Publish changed rows on the local event stream and wake long polls."""
        state = self.envs[env]
        if ids and self.events.has_subscribers(env):
            rows = await self.db.read(lambda conn: [sync_store.get(conn, env, i) for i in ids])
            for row in rows:
                if row is not None:
                    self.events.publish(env, RunEvent(run=self.shown(env, row)))
        state.changed.set()
        state.changed = asyncio.Event()

    async def wait_change(self, env: str, timeout_s: float) -> None:
        """Until a row of the environment changes, or ``timeout_s`` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.envs[env].changed.wait()

    # SyncStore ------------------------------------------------------------------------

    async def outbox(self, env: str, limit: int) -> list[OutboxItem]:
        return await self.db.read(lambda conn: sync_store.outbox(conn, env, limit))

    async def tried(self, env: str, seqs: Sequence[int]) -> None:
        await self.db.write(lambda conn: sync_store.tried(conn, seqs))

    async def delivered(self, env: str, done: Sequence[Delivered]) -> None:
        now = self.clock()
        await self.db.write(lambda conn: sync_store.delivered(conn, env, done, now))
        linked = [d.target for d in done if d.kind == "trigger"]
        await self.changed(env, linked)

    async def mirror(
        self, env: str, summaries: Sequence[RunSummary], event_id: str | None
    ) -> list[str]:
        now = self.clock()

        def write(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            result = sync_store.mirror(conn, env, summaries, now)
            if event_id is not None:
                sync_store.save_cursor(conn, env, event_id, None, now)
            return result

        changed, fetch = await self.db.write(write)
        await self.changed(env, changed)
        return fetch

    async def finished(self, env: str, run: Run, logs: Sequence[LogLine]) -> None:
        now = self.clock()
        changed = await self.db.write(lambda conn: sync_store.finished(conn, env, run, logs, now))
        await self.changed(env, changed)

    async def unfetched(self, env: str) -> list[str]:
        return await self.db.read(lambda conn: sync_store.unfetched(conn, env))

    async def cursor(self, env: str) -> tuple[str | None, float]:
        event_id, caught_up_to, _ = await self.db.read(lambda conn: sync_store.cursor(conn, env))
        return event_id, caught_up_to

    async def caught_up(self, env: str, remote_time: float, event_id: str | None) -> None:
        now = self.clock()
        await self.db.write(
            lambda conn: sync_store.save_cursor(conn, env, event_id, remote_time, now)
        )

    def contact(self, env: str, live: bool, error: str | None = None) -> None:
        state = self.envs[env]
        state.live, state.error = live, error
        if error is None:
            state.contact_at = self.clock()
        # The last contact is kept across restarts (offline, rows say how old they are),
        # written at most once a second.
        if state.contact_at is not None and (
            state.saved_contact_at is None or state.contact_at - state.saved_contact_at > 1.0
        ):
            at = state.saved_contact_at = state.contact_at
            future = self.db.write(lambda conn: sync_store.save_cursor(conn, env, None, None, at))
            future.add_done_callback(lambda f: f.exception())
        if error is not None:
            self.db.write(lambda conn: sync_store.set_error(conn, env, error)).add_done_callback(
                lambda f: f.exception()
            )
