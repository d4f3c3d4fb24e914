"""A deterministic store for snapshot tests, and a daemon on it in a thread of its own.

Snapshot tests run the app with ``App.run`` (its own event loop), so the daemon cannot share
the test's loop as the ``harness`` fixture does: it runs in a thread. Its runs are written
into the SQLite file with the daemon's own store functions before it starts, with fixed ids
and times, and its clock is frozen, so every screen renders the same way on every run.
Only final runs are seeded: the daemon's recovery leaves them alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from ember._types import RetryOptions, RunError, RunStatus
from ember.daemon import Daemon, DaemonConfig
from ember.daemon.store import admin as admin
from ember.daemon.store import blobs as blobs_store
from ember.daemon.store import logs as logs_store
from ember.daemon.store import runs as store
from ember.daemon.store.db import connect
from ember.daemon.store.schema import migrate

STACK = """Traceback (most recent call last):
  File "/srv/app/tasks/shop.py", line 21, in charge
    receipt = await bank.charge(order.card, order.cents)
  File "/srv/app/bank.py", line 88, in charge
    raise CardDeclined(f"card {card} declined: insufficient funds")
bank.CardDeclined: card 4242 declined: insufficient funds"""


@dataclass(frozen=True)
class SeedRun:
    """One run to write: its outcome and how long each part took."""

    n: int
    task: str
    status: RunStatus
    age_s: float
    took_s: float = 0.25
    attempts: int = 1
    tags: tuple[str, ...] = ()
    payload: bytes = b'{"order": 1042, "card": "4242", "cents": 1999}'
    output: bytes | None = None
    logs: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        """A fixed run id that sorts by ``n`` like a ULID sorts by time."""
        return f"run_01jhfk{self.n:020d}"


SEEDED = (
    SeedRun(1, "echo", RunStatus.COMPLETED, 3000, output=b'{"echo": {"n": 1}}'),
    SeedRun(2, "echo", RunStatus.COMPLETED, 2400, tags=("user_42",), output=b'{"echo": {}}'),
    SeedRun(3, "flaky", RunStatus.COMPLETED, 1800, attempts=2, output=b"2"),
    SeedRun(4, "steps", RunStatus.CANCELED, 1200, took_s=4.0),
    SeedRun(5, "echo", RunStatus.CRASHED, 900, tags=("batch-7",)),
    SeedRun(6, "steps", RunStatus.TIMED_OUT, 600, took_s=60.0),
    SeedRun(7, "echo", RunStatus.EXPIRED, 420, attempts=0),
    SeedRun(
        8,
        "charge",
        RunStatus.FAILED,
        300,
        took_s=1.25,
        tags=("user_42", "vip"),
        logs=(("info", "charging order 1042"), ("warn", "bank answered 402")),
    ),
    SeedRun(9, "echo", RunStatus.COMPLETED, 120, tags=("user_7",), output=b'{"echo": {}}'),
    SeedRun(10, "flaky", RunStatus.SYSTEM_FAILURE, 60, attempts=1),
)


# Tokens: id, status, age, timeout in (None: never), idempotency key, tags, run that made it.
TOKENS = (
    ("tok_01jhfk0000000000000000001", "COMPLETED", 3600, None, "refund-1042", ("refund",), 2),
    ("tok_01jhfk0000000000000000002", "TIMED_OUT", 1800, -600, None, (), 3),
    # A waiting token never times out here: its timer counts on the real clock, not the frozen one.
    ("tok_01jhfk0000000000000000003", "WAITING", 300, None, "approve-1042", ("review", "vip"), 8),
    ("tok_01jhfk0000000000000000004", "WAITING", 30, None, None, (), None),
)

# Imperative schedules (declarative ones follow the registered code, which declares none).
SCHEDULES = (
    ("sched_01jhfk000000000000000001", "echo", "0 9 * * *", "Europe/Paris", "customer-42", True),
    ("sched_01jhfk000000000000000002", "flaky", "*/15 * * * *", "UTC", None, True),
    ("sched_01jhfk000000000000000003", "charge", "0 0 1 * *", "America/New_York", None, False),
)


def _write_tokens_and_schedules(conn: Any, now: float) -> None:
    for token_id, status, age_s, timeout_s, key, tags, run_n in TOKENS:
        created = now - age_s
        conn.execute(
            "INSERT INTO tokens (id, env, status, created_at, timeout_at, completed_at, output,"
            " idempotency_key, tags, run_id) VALUES (?, 'dev', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                token_id,
                status,
                created,
                None if timeout_s is None else now + timeout_s,
                created + 60 if status == "COMPLETED" else None,
                b'{"ok": true}' if status == "COMPLETED" else None,
                key,
                msgspec.json.encode(list(tags)),
                None if run_n is None else f"run_01jhfk{run_n:020d}",
            ),
        )
    for schedule_id, task_id, expr, timezone, external_id, active in SCHEDULES:
        created = now - 86400
        admin.save_schedule(
            conn,
            admin.ScheduleRow(
                id=schedule_id,
                env="dev",
                task_id=task_id,
                type="IMPERATIVE",
                cron=expr,
                timezone=timezone,
                external_id=external_id,
                deduplication_key=None,
                active=active,
                created_at=created,
                updated_at=created,
                armed_at=now,  # ticks after the frozen now: none fires
                last_tick_at=now - 1800 if task_id == "flaky" else None,
            ),
        )


def seed_store(db_path: Path, now: datetime, runs: tuple[SeedRun, ...] = SEEDED) -> None:
    """Write the seeded runs (with attempts, snapshots and logs), tokens and schedules into a
    new state database."""
    conn = connect(db_path, "normal")
    migrate(conn)
    blobs = blobs_store.BlobStore(db_path.parent / "blobs")
    conn.execute("BEGIN")
    for seed in runs:
        _write(conn, blobs, seed, now.timestamp())
    _write_tokens_and_schedules(conn, now.timestamp())
    conn.execute("COMMIT")
    conn.close()


def _write(conn: Any, blobs: blobs_store.BlobStore, seed: SeedRun, now: float) -> None:
    created = now - seed.age_s
    run = store.ActiveRun(
        id=seed.id,
        env="dev",
        task_id=seed.task,
        status=RunStatus.QUEUED,
        queue="emails" if seed.task == "echo" else f"task/{seed.task}",
        created_at=created,
        max_attempts=max(seed.attempts, 1),
        retry=RetryOptions(max_attempts=max(seed.attempts, 1)),
        payload=seed.payload,
        tags=list(seed.tags),
    )
    store.insert_run(conn, blobs, run, ttl_s=None, idempotency_expires_at=None, machine=None)
    error = None
    if seed.status is not RunStatus.COMPLETED:
        stack = STACK if seed.status is RunStatus.FAILED else ""
        name = "CardDeclined" if seed.status is RunStatus.FAILED else seed.status.value.title()
        error = RunError(name=name, message=f"{seed.task} ended {seed.status.value}", stack=stack)
    start = created + 0.05
    run.version = "20250115.1"  # locked as its first attempt starts (a run never started: none)
    for number in range(1, seed.attempts + 1):
        run.attempt = number
        run.started_at = created + 0.05
        store.start_attempt(conn, run, start, pid=4000 + seed.n)
        end = start + seed.took_s / seed.attempts
        last = number == seed.attempts
        status = seed.status.value if last else "FAILED"
        store.finish_attempt(
            conn, run.id, number, status, end, error if last else None, 0.12, 42 << 20
        )
        start = end + 0.1
    finished = (start - 0.1) if seed.attempts else created + 1.0
    for index, (level, message) in enumerate(seed.logs):
        row = (run.id, 1, created + 0.1 + index * 0.2, level, message, None)
        logs_store.insert_logs(conn, [row])
    store.finish_run(
        conn,
        blobs,
        run.id,
        seed.status,
        finished,
        output=seed.output,
        error=error,
        attempt=seed.attempts,
    )


@dataclass
class ThreadedDaemon:
    """A daemon on a seeded state directory, served from a thread with its own event loop."""

    state_dir: Path
    now: datetime
    files: dict[str, str]
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def socket(self) -> Path:
        """The API socket."""
        return self.state_dir / "api.sock"

    def start(self, make_archive: Callable[[dict[str, str]], bytes]) -> None:
        """Seed, start, register the tasks as version ``20250115.1``; wait until ready."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        seed_store(self.state_dir / "ember.db", self.now)
        archive = make_archive(self.files)
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(archive),))
        self._thread.start()
        if not self.ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the snapshot daemon did not start: {self.error}")

    async def _main(self, archive: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = DaemonConfig(state_dir=self.state_dir, socket_path=self.socket)
        daemon = Daemon(config, clock=lambda: self.now.timestamp())
        try:
            await daemon.start()
            await daemon.register_version("dev", archive, promote=True)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            await daemon.stop()
            raise
        self.ready.set()
        await self._stop.wait()
        await daemon.stop()

    def stop(self) -> None:
        """Stop the daemon and join its thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


def ago(now: datetime, seconds: float) -> datetime:
    """``now`` minus some seconds."""
    return now - timedelta(seconds=seconds)
