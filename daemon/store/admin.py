"""SQL of environments: variables, API keys and cron schedules, as plain functions.

Write functions run inside the group-commit writer's transaction (see :mod:`ember.daemon.store.db`)
and touch nothing but the database; read functions return plain rows or API types.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ember._admin_types import ApiKeyInfo
from ember.daemon.store.runs import opt_ts, ts

KEY_ID_CHARS = 12


# -- variables ---------------------------------------------------------------------------


def load_env_vars(conn: sqlite3.Connection) -> list[tuple[str, str, str, str, float]]:
    """Every variable: (env, source, name, value, updated_at)."""
    return [
        (r[0], r[1], r[2], r[3], r[4])
        for r in conn.execute("SELECT env, source, name, value, updated_at FROM env_vars")
    ]


def set_env_var(
    conn: sqlite3.Connection, env: str, source: str, name: str, value: str, now: float
) -> None:
    """Set one variable of an environment's layer."""
    conn.execute(
        "INSERT INTO env_vars (env, source, name, value, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (env, source, name) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at",
        (env, source, name, value, now),
    )


def delete_env_var(conn: sqlite3.Connection, env: str, source: str, name: str) -> None:
    """Remove one variable of an environment's layer."""
    conn.execute(
        "DELETE FROM env_vars WHERE env = ? AND source = ? AND name = ?", (env, source, name)
    )


def clear_env_layer(conn: sqlite3.Connection, env: str, source: str) -> None:
    """Remove every variable of an environment's layer."""
    conn.execute("DELETE FROM env_vars WHERE env = ? AND source = ?", (env, source))


# -- API keys ----------------------------------------------------------------------------


def list_keys(conn: sqlite3.Connection, env: str | None) -> list[ApiKeyInfo]:
    """API keys (of one environment, or all), newest first."""
    where, args = ("WHERE env = ?", (env,)) if env is not None else ("", ())
    return [
        ApiKeyInfo(
            id=r[0][:KEY_ID_CHARS],
            env=r[1],
            name=r[2],
            created_at=ts(r[3]),
            revoked_at=opt_ts(r[4]),
        )
        for r in conn.execute(
            f"SELECT key_hash, env, name, created_at, revoked_at FROM api_keys {where}"
            " ORDER BY created_at DESC",
            args,
        )
    ]


def revoke_key(conn: sqlite3.Connection, key_id: str, now: float) -> int:
    """Revoke the live key whose id (hash prefix) is ``key_id``; returns how many were."""
    cursor = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE substr(key_hash, 1, ?) = ?"
        " AND revoked_at IS NULL",
        (now, KEY_ID_CHARS, key_id),
    )
    return cursor.rowcount


# -- schedules ---------------------------------------------------------------------------


@dataclass(slots=True)
class ScheduleRow:
    """A schedule as stored; the scheduler keeps these in memory."""

    id: str
    env: str
    task_id: str
    type: str
    cron: str
    timezone: str
    external_id: str | None
    deduplication_key: str | None
    active: bool
    created_at: float
    updated_at: float
    armed_at: float
    last_tick_at: float | None = None


_SCHEDULE_COLUMNS = (
    "id, env, task_id, type, cron, timezone, external_id, deduplication_key, active,"
    " created_at, updated_at, armed_at, last_tick_at"
)


def _row(r: Sequence[Any]) -> ScheduleRow:
    return ScheduleRow(
        id=r[0],
        env=r[1],
        task_id=r[2],
        type=r[3],
        cron=r[4],
        timezone=r[5],
        external_id=r[6],
        deduplication_key=r[7],
        active=bool(r[8]),
        created_at=r[9],
        updated_at=r[10],
        armed_at=r[11],
        last_tick_at=r[12],
    )


def load_schedules(conn: sqlite3.Connection) -> list[ScheduleRow]:
    """Every schedule, oldest first."""
    return [
        _row(r)
        for r in conn.execute(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules ORDER BY created_at")
    ]


def save_schedule(conn: sqlite3.Connection, row: ScheduleRow) -> None:
    """Insert or replace a schedule."""
    conn.execute(
        f"INSERT OR REPLACE INTO schedules ({_SCHEDULE_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.id,
            row.env,
            row.task_id,
            row.type,
            row.cron,
            row.timezone,
            row.external_id,
            row.deduplication_key,
            int(row.active),
            row.created_at,
            row.updated_at,
            row.armed_at,
            row.last_tick_at,
        ),
    )


def delete_schedule(conn: sqlite3.Connection, schedule_id: str) -> None:
    """Remove a schedule."""
    conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))


def set_last_tick(conn: sqlite3.Connection, schedule_id: str, tick: float) -> None:
    """Record the latest tick of a schedule that fired."""
    conn.execute("UPDATE schedules SET last_tick_at = ? WHERE id = ?", (tick, schedule_id))


def run_with_key(conn: sqlite3.Connection, env: str, task_id: str, key: str) -> str | None:
    """The run triggered with an idempotency key, whether or not the key is still held."""
    row = conn.execute(
        "SELECT id FROM runs WHERE env = ? AND task_id = ? AND idempotency_key = ? LIMIT 1",
        (env, task_id, key),
    ).fetchone()
    return str(row[0]) if row else None
