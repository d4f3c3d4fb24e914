"""The waits journal and wait tokens, in SQL (the engine's ``Waitpoints`` decides, this stores).

Write functions run inside a group-commit transaction (see :mod:`ember.daemon.store.db`), as in
:mod:`ember.daemon.store.runs`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ember._types import TokenInfo
from ember.daemon.store.runs import opt_ts, stored_json, ts

_json = msgspec.json.Encoder()
_list_decoder = msgspec.json.Decoder(list[str])

_TOKEN_COLUMNS = (
    "id, env, status, created_at, timeout_at, completed_at, output, idempotency_key, tags, run_id"
)

# A wait as stored: id, kind, resume_at, targets (JSON), task_ids (JSON), result if completed.
StoredWait = tuple[str, str, float | None, bytes, bytes, bytes | None]


def completed_waits(
    conn: sqlite3.Connection, run_id: str, generation: int
) -> list[tuple[int, str, bytes, bytes]]:
    """(seq, kind, task_ids, result) of the generation's completed waits, in order."""
    return conn.execute(
        "SELECT seq, kind, task_ids, result FROM waits WHERE run_id = ? AND"
        " generation = ? AND status = 'COMPLETED' ORDER BY seq",
        (run_id, generation),
    ).fetchall()


def find_or_insert_wait(
    conn: sqlite3.Connection,
    run_id: str,
    generation: int,
    seq: int,
    kind: str,
    resume_at: float | None,
    targets: list[str],
    task_ids: list[str],
    now: float,
    new_id: Callable[[], str],
) -> StoredWait:
    """The journal's row for (run, generation, seq), inserted WAITING if there is none."""
    row = conn.execute(
        "SELECT id, kind, resume_at, targets, task_ids, status, result FROM waits"
        " WHERE run_id = ? AND generation = ? AND seq = ?",
        (run_id, generation, seq),
    ).fetchone()
    if row is not None:
        result = row[6] if row[5] == "COMPLETED" else None
        return row[0], row[1], row[2], row[3], row[4], result
    wait_id = new_id()
    conn.execute(
        "INSERT INTO waits (id, run_id, generation, seq, kind, status, created_at,"
        " resume_at, targets, task_ids) VALUES (?, ?, ?, ?, ?, 'WAITING', ?, ?, ?, ?)",
        (
            wait_id,
            run_id,
            generation,
            seq,
            kind,
            now,
            resume_at,
            _json.encode(targets),
            _json.encode(task_ids),
        ),
    )
    return wait_id, kind, resume_at, _json.encode(targets), _json.encode(task_ids), None


def child_rows(conn: sqlite3.Connection, child_ids: Sequence[str]) -> list[Any]:
    """(id, task_id, status, output, output_ref, error) of each of the runs."""
    marks = ",".join("?" * len(child_ids))
    return conn.execute(
        f"SELECT id, task_id, status, output, output_ref, error FROM runs WHERE id IN ({marks})",
        list(child_ids),
    ).fetchall()


def complete_wait(conn: sqlite3.Connection, wait_id: str, result: bytes, now: float) -> None:
    """Write a wait's result."""
    conn.execute(
        "UPDATE waits SET status = 'COMPLETED', result = ?, completed_at = ? WHERE id = ?",
        (result, now, wait_id),
    )


def waiting_tokens(conn: sqlite3.Connection) -> list[tuple[str, str, str, float | None]]:
    """(id, env, status, timeout_at) of every token not completed or timed out."""
    return conn.execute(
        "SELECT id, env, status, timeout_at FROM tokens WHERE status = 'WAITING'"
    ).fetchall()


def waiting_waits(conn: sqlite3.Connection) -> list[Any]:
    """(id, run_id, generation, seq, kind, resume_at, targets, task_ids) of pending waits."""
    return conn.execute(
        "SELECT id, run_id, generation, seq, kind, resume_at, targets, task_ids"
        " FROM waits WHERE status = 'WAITING'"
    ).fetchall()


def insert_token(
    conn: sqlite3.Connection,
    *,
    token_id: str,
    env: str,
    now: float,
    timeout_at: float | None,
    key: str | None,
    key_expires: float,
    tags: list[str],
    run_id: str | None,
) -> tuple[str, float | None, bool]:
    """Insert a token, or find the one holding the key: (id, timeout_at, found)."""
    if key is not None:
        row = conn.execute(
            "SELECT id, timeout_at, idempotency_expires_at FROM tokens"
            " WHERE env = ? AND idempotency_key = ?",
            (env, key),
        ).fetchone()
        if row is not None and (row[2] is None or row[2] > now):
            return row[0], row[1], True
        if row is not None:
            conn.execute("UPDATE tokens SET idempotency_key = NULL WHERE id = ?", (row[0],))
    conn.execute(
        "INSERT INTO tokens (id, env, status, created_at, timeout_at, idempotency_key,"
        " idempotency_expires_at, tags, run_id) VALUES (?, ?, 'WAITING', ?, ?, ?, ?, ?, ?)",
        (
            token_id,
            env,
            now,
            timeout_at,
            key,
            key_expires if key else None,
            _json.encode(tags),
            run_id,
        ),
    )
    return token_id, timeout_at, False


def settle_token(
    conn: sqlite3.Connection, token_id: str, status: str, now: float, data: bytes | None
) -> None:
    """Record a token's end (COMPLETED with its data, or TIMED_OUT)."""
    conn.execute(
        "UPDATE tokens SET status = ?, completed_at = ?, output = ? WHERE id = ?",
        (status, now, data, token_id),
    )


def token_row(conn: sqlite3.Connection, token_id: str) -> TokenInfo | None:
    """A token, or None."""
    row = conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
    return _token_info(row) if row else None


def list_tokens(
    conn: sqlite3.Connection, env: str, status: str | None, cursor: str | None, limit: int
) -> list[TokenInfo]:
    """Up to ``limit`` tokens of an environment, newest first, after ``cursor``."""
    where, args = ["env = ?"], [env]
    if status is not None:
        where.append("status = ?")
        args.append(status)
    if cursor is not None:
        where.append("id < ?")
        args.append(cursor)
    rows = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_token_info(r) for r in rows]


def _token_info(row: Sequence[Any]) -> TokenInfo:
    return TokenInfo(
        id=row[0],
        env=row[1],
        status=row[2],
        created_at=ts(row[3]),
        timeout_at=opt_ts(row[4]),
        completed_at=opt_ts(row[5]),
        output=stored_json(bytes(row[6]) if row[6] is not None else None),
        idempotency_key=row[7],
        tags=_list_decoder.decode(row[8]) if row[8] else [],
        run_id=row[9],
    )
