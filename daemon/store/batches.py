"""Batch records, in SQL (the engine's ``Batches`` decides when a batch seals and completes).

Write functions run inside a group-commit transaction (see :mod:`ember.daemon.store.db`), as in
:mod:`ember.daemon.store.runs`. A batch's runs point at it (``runs.batch_id``, with their
``batch_index``), so its counts per status are read from the runs table.
"""

from __future__ import annotations

import sqlite3

from ember._types import BatchInfo
from ember.daemon.store.columns import opt_ts, ts
from ember.daemon.store.schema import NOT_FINAL

_COLUMNS = "id, env, status, run_count, received, created_at, finished_at, idempotency_key"


def insert_batch(
    conn: sqlite3.Connection,
    batch_id: str,
    env: str,
    run_count: int,
    now: float,
    *,
    received: int = 0,
    idempotency_key: str | None = None,
    idempotency_expires_at: float | None = None,
) -> None:
    """Record a new batch; sealed (``PROCESSING``) when it already holds every item."""
    sealed = received >= run_count
    conn.execute(
        "INSERT INTO batches (id, env, status, run_count, received, created_at, sealed_at,"
        " idempotency_key, idempotency_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            batch_id,
            env,
            "PROCESSING" if sealed else "PENDING",
            run_count,
            received,
            now,
            now if sealed else None,
            idempotency_key,
            idempotency_expires_at,
        ),
    )


def get_batch(conn: sqlite3.Connection, batch_id: str, is_cached: bool = False) -> BatchInfo | None:
    """A batch with its runs counted per status; None when there is no such batch."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        return None
    counts = dict(
        conn.execute(
            "SELECT status, COUNT(*) FROM runs WHERE batch_id = ? GROUP BY status", (batch_id,)
        ).fetchall()
    )
    return BatchInfo(
        id=row[0],
        env=row[1],
        status=row[2],
        run_count=row[3],
        received=row[4],
        created_at=ts(row[5]),
        finished_at=opt_ts(row[6]),
        counts=counts,
        idempotency_key=row[7],
        is_cached=is_cached,
    )


def batch_size(conn: sqlite3.Connection, batch_id: str) -> tuple[str, int, int] | None:
    """(env, run_count, items received) of a batch; None when there is no such batch."""
    row: tuple[str, int, int] | None = conn.execute(
        "SELECT env, run_count, received FROM batches WHERE id = ?", (batch_id,)
    ).fetchone()
    return row


def keyed_batch(
    conn: sqlite3.Connection, env: str, idempotency_key: str, now: float
) -> BatchInfo | None:
    """The batch an idempotency key names while the key holds (``is_cached``); a key that
    expired is taken off its old batch, free for a new one."""
    found = conn.execute(
        "SELECT id, idempotency_expires_at FROM batches WHERE env = ? AND idempotency_key = ?",
        (env, idempotency_key),
    ).fetchone()
    if found is None:
        return None
    if found[1] is None or found[1] > now:
        return get_batch(conn, found[0], is_cached=True)
    conn.execute("UPDATE batches SET idempotency_key = NULL WHERE id = ?", (found[0],))
    return None


def open_batches(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(id, status, runs not final) of every batch not COMPLETED."""
    return conn.execute(
        "SELECT b.id, b.status, (SELECT COUNT(*) FROM runs r WHERE r.batch_id = b.id"
        f" AND r.{NOT_FINAL}) FROM batches b WHERE b.status != 'COMPLETED'"
    ).fetchall()


def indexed_runs(
    conn: sqlite3.Connection, batch_id: str, start_index: int, end_index: int
) -> list[tuple[int, str, str]]:
    """(batch_index, run id, task id) of the batch's runs from ``start_index`` up to (not
    including) ``end_index``."""
    return conn.execute(
        "SELECT batch_index, id, task_id FROM runs WHERE batch_id = ?"
        " AND batch_index >= ? AND batch_index < ?",
        (batch_id, start_index, end_index),
    ).fetchall()


def set_received(
    conn: sqlite3.Connection, batch_id: str, received: int, run_count: int, now: float
) -> None:
    """Count the items received so far; the batch is sealed (``PROCESSING``) with its last."""
    sealed = received >= run_count
    conn.execute(
        "UPDATE batches SET received = ?, status = ?, sealed_at = ? WHERE id = ?",
        (received, "PROCESSING" if sealed else "PENDING", now if sealed else None, batch_id),
    )


def complete_batch(conn: sqlite3.Connection, batch_id: str, now: float) -> None:
    """Mark a batch COMPLETED at ``now``."""
    conn.execute(
        "UPDATE batches SET status = 'COMPLETED', finished_at = ? WHERE id = ?", (now, batch_id)
    )
