"""SQLite access: group commit of the loop's writes, and a small pool of readers.

Writes are functions of a ``sqlite3.Connection``. They collect on the event loop during one
loop iteration and commit together in one ``BEGIN IMMEDIATE`` transaction, so a burst of
triggers costs one commit; each caller's future resolves only after that commit. If one write
raises, the batch is rolled back and its writes are replayed one per transaction, so a bad
write never takes good ones down with it.

Where the batch commits depends on durability. With ``normal`` (WAL, no fsync) a commit takes
tens of microseconds, less than handing the batch to a thread and back (two wake-ups across
threads, which cost the daemon about a quarter of its CPU per run on a 2-core VM), so the
batch runs on the loop itself, at the end of the iteration. With ``fsync`` every commit waits
for the disk, so a writer thread of our own commits while the loop goes on.

aiosqlite gives each statement its own round trip to its thread; group commit needs many
statements per transaction, which is why the writer is ours.

Checkpoints (copying the WAL back into the database file) run on a thread of their own, not in
the commit that fills the WAL as SQLite's automatic checkpoint does: that one ran on the loop
and stalled it 120-320 ms each time the WAL reached its 16 MB (``bench/retention_bench.py``).
A passive checkpoint takes no lock writers wait for, so commits go on meanwhile. But SQLite
rewinds the WAL to its start only when a write begins with every frame copied back, which
commits arriving during the thread's checkpoint never allow: under a steady load the file would
grow without end. So once the WAL is long and the thread has copied all but a few frames, the
writer copies those few itself after its next commit, and the write after that rewinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from ember.daemon.store.schema import migrate

log = logging.getLogger("ember.daemon")

T = TypeVar("T")
Durability = Literal["normal", "fsync"]

_MAX_BATCH = 2000
_STOP = object()
# How long the checkpointer lets the WAL gather commits before it copies them back.
CHECKPOINT_EVERY_S = 1.0
# A WAL this long (frames of a page) is rewound once the thread has nearly caught up with it;
# "nearly" is what the writer then copies itself, with the sync of the WAL written since the
# thread's pass (40-54 ms at 75 MB/s of writes, against 75-97 ms for SQLite's checkpoint).
REWIND_FRAMES = 4000
CATCH_UP_FRAMES = 256


def connect(path: Path, durability: Durability, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with Ember's pragmas (WAL, foreign keys, busy timeout)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL survives a killed process (the WAL is written before the reply); FULL also
        # survives power loss at the cost of an fsync per commit.
        conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'fsync' else 'NORMAL'}")
        conn.execute("PRAGMA wal_autocheckpoint = 4000")
    conn.execute("PRAGMA cache_size = -32000")
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


class Database:
    """The daemon's SQLite file.

    Args:
        path: the database file; created with its schema when missing.
        durability: ``normal`` (WAL, no fsync per commit) or ``fsync``.
        readers: threads serving read queries.
    """

    def __init__(self, path: Path, durability: Durability = "normal", readers: int = 2) -> None:
        self.path = path
        self._durability = durability
        self._writer_conn = connect(path, durability)
        migrate(self._writer_conn)
        self._writer_conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's
        self._checkpointer = _Checkpointer(path, durability)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Writes of the current loop iteration, committed together.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if durability == "fsync":
            self._thread = threading.Thread(
                target=self._write_loop, name="ember-db-writer", daemon=True
            )
            self._thread.start()
        self._local = threading.local()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="ember-db-reader")
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._closed = False
        self._point_conn: sqlite3.Connection | None = None

    # -- writes -------------------------------------------------------------------------

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue a write; the future resolves after the transaction holding it commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._pending_loop is not loop:
            self._flush()
            self._pending_loop = loop
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((fn, future))
        return future

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._thread is not None:
            self._queue.put((pending, self._pending_loop))
            return
        batch = [(fn, future, self._pending_loop) for fn, future in pending]
        for loop, settled in self._run_batch(self._writer_conn, batch).items():
            _deliver(loop, settled)

    def _write_loop(self) -> None:
        conn = self._writer_conn
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [(fn, future, item[1]) for fn, future in item[0]]
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.extend((fn, future, nxt[1]) for fn, future in nxt[0])
            for loop, settled in self._run_batch(conn, batch).items():
                _deliver(loop, settled)

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[Any]
    ) -> dict[asyncio.AbstractEventLoop, list[Any]]:
        """Commit a batch; its outcomes (future, value, error), by the loop that waits."""
        results: list[tuple[Any, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            values = [fn(conn) for fn, _, _ in batch]
            conn.execute("COMMIT")
            results = [(item, value, None) for item, value in zip(batch, values, strict=True)]
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Replay one write per transaction so that only the faulty one fails.
            for item in batch:
                fn = item[0]
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    value = fn(conn)
                    conn.execute("COMMIT")
                    results.append((item, value, None))
                except BaseException as error:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    results.append((item, None, error))
        self._checkpointer.written(conn)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, future, loop), value, exc in results:
            by_loop.setdefault(loop, []).append((future, value, exc))
        return by_loop

    # -- reads --------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self._durability, readonly=True)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only function on a reader connection off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(self._reader()))

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the writer's connection from the calling thread (startup only)."""
        return fn(self._writer_conn)

    def read_point(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a small indexed read on the event loop's own read-only connection.

        A lookup by primary key takes tens of microseconds, less than the two thread
        wake-ups a pool read costs; scans and pages go through :meth:`read`.
        """
        if self._point_conn is None:
            self._point_conn = connect(self.path, self._durability, readonly=True)
        return fn(self._point_conn)

    def close(self) -> None:
        """Finish queued writes, then close every connection."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        self._checkpointer.stop()
        self._readers.shutdown(wait=True)
        if self._point_conn is not None:
            self._point_conn.close()
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
        self._writer_conn.close()


class _Checkpointer:
    """A thread that copies committed WAL frames back into the database file (module doc).

    Woken by commits, it waits ``CHECKPOINT_EVERY_S`` so one checkpoint covers many, then runs
    passive checkpoints on its own connection until all but ``CATCH_UP_FRAMES`` are copied. A
    reader holding an old snapshot only delays the frames it needs, as with SQLite's own
    checkpoints; the last connection's close checkpoints what is left.
    """

    def __init__(self, path: Path, durability: Durability) -> None:
        self._path = path
        self._conn = connect(path, durability)
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Set by the thread, taken by the writer: copy the last frames so the WAL rewinds.
        self._rewind = False
        self._thread = threading.Thread(target=self._run, name="ember-db-checkpoint", daemon=True)
        self._thread.start()

    def written(self, conn: sqlite3.Connection) -> None:
        """A batch on the writer's ``conn`` committed (or failed: a wake-up for nothing)."""
        if self._rewind:
            self._rewind = False
            with contextlib.suppress(sqlite3.Error):  # (the thread tries again)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        if not self._wake.is_set():  # (is_set takes no lock: the common case costs nothing)
            self._wake.set()

    def _run(self) -> None:
        failing = ""  # (said once while it lasts, not at every commit's wake-up)
        while True:
            self._wake.wait()
            if self._stopping.wait(CHECKPOINT_EVERY_S):
                return
            self._wake.clear()
            try:
                self._catch_up()
                failing = ""
            except (sqlite3.Error, OSError) as exc:  # (a full disk: the WAL keeps the commits)
                if str(exc) != failing:
                    failing = str(exc)
                    log.warning("checkpointing the database's WAL failed: %s", exc)

    def _catch_up(self) -> None:
        for _ in range(8):  # (commits keep coming: each pass copies only what came since)
            _, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if self._stopping.is_set():
                return
            if frames - copied <= CATCH_UP_FRAMES:
                if frames >= REWIND_FRAMES:
                    self._sync()
                    self._rewind = True
                return

    def _sync(self) -> None:
        # A checkpoint that stops short of the WAL's end leaves the pages it copied unsynced;
        # the writer's, which reaches the end, would sync them all on the loop. Here instead.
        for name in (self._path, f"{self._path}-wal"):
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def stop(self) -> None:
        """End the thread and close its connection."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._conn.close()


def _deliver(loop: asyncio.AbstractEventLoop, settled: list[Any]) -> None:
    """Resolve the futures of ``loop``: at once on its own thread, else through the loop."""
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if loop is current:
        _settle(settled)
        return
    # A loop closed while the write ran has nobody waiting for it any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in settled:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
