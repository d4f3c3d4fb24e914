"""Bulk actions and the runs they take, in SQL (the engine's ``BulkActions`` works them).

Write functions run inside a group-commit transaction (see :mod:`ember.daemon.store.db`), as in
:mod:`ember.daemon.store.runs`. An action keeps its filter (or its list of run ids) as JSON,
and a cursor: the last run id taken (filters walk the runs newest first), or for a list the
number of ids taken.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from ember._types import BulkAction, RunsFilter
from ember.daemon.store.columns import opt_ts, ts
from ember.daemon.store.listing import RunFilter, filter_sql

_json = msgspec.json.Encoder()
_filter_decoder = msgspec.json.Decoder(RunsFilter)
_ids_decoder = msgspec.json.Decoder(list[str])
_COLUMNS = (
    "id, env, action, status, filter, run_ids, total, processed, succeeded, failed,"
    " created_at, finished_at"
)


def _action(row: Sequence[Any]) -> BulkAction:
    return BulkAction(
        id=row[0],
        env=row[1],
        action=row[2],
        status=row[3],
        filter=_filter_decoder.decode(row[4]) if row[4] else None,
        run_ids=_ids_decoder.decode(row[5]) if row[5] else [],
        total=row[6],
        processed=row[7],
        succeeded=row[8],
        failed=row[9],
        created_at=ts(row[10]),
        finished_at=opt_ts(row[11]),
    )


def count_matching(conn: sqlite3.Connection, flt: RunFilter) -> int:
    """How many runs the filter matches."""
    source, where, args = filter_sql(flt)
    (count,) = conn.execute(
        f"SELECT COUNT(*) FROM {source} WHERE {' AND '.join(where)}", args
    ).fetchone()
    return int(count)


def matching_ids(
    conn: sqlite3.Connection, flt: RunFilter, cursor: str | None, limit: int
) -> list[str]:
    """Up to ``limit`` ids of runs the filter matches, newest first, older than ``cursor``."""
    source, where, args = filter_sql(flt)
    if cursor is not None:
        where.append("r.id < ?")
        args.append(cursor)
    rows = conn.execute(
        f"SELECT r.id FROM {source} WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [r[0] for r in rows]


def insert_action(
    conn: sqlite3.Connection,
    action_id: str,
    env: str,
    action: str,
    flt: RunsFilter | None,
    run_ids: Sequence[str],
    total: int,
    now: float,
) -> BulkAction:
    """Record a RUNNING action over a filter or a list of run ids; returns it as recorded."""
    conn.execute(
        "INSERT INTO bulk_actions (id, env, action, status, filter, run_ids, total,"
        " created_at) VALUES (?, ?, ?, 'RUNNING', ?, ?, ?, ?)",
        (
            action_id,
            env,
            action,
            _json.encode(flt) if flt is not None else None,
            _json.encode(list(run_ids)) if run_ids else None,
            total,
            now,
        ),
    )
    found = get_action(conn, action_id)
    assert found is not None  # (inserted just above, in this transaction)
    return found


def get_action(
    conn: sqlite3.Connection, action_id: str, env: str | None = None
) -> BulkAction | None:
    """An action and its progress (only in ``env``, when given); None when there is none."""
    if env is None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM bulk_actions WHERE id = ?", (action_id,)
        ).fetchone()
    else:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM bulk_actions WHERE id = ? AND env = ?", (action_id, env)
        ).fetchone()
    return _action(row) if row is not None else None


def list_actions(conn: sqlite3.Connection, env: str, limit: int) -> list[BulkAction]:
    """The environment's actions, newest first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM bulk_actions WHERE env = ? ORDER BY id DESC LIMIT ?",
        (env, limit),
    ).fetchall()
    return [_action(r) for r in rows]


def running_actions(conn: sqlite3.Connection) -> list[str]:
    """The ids of the actions still RUNNING, oldest first."""
    rows = conn.execute("SELECT id FROM bulk_actions WHERE status = 'RUNNING' ORDER BY id")
    return [r[0] for r in rows.fetchall()]


def action_cursor(
    conn: sqlite3.Connection, action_id: str
) -> tuple[str, str, RunsFilter | None, list[str], str | None]:
    """What working an action needs: (env, action, filter, run ids, cursor)."""
    env, kind, flt, ids, cursor = conn.execute(
        "SELECT env, action, filter, run_ids, cursor FROM bulk_actions WHERE id = ?",
        (action_id,),
    ).fetchone()
    return (
        env,
        kind,
        _filter_decoder.decode(flt) if flt else None,
        _ids_decoder.decode(ids) if ids else [],
        cursor,
    )


def save_progress(
    conn: sqlite3.Connection, action_id: str, cursor: str | None, done: int, ok: int
) -> None:
    """After a chunk: move the cursor and count ``done`` runs taken, ``ok`` of them done."""
    conn.execute(
        "UPDATE bulk_actions SET cursor = ?, processed = processed + ?,"
        " succeeded = succeeded + ?, failed = failed + ? WHERE id = ?",
        (cursor, done, ok, done - ok, action_id),
    )


def finish_action(conn: sqlite3.Connection, action_id: str, status: str, now: float) -> None:
    """End an action: COMPLETED, or ABORTED."""
    conn.execute(
        "UPDATE bulk_actions SET status = ?, finished_at = ? WHERE id = ?",
        (status, now, action_id),
    )
