"""API keys: stored by hash, each scoped to one environment."""

from __future__ import annotations

import sqlite3


def key_env(conn: sqlite3.Connection, key_hash: str) -> str | None:
    """The environment of a live API key, or None."""
    row = conn.execute(
        "SELECT env FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
    ).fetchone()
    return row[0] if row else None


def insert_key(conn: sqlite3.Connection, key_hash: str, env: str, name: str, now: float) -> None:
    """Record a new API key (only its hash is kept)."""
    conn.execute(
        "INSERT INTO api_keys (key_hash, env, name, created_at) VALUES (?, ?, ?, ?)",
        (key_hash, env, name, now),
    )


def has_keys(conn: sqlite3.Connection) -> bool:
    """True when any live API key exists."""
    return (
        conn.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1").fetchone()
        is not None
    )
