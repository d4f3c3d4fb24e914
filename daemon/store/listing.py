"""The run list: filters (status, task, tag, version, dates, parent, batch) and pages."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from ember._types import RunSummary
from ember.daemon.store import columns


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Filters of the run list; every field narrows, None means any."""

    env: str
    statuses: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    version: str | None = None
    created_from: float | None = None
    created_to: float | None = None
    parent: str | None = None
    batch: str | None = None
    updated_from: float | None = None


def filter_sql(flt: RunFilter) -> tuple[str, list[str], list[Any]]:
    """The FROM source, WHERE terms and arguments of the runs a filter matches (alias r)."""
    where = ["r.env = ?"]
    args: list[Any] = [flt.env]
    if flt.statuses:
        where.append(f"r.status IN ({','.join('?' * len(flt.statuses))})")
        args.extend(flt.statuses)
    if flt.tasks:
        where.append(f"r.task_id IN ({','.join('?' * len(flt.tasks))})")
        args.extend(flt.tasks)
    for term, value in (
        ("r.version = ?", flt.version),
        ("r.parent_run_id = ?", flt.parent),
        ("r.batch_id = ?", flt.batch),
        ("r.created_at >= ?", flt.created_from),
        ("r.created_at < ?", flt.created_to),
        ("r.updated_at >= ?", flt.updated_from),
    ):
        if value is not None:
            where.append(term)
            args.append(value)
    source = "runs r"
    if flt.tags:
        # A run matches when it carries any of the tags, as in Trigger.dev.
        source = (
            "runs r JOIN (SELECT DISTINCT run_id FROM run_tags WHERE env = ? AND tag IN "
            f"({','.join('?' * len(flt.tags))})) t ON t.run_id = r.id"
        )
        args = [flt.env, *flt.tags, *args]
    return source, where, args


def list_runs(
    conn: sqlite3.Connection, flt: RunFilter, limit: int, cursor: str | None
) -> tuple[list[RunSummary], str | None]:
    """A page of runs, newest first, and the cursor of the next page (None at the end)."""
    source, where, args = filter_sql(flt)
    if cursor is not None:
        where.append("r.id < ?")
        args.append(cursor)
    selected = columns.names(columns.SUMMARY, "r")
    rows = conn.execute(
        f"SELECT {selected} FROM {source} WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    page = [columns.summary(r) for r in rows[:limit]]
    next_cursor = page[-1].id if len(rows) > limit and page else None
    return page, next_cursor
