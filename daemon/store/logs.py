"""Run logs: the lines tasks log, written in batches and read per run."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from ember._types import LogLine
from ember.daemon.store.columns import ts

_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def insert_logs(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert log lines ``(run_id, attempt, ts, level, message, attrs)``."""
    conn.executemany(
        "INSERT INTO logs (run_id, attempt, ts, level, message, attrs) VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )


def get_logs(conn: sqlite3.Connection, run_id: str) -> list[LogLine]:
    """A run's log lines, oldest first."""
    return [
        LogLine(
            ts=ts(r[0]),
            level=r[1],
            message=r[2],
            attempt=r[3],
            attrs=_dict_decoder.decode(r[4]) if r[4] else {},
        )
        for r in conn.execute(
            "SELECT ts, level, message, attempt, attrs FROM logs WHERE run_id = ? ORDER BY id",
            (run_id,),
        )
    ]
