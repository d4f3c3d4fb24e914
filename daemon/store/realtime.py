"""What realtime subscriptions read: execution snapshots after an id, for a run, tag or batch.

Snapshot ids only rise, and snapshots are written in the same transaction as the change
they record, so "the snapshots of these runs after id N" is a durable, gap-free cursor: a
subscriber that reconnects, to this daemon or to the next one after a restart, resumes
exactly after the last change it saw.
"""

from __future__ import annotations

import sqlite3

# The runs a subscription follows, as a subquery on one of its filters (indexed each).
_RUNS = {
    "run_id": "SELECT ? AS id",
    "tag": "SELECT run_id AS id FROM run_tags WHERE env = ? AND tag = ?",
    "batch_id": "SELECT id FROM runs WHERE batch_id = ?",
}


def snapshots_after(
    conn: sqlite3.Connection, env: str, kind: str, value: str, after: int, limit: int
) -> list[tuple[int, str, str]]:
    """(snapshot id, run id, snapshot status) of the followed runs after ``after``, in order."""
    params: tuple[object, ...] = (env, value) if kind == "tag" else (value,)
    rows = conn.execute(
        f"SELECT s.id, s.run_id, s.status FROM snapshots s WHERE s.run_id IN ({_RUNS[kind]})"
        " AND s.id > ? ORDER BY s.id LIMIT ?",
        (*params, after, limit),
    ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def last_snapshot(conn: sqlite3.Connection, run_id: str) -> int:
    """The id of a run's newest snapshot (0 if it has none)."""
    row = conn.execute("SELECT MAX(id) FROM snapshots WHERE run_id = ?", (run_id,)).fetchone()
    return int(row[0] or 0)
