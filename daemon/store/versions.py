"""Versions, the current version of each environment, and queue overrides, in the table."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from ember._types import TaskInfo, VersionInfo
from ember.daemon.store.columns import ts

_json = msgspec.json.Encoder()
_tasks_decoder = msgspec.json.Decoder(list[TaskInfo])


def insert_version(conn: sqlite3.Connection, info: VersionInfo, code_dir: str) -> None:
    """Record a registered version."""
    conn.execute(
        "INSERT INTO versions (env, id, content_hash, code_dir, created_at, status, error, tasks)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            info.env,
            info.id,
            info.content_hash,
            code_dir,
            info.created_at.timestamp(),
            info.status,
            info.error,
            _json.encode(info.tasks),
        ),
    )


def set_current_version(conn: sqlite3.Connection, env: str, version: str) -> None:
    """Make a version the one new runs lock to."""
    conn.execute(
        "INSERT INTO environments (env, current_version) VALUES (?, ?)"
        " ON CONFLICT (env) DO UPDATE SET current_version = excluded.current_version",
        (env, version),
    )


def next_version_id(conn: sqlite3.Connection, env: str, day: str) -> str:
    """The next ``YYYYMMDD.N`` of an environment for the given day."""
    rows = conn.execute(
        "SELECT id FROM versions WHERE env = ? AND id LIKE ?", (env, f"{day}.%")
    ).fetchall()
    highest = max((int(r[0].split(".", 1)[1]) for r in rows), default=0)
    return f"{day}.{highest + 1}"


def _version(row: Sequence[Any], current: str | None) -> VersionInfo:
    return VersionInfo(
        id=row[0],
        env=row[1],
        content_hash=row[2],
        created_at=ts(row[3]),
        status=row[4],
        error=row[5],
        tasks=_tasks_decoder.decode(row[6]),
        is_current=row[0] == current,
    )


def load_versions(conn: sqlite3.Connection) -> list[tuple[VersionInfo, str]]:
    """Every version with its code directory, oldest first."""
    currents = dict(conn.execute("SELECT env, current_version FROM environments").fetchall())
    rows = conn.execute(
        "SELECT id, env, content_hash, created_at, status, error, tasks, code_dir FROM versions"
        " ORDER BY created_at"
    ).fetchall()
    return [(_version(r, currents.get(r[1])), r[7]) for r in rows]


def save_queue_override(
    conn: sqlite3.Connection, env: str, name: str, paused: bool, limit: int | None, has_limit: bool
) -> None:
    """Persist a queue's pause flag and concurrency override."""
    conn.execute(
        "INSERT INTO queue_overrides (env, name, paused, concurrency_limit, has_limit)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (env, name) DO UPDATE SET paused = excluded.paused,"
        " concurrency_limit = excluded.concurrency_limit, has_limit = excluded.has_limit",
        (env, name, int(paused), limit, int(has_limit)),
    )


def load_queue_overrides(conn: sqlite3.Connection) -> list[tuple[str, str, bool, int | None, bool]]:
    """Every persisted queue override: (env, name, paused, limit, has_limit)."""
    return [
        (r[0], r[1], bool(r[2]), r[3], bool(r[4]))
        for r in conn.execute(
            "SELECT env, name, paused, concurrency_limit, has_limit FROM queue_overrides"
        )
    ]
