"""SQLite access: one writer thread with group commit, and a small pool of readers.

Writes are functions of a ``sqlite3.Connection``. They collect on the event loop and go to
the writer thread once per loop iteration; the thread takes every batch waiting at that
moment and runs them in one ``BEGIN IMMEDIATE`` transaction, so a burst of triggers costs one
commit and one thread wake-up, and each caller's future resolves only after that commit.
If one write raises, the batch is rolled back and its writes are replayed one per
transaction, so a bad write never takes good ones down with it.

aiosqlite gives each statement its own round trip to its thread; group commit needs many
statements per transaction, which is why the writer is a thread of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from ember.daemon._schema import migrate

T = TypeVar("T")
Durability = Literal["normal", "fsync"]

_MAX_BATCH = 2000
_STOP = object()


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
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Writes of the current loop iteration, handed to the writer thread together.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
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
        if self._pending:
            self._queue.put((self._pending, self._pending_loop))
            self._pending = []

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
            self._run_batch(conn, batch)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
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
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_, future, loop), value, exc in results:
            by_loop.setdefault(loop, []).append((future, value, exc))
        for loop, settled in by_loop.items():
            # A loop closed while the write ran has nobody waiting for it any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, settled)

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
        self._queue.put(_STOP)
        self._thread.join()
        self._readers.shutdown(wait=True)
        if self._point_conn is not None:
            self._point_conn.close()
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
        self._writer_conn.close()


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in settled:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
