"""Streams of runs: chunks appended in order, numbered by the daemon, read after any number."""

from __future__ import annotations

import sqlite3

CHUNK_ROWS_PER_WRITE = 2000


def append_chunks(conn: sqlite3.Connection, run_id: str, stream: str, chunks: list[bytes]) -> int:
    """Append chunks after the stream's last; returns the number of the last one written."""
    row = conn.execute(
        "SELECT MAX(seq) FROM stream_chunks WHERE run_id = ? AND stream = ?", (run_id, stream)
    ).fetchone()
    start = int(row[0] or 0)
    conn.executemany(
        "INSERT INTO stream_chunks (run_id, stream, seq, data) VALUES (?, ?, ?, ?)",
        [(run_id, stream, start + i, data) for i, data in enumerate(chunks, 1)],
    )
    return start + len(chunks)


def chunks_after(
    conn: sqlite3.Connection, run_id: str, stream: str, after: int, limit: int
) -> list[tuple[int, bytes]]:
    """(number, JSON data) of the stream's chunks after ``after``, in order."""
    rows = conn.execute(
        "SELECT seq, data FROM stream_chunks WHERE run_id = ? AND stream = ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (run_id, stream, after, limit),
    ).fetchall()
    return [(int(r[0]), bytes(r[1])) for r in rows]


def run_is_final(conn: sqlite3.Connection, run_id: str, final: tuple[str, ...]) -> bool | None:
    """Whether the run is final (None: no such run)."""
    row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    return None if row is None else row[0] in final


def delete_chunks(conn: sqlite3.Connection, ids: list[str]) -> int:
    """Delete up to ``CHUNK_ROWS_PER_WRITE`` chunks of these runs (retention)."""
    marks = ", ".join("?" for _ in ids)
    cursor = conn.execute(
        "DELETE FROM stream_chunks WHERE (run_id, stream, seq) IN (SELECT run_id, stream, seq"
        f" FROM stream_chunks WHERE run_id IN ({marks}) LIMIT ?)",
        (*ids, CHUNK_ROWS_PER_WRITE),
    )
    return cursor.rowcount
