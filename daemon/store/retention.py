"""Prune finished runs older than ``retention`` with their logs, spans, attempts, waits, blobs.

Work comes in small pieces so the loop never stalls: the candidates are found on a reader
connection (off the loop), and each write deletes at most ``LOG_ROWS_PER_WRITE`` log rows,
``SPAN_ROWS_PER_WRITE`` spans or
``RUNS_PER_BATCH`` runs (their tags, attempts, snapshots and waits go by ``ON DELETE
CASCADE``), with a pause between writes for the loop's other work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from ember._types import FINAL_STATUSES
from ember.daemon.store.blobs import BlobStore
from ember.daemon.store.db import Database
from ember.daemon.store.streams import CHUNK_ROWS_PER_WRITE, delete_chunks
from ember.daemon.store.traces import SPAN_ROWS_PER_WRITE, delete_spans

log = logging.getLogger("ember.daemon")

RUNS_PER_BATCH = 200
LOG_ROWS_PER_WRITE = 2000
PAUSE_S = 0.02
PRUNE_EVERY_S = 60.0

FINAL = tuple(sorted(s.value for s in FINAL_STATUSES))
_FINAL_SQL = ", ".join("?" for _ in FINAL)
# Whether another run still holds a blob (by index: runs_payload_ref, runs_output_ref).
BLOB_HOLDERS = "SELECT 1 FROM runs WHERE payload_ref = ? OR output_ref = ? LIMIT 1"


@dataclass
class PruneReport:
    """What one pass deleted."""

    runs: int = 0
    log_rows: int = 0
    spans: int = 0
    blobs: int = 0


def _candidates(conn: sqlite3.Connection, cutoff: float, limit: int) -> list[str]:
    rows = conn.execute(
        f"SELECT id FROM runs WHERE status IN ({_FINAL_SQL})"
        " AND COALESCE(finished_at, updated_at) < ? LIMIT ?",
        (*FINAL, cutoff, limit),
    ).fetchall()
    return [r[0] for r in rows]


def _delete_logs(conn: sqlite3.Connection, ids: list[str]) -> int:
    marks = ", ".join("?" for _ in ids)
    cursor = conn.execute(
        f"DELETE FROM logs WHERE rowid IN (SELECT rowid FROM logs WHERE run_id IN ({marks})"
        " LIMIT ?)",
        (*ids, LOG_ROWS_PER_WRITE),
    )
    return cursor.rowcount


def _delete_runs(
    conn: sqlite3.Connection, blobs: BlobStore, ids: list[str], cutoff: float
) -> tuple[int, int]:
    """Delete the runs still prunable and the blobs only they held: (runs, blobs)."""
    marks = ", ".join("?" for _ in ids)
    # Checked again inside the write: a replay or an edit meanwhile keeps the run.
    where = (
        f"id IN ({marks}) AND status IN ({_FINAL_SQL}) AND COALESCE(finished_at, updated_at) < ?"
    )
    params = (*ids, *FINAL, cutoff)
    refs = {
        ref
        for row in conn.execute(f"SELECT payload_ref, output_ref FROM runs WHERE {where}", params)
        for ref in row
        if ref
    }
    deleted = conn.execute(f"DELETE FROM runs WHERE {where}", params).rowcount
    removed = 0
    for ref in refs:
        # Blobs are shared by content: only the last run holding one frees it. Inside the
        # write, so no trigger can take this blob between the check and the unlink.
        if conn.execute(BLOB_HOLDERS, (ref, ref)).fetchone() is None:
            path = blobs.root / ref[:2] / ref
            path.unlink(missing_ok=True)
            removed += 1
    return deleted, removed


async def _in_chunks(
    db: Database, delete: Callable[[sqlite3.Connection, list[str]], int], ids: list[str], chunk: int
) -> int:
    """Run ``delete`` (at most ``chunk`` rows a write) until nothing of ``ids`` is left."""
    total = 0
    while True:
        removed = await db.write(lambda conn: delete(conn, ids))
        total += removed
        await asyncio.sleep(PAUSE_S)
        if removed < chunk:
            return total


async def prune_once(db: Database, blobs: BlobStore, retention_s: float, now: float) -> PruneReport:
    """Delete every finished run that ended more than ``retention_s`` before ``now``."""
    cutoff = now - retention_s
    report = PruneReport()
    while True:
        ids = await db.read(lambda conn: _candidates(conn, cutoff, RUNS_PER_BATCH))
        if not ids:
            return report
        report.log_rows += await _in_chunks(db, _delete_logs, ids, LOG_ROWS_PER_WRITE)
        report.spans += await _in_chunks(db, delete_spans, ids, SPAN_ROWS_PER_WRITE)
        await _in_chunks(db, delete_chunks, ids, CHUNK_ROWS_PER_WRITE)
        delete = functools.partial(_delete_runs, blobs=blobs, ids=ids, cutoff=cutoff)
        runs, removed_blobs = await db.write(delete)
        report.runs += runs
        report.blobs += removed_blobs
        await asyncio.sleep(PAUSE_S)


async def prune_loop(
    db: Database,
    blobs: BlobStore,
    retention_s: float,
    clock: Callable[[], float],
    every_s: float = PRUNE_EVERY_S,
) -> None:
    """Prune once shortly after start, then every ``every_s``."""
    delay = 1.0
    while True:
        await asyncio.sleep(delay)
        delay = every_s
        try:
            report = await prune_once(db, blobs, retention_s, clock())
        except sqlite3.Error as exc:
            log.warning("pruning old runs failed (tried again in %.0fs): %s", delay, exc)
            continue
        if report.runs:
            log.info(
                "retention: pruned %d finished runs, %d log lines, %d blobs",
                report.runs,
                report.log_rows,
                report.blobs,
            )
