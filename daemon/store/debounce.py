"""The debounced DELAYED run of a key, in SQL (the engine's ``Debouncer`` merges triggers).

A run made by a debounced trigger keeps its key (``runs.debounce_key``) and the latest time
pushes may move it to (``debounce_max_at``); the ``runs_debounce`` index finds it by key.
"""

from __future__ import annotations

import sqlite3


def delayed_run(
    conn: sqlite3.Connection, env: str, task_id: str, key: str
) -> tuple[str, float | None] | None:
    """(run id, max delay until) of the key's run while it is DELAYED; None when none is."""
    row: tuple[str, float | None] | None = conn.execute(
        "SELECT id, debounce_max_at FROM runs WHERE env = ? AND task_id = ?"
        " AND debounce_key = ? AND status = 'DELAYED'",
        (env, task_id, key),
    ).fetchone()
    return row
