"""Idempotency: keys held by runs, and the answers to trigger requests sent again.

A run's idempotency key makes a repeated trigger return that run while the key lives; the
client's request key makes a repeated request (a retry after a lost answer) get the first
answer back, recorded in the transaction that made its runs.
"""

from __future__ import annotations

import sqlite3

# How long a run's (or a batch's) idempotency key holds when the trigger names no TTL.
DEFAULT_IDEMPOTENCY_TTL_S = 30 * 86400.0


def find_idempotent(
    conn: sqlite3.Connection, env: str, task_id: str, key: str, now: float
) -> str | None:
    """Return the run holding an idempotency key, freeing the key if it has expired."""
    row = conn.execute(
        "SELECT id, idempotency_expires_at FROM runs"
        " WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
        (env, task_id, key),
    ).fetchone()
    if row is None:
        return None
    run_id, expires_at = row
    if expires_at is not None and expires_at <= now:
        conn.execute("UPDATE runs SET idempotency_slot = NULL WHERE id = ?", (run_id,))
        return None
    return str(run_id)


def find_trigger_request(
    conn: sqlite3.Connection, env: str, request_key: str, since: float
) -> bytes | None:
    """The answer recorded for a trigger request made after ``since``, or None."""
    row = conn.execute(
        "SELECT response FROM trigger_requests"
        " WHERE env = ? AND request_key = ? AND created_at > ?",
        (env, request_key, since),
    ).fetchone()
    return bytes(row[0]) if row else None


def save_trigger_request(
    conn: sqlite3.Connection, env: str, request_key: str, now: float, response: bytes
) -> None:
    """Record the answer to a trigger request, in the transaction that made its runs."""
    conn.execute(
        "INSERT OR REPLACE INTO trigger_requests (env, request_key, created_at, response)"
        " VALUES (?, ?, ?, ?)",
        (env, request_key, now, response),
    )


def prune_trigger_requests(conn: sqlite3.Connection, before: float) -> None:
    """Forget the answers to trigger requests made before ``before``."""
    conn.execute("DELETE FROM trigger_requests WHERE created_at <= ?", (before,))


def reset_idempotency_slot(conn: sqlite3.Connection, env: str, task_id: str, key: str) -> list[str]:
    """Free the idempotency key of a task's runs; return the ids of the runs that held it."""
    held = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM runs WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
            (env, task_id, key),
        )
    ]
    conn.execute(
        "UPDATE runs SET idempotency_slot = NULL"
        " WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
        (env, task_id, key),
    )
    return held
