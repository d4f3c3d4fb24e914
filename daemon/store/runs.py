"""RunStore: every SQL statement about runs, versions and keys, as plain functions.

Write functions take a ``sqlite3.Connection`` inside a transaction opened by the group-commit
writer (:mod:`ember.daemon.store.db`) and must have no effect outside the database (they may be
replayed after a rollback). Read functions build the API types of :mod:`ember._types`.
Payloads and outputs over ``OFFLOAD_BYTES`` live in content-addressed files beside the
database, so the table stays small and fast to scan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

import msgspec

from ember._types import (
    FINAL_STATUSES,
    Attempt,
    ExecutionSnapshot,
    RetryOptions,
    Run,
    RunError,
    RunStatus,
    RunSummary,
    TaskInfo,
)
from ember.daemon.model import ActiveRun, Hold, Snapshot
from ember.daemon.store import columns
from ember.daemon.store.blobs import BlobStore, inline_or_ref

# (re-exported: callers format times through the store)
from ember.daemon.store.columns import opt_ts as opt_ts
from ember.daemon.store.columns import stored_json as stored_json
from ember.daemon.store.columns import ts as ts
from ember.daemon.store.schema import NOT_FINAL

FINAL = FINAL_STATUSES

_json = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(RunError)
_retry_decoder = msgspec.json.Decoder(RetryOptions)
_tasks_decoder = msgspec.json.Decoder(list[TaskInfo])
_tags_decoder = msgspec.json.Decoder(list[str])
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


# -- writes ------------------------------------------------------------------------------


def insert_run(
    conn: sqlite3.Connection,
    blobs: BlobStore,
    run: ActiveRun,
    *,
    ttl_s: float | None,
    idempotency_expires_at: float | None,
    machine: str | None,
) -> None:
    """Insert a new run with its tags and first snapshots."""
    payload, payload_ref = inline_or_ref(blobs, run.payload)
    extras = (
        run.created_at,
        payload,
        payload_ref,
        ttl_s,
        run.idempotency_key,
        idempotency_expires_at,
        machine,
    )
    conn.execute(columns.INSERT_RUN, columns.insert_values(run, extras))
    if run.tags:
        conn.executemany(
            "INSERT OR IGNORE INTO run_tags (run_id, env, tag) VALUES (?, ?, ?)",
            [(run.id, run.env, tag) for tag in run.tags],
        )
    snapshots = [(run.id, Snapshot.RUN_CREATED, run.created_at, 0, "")]
    internal = {
        RunStatus.DELAYED: Snapshot.DELAYED,
        RunStatus.QUEUED: Snapshot.QUEUED,
        RunStatus.PENDING_VERSION: Snapshot.QUEUED,
    }[run.status]
    note = "no version has this task yet" if run.status is RunStatus.PENDING_VERSION else ""
    snapshots.append((run.id, internal, run.created_at, 0, note))
    conn.executemany(
        "INSERT INTO snapshots (run_id, status, created_at, attempt, description)"
        " VALUES (?, ?, ?, ?, ?)",
        snapshots,
    )


def set_status(
    conn: sqlite3.Connection,
    run_id: str,
    status: RunStatus,
    now: float,
    snapshot: Snapshot,
    *,
    attempt: int = 0,
    description: str = "",
    **columns: Any,
) -> None:
    """Move a run to a status, set extra columns, and record the execution snapshot."""
    assignments = "".join(f", {name} = ?" for name in columns)
    conn.execute(
        f"UPDATE runs SET status = ?, updated_at = ?{assignments} WHERE id = ?",
        (status.value, now, *columns.values(), run_id),
    )
    add_snapshot(conn, run_id, snapshot, now, attempt, description)


def add_snapshot(
    conn: sqlite3.Connection,
    run_id: str,
    snapshot: Snapshot,
    now: float,
    attempt: int,
    description: str,
) -> None:
    """Record an execution snapshot (with or without a change of status)."""
    conn.execute(
        "INSERT INTO snapshots (run_id, status, created_at, attempt, description)"
        " VALUES (?, ?, ?, ?, ?)",
        (run_id, snapshot, now, attempt, description),
    )


def set_hold(conn: sqlite3.Connection, run_id: str, hold: Hold | None) -> None:
    """Record how a waiting run is held (None: it is not)."""
    conn.execute("UPDATE runs SET hold = ? WHERE id = ?", (hold, run_id))


def set_replayed_from(conn: sqlite3.Connection, run_id: str, source_id: str) -> None:
    """Mark a run as the replay of another."""
    conn.execute("UPDATE runs SET replayed_from = ? WHERE id = ?", (source_id, run_id))


def start_attempt(conn: sqlite3.Connection, run: ActiveRun, now: float, pid: int | None) -> None:
    """Record a new attempt and the run as EXECUTING on its locked version and preset."""
    conn.execute(
        "INSERT INTO attempts (run_id, number, status, started_at, version, pid)"
        " VALUES (?, ?, 'EXECUTING', ?, ?, ?)",
        (run.id, run.attempt, now, run.version, pid),
    )
    set_status(
        conn,
        run.id,
        RunStatus.EXECUTING,
        now,
        Snapshot.EXECUTING,
        attempt=run.attempt,
        version=run.version,
        attempt_count=run.attempt,
        started_at=run.started_at,
        interruptions=run.interruptions,
        machine=run.machine,
    )


def finish_attempt(
    conn: sqlite3.Connection,
    run_id: str,
    number: int,
    status: str,
    now: float,
    error: RunError | None = None,
    cpu_s: float | None = None,
    peak_rss_bytes: int | None = None,
) -> None:
    """Close an attempt with its outcome and resource use."""
    conn.execute(
        "UPDATE attempts SET status = ?, finished_at = ?, error = ?, cpu_s = ?,"
        " peak_rss_bytes = ? WHERE run_id = ? AND number = ?",
        (
            status,
            now,
            _json.encode(error) if error is not None else None,
            cpu_s,
            peak_rss_bytes,
            run_id,
            number,
        ),
    )


def finish_run(
    conn: sqlite3.Connection,
    blobs: BlobStore,
    run_id: str,
    status: RunStatus,
    now: float,
    *,
    output: bytes | None = None,
    error: RunError | None = None,
    attempt: int = 0,
    description: str = "",
) -> None:
    """Record a run's final status, output or error; a failure frees its idempotency key."""
    inline, ref = inline_or_ref(blobs, output)
    columns: dict[str, Any] = {
        "finished_at": now,
        "output": inline,
        "output_ref": ref,
        "error": _json.encode(error) if error is not None else None,
    }
    if status is not RunStatus.COMPLETED:
        # As in Trigger.dev, a key whose run failed may be used again at once.
        columns["idempotency_slot"] = None
    set_status(
        conn,
        run_id,
        status,
        now,
        Snapshot.FINISHED,
        attempt=attempt,
        description=description or status.value,
        **columns,
    )


# -- reads -------------------------------------------------------------------------------

_SUMMARY_COLUMNS = columns.names(columns.SUMMARY)
_summary = columns.summary


def get_summary(conn: sqlite3.Connection, run_id: str) -> RunSummary | None:
    """One run as listed, or None."""
    row = conn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return _summary(row) if row else None


_RUN_COLUMNS = columns.names(columns.RUN)


def get_run(
    conn: sqlite3.Connection, blobs: BlobStore, run_id: str, history: bool = True
) -> Run | None:
    """A run, with its attempts and snapshots unless ``history`` is False, or None."""
    row = conn.execute(
        f"SELECT payload, payload_ref, output, output_ref, {_RUN_COLUMNS} FROM runs WHERE id = ?",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    payload = blobs.get(row[1]) if row[1] else row[0]
    output = blobs.get(row[3]) if row[3] else row[2]
    attempts = (
        []
        if not history
        else [
            Attempt(
                number=a[0],
                status=a[1],
                started_at=ts(a[2]),
                finished_at=opt_ts(a[3]),
                version=a[4],
                pid=a[5],
                error=_error_decoder.decode(a[6]) if a[6] else None,
                cpu_s=a[7],
                peak_rss_bytes=a[8],
            )
            for a in conn.execute(
                "SELECT number, status, started_at, finished_at, version, pid, error, cpu_s,"
                " peak_rss_bytes FROM attempts WHERE run_id = ? ORDER BY number",
                (run_id,),
            )
        ]
    )
    snapshots = (
        []
        if not history
        else [
            ExecutionSnapshot(status=s[0], created_at=ts(s[1]), attempt=s[2], description=s[3])
            for s in conn.execute(
                "SELECT status, created_at, attempt, description FROM snapshots"
                " WHERE run_id = ? ORDER BY id",
                (run_id,),
            )
        ]
    )
    return Run(
        **columns.run_fields(row[4:]),
        payload=stored_json(payload),
        output=stored_json(output),
        attempts=attempts,
        snapshots=snapshots,
    )


def get_payload(conn: sqlite3.Connection, blobs: BlobStore, run_id: str) -> bytes:
    """A run's JSON payload."""
    payload, ref = conn.execute(
        "SELECT payload, payload_ref FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    if ref:
        return blobs.get(ref)
    return bytes(payload) if payload is not None else b"null"


_ACTIVE_COLUMNS = columns.names(columns.ACTIVE)
_active_run = columns.active_run


def load_active(conn: sqlite3.Connection, delayed_until: float) -> Iterable[ActiveRun]:
    """Every run that is not final, oldest first, without payloads (loaded on dispatch).

    DELAYED runs due after ``delayed_until`` are left out: they stay in the table until
    :func:`load_delayed` brings them in.
    """
    # Two indexed reads (runs_active, runs_delayed) so the far DELAYED runs are never visited;
    # sorted here, as an ORDER BY over both would walk the whole id index instead.
    rows = conn.execute(
        f"SELECT {_ACTIVE_COLUMNS} FROM runs WHERE {NOT_FINAL} AND status != 'DELAYED'"
    ).fetchall()
    delayed = f"SELECT {_ACTIVE_COLUMNS} FROM runs WHERE status = 'DELAYED' AND delay_until"
    rows += conn.execute(f"{delayed} <= ? UNION ALL {delayed} IS NULL", (delayed_until,)).fetchall()
    rows.sort(key=lambda row: str(row[0]))
    return map(_active_run, rows)


def open_children(conn: sqlite3.Connection, parent_run_id: str) -> list[str]:
    """Ids of the runs a run triggered that are not final."""
    rows = conn.execute(
        f"SELECT id FROM runs WHERE parent_run_id = ? AND {NOT_FINAL}", (parent_run_id,)
    )
    return [str(row[0]) for row in rows]


def load_delayed(conn: sqlite3.Connection, after: float, until: float) -> list[ActiveRun]:
    """DELAYED runs due in (``after``, ``until``], soonest first."""
    rows = conn.execute(
        f"SELECT {_ACTIVE_COLUMNS} FROM runs WHERE status = 'DELAYED'"
        " AND delay_until > ? AND delay_until <= ? ORDER BY delay_until",
        (after, until),
    )
    return [_active_run(r) for r in rows]


def load_delayed_run(conn: sqlite3.Connection, run_id: str) -> ActiveRun | None:
    """One run, if it is DELAYED."""
    row = conn.execute(
        f"SELECT {_ACTIVE_COLUMNS} FROM runs WHERE id = ? AND status = 'DELAYED'", (run_id,)
    ).fetchone()
    return None if row is None else _active_run(row)


def attempt_starts(
    conn: sqlite3.Connection, since: float, env: str, queue: str
) -> list[tuple[str | None, float]]:
    """Attempts of a queue started after ``since``: (concurrency key, start), oldest first."""
    return conn.execute(
        "SELECT r.concurrency_key, a.started_at FROM attempts a JOIN runs r ON r.id = a.run_id"
        " WHERE a.started_at > ? AND r.env = ? AND r.queue = ? ORDER BY a.started_at",
        (since, env, queue),
    ).fetchall()
