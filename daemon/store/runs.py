"""RunStore: every SQL statement about runs, versions and keys, as plain functions.

Write functions take a ``sqlite3.Connection`` inside a transaction opened by the group-commit
writer (:mod:`ember.daemon.store.db`) and must have no effect outside the database (they may be
replayed after a rollback). Read functions build the API types of :mod:`ember._types`.
Payloads and outputs over ``OFFLOAD_BYTES`` live in content-addressed files beside the
database, so the table stays small and fast to scan.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from ember._types import (
    FINAL_STATUSES,
    Attempt,
    ExecutionSnapshot,
    LogLine,
    RetryOptions,
    Run,
    RunError,
    RunStatus,
    RunSummary,
    TaskInfo,
    VersionInfo,
)
from ember.daemon.model import ActiveRun, Hold
from ember.daemon.store.schema import NOT_FINAL

OFFLOAD_BYTES = 512 * 1024
FINAL = FINAL_STATUSES

_json = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(RunError)
_retry_decoder = msgspec.json.Decoder(RetryOptions)
_tasks_decoder = msgspec.json.Decoder(list[TaskInfo])
_tags_decoder = msgspec.json.Decoder(list[str])
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


_FIRST = datetime(1970, 1, 1, tzinfo=UTC)
_LAST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def ts(epoch: float) -> datetime:
    """An epoch time as an aware UTC datetime, clamped to what a datetime can hold.

    Values are bounded where they enter, but a store written before that may hold a delay of
    ``inf`` or ``6e16``: such a row reads back as 9999-12-31T23:59:59Z ("never"), and one
    too far in the past as 1970-01-01, so the row is shown and the page around it still loads.
    """
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, ValueError, OSError, TypeError):
        return _FIRST if isinstance(epoch, (int, float)) and epoch < 0 else _LAST


def stored_json(data: bytes | None) -> msgspec.Raw:
    """Stored JSON bytes to serve as they are, or a string saying why they cannot be.

    Bodies are checked for UTF-8 where they enter, but an older daemon let invalid bytes
    into the store; served raw they would make the whole answer invalid JSON.
    """
    if data is None:
        return msgspec.Raw(b"null")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            note = f"<{len(data)} stored bytes that are not UTF-8 JSON, written by an older daemon>"
            return msgspec.Raw(_json.encode(note))
    return msgspec.Raw(data)


def opt_ts(epoch: float | None) -> datetime | None:
    """Like :func:`ts`, passing None through."""
    return None if epoch is None else ts(epoch)


class BlobStore:
    """Content-addressed files for large payloads and outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes) -> str:
        """Store bytes (idempotently) and return their reference."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / digest
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half-written blob
                raise
        return digest

    def get(self, ref: str) -> bytes:
        """Return the bytes stored under ``ref``."""
        return (self.root / ref[:2] / ref).read_bytes()


# -- writes ------------------------------------------------------------------------------


def inline_or_ref(blobs: BlobStore, data: bytes | None) -> tuple[bytes | None, str | None]:
    """A payload or output as stored: inline, or in a blob when it is large."""
    if data is not None and len(data) > OFFLOAD_BYTES:
        return None, blobs.put(data)
    return data, None


def find_idempotent(
    conn: sqlite3.Connection, env: str, task_id: str, key: str, now: float
) -> str | None:
    """Return the run holding an idempotency key, freeing the key if it has expired."""
    row = conn.execute(
        "SELECT id, idempotency_expires_at FROM runs"
        " WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
        (env, task_id, key),
    ).fetchone()
    if row is None:
        return None
    run_id, expires_at = row
    if expires_at is not None and expires_at <= now:
        conn.execute("UPDATE runs SET idempotency_slot = NULL WHERE id = ?", (run_id,))
        return None
    return str(run_id)


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
    conn.execute(
        "INSERT INTO runs (id, env, task_id, status, created_at, updated_at, payload, payload_ref,"
        " pinned_version, tags, metadata, max_attempts, retry, delay_until, expires_at, ttl_s,"
        " idempotency_key, idempotency_slot, idempotency_expires_at, queue, concurrency_key,"
        " priority, max_duration_s, machine, parent_run_id, root_run_id, batch_id, replayed_from,"
        " batch_index, debounce_key, debounce_max_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            run.id,
            run.env,
            run.task_id,
            run.status.value,
            run.created_at,
            run.created_at,
            payload,
            payload_ref,
            run.pinned_version,
            _json.encode(run.tags) if run.tags else None,
            _json.encode(run.metadata) if run.metadata is not None else None,
            run.max_attempts,
            _json.encode(run.retry),
            run.delay_until,
            run.expires_at,
            ttl_s,
            run.idempotency_key,
            run.idempotency_key,
            idempotency_expires_at,
            run.queue,
            run.concurrency_key,
            run.priority,
            run.max_duration_s,
            machine,
            run.parent_run_id,
            run.root_run_id,
            run.batch_id,
            run.replayed_from,
            run.batch_index,
            run.debounce_key,
            run.debounce_max_at,
        ),
    )
    if run.tags:
        conn.executemany(
            "INSERT OR IGNORE INTO run_tags (run_id, env, tag) VALUES (?, ?, ?)",
            [(run.id, run.env, tag) for tag in run.tags],
        )
    snapshots = [(run.id, "RUN_CREATED", run.created_at, 0, "")]
    internal = {
        RunStatus.DELAYED: "DELAYED",
        RunStatus.QUEUED: "QUEUED",
        RunStatus.PENDING_VERSION: "QUEUED",
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
    snapshot: str,
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
    snapshot: str,
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
        "EXECUTING",
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
        "FINISHED",
        attempt=attempt,
        description=description or status.value,
        **columns,
    )


def find_trigger_request(
    conn: sqlite3.Connection, env: str, request_key: str, since: float
) -> bytes | None:
    """The answer recorded for a trigger request made after ``since``, or None."""
    row = conn.execute(
        "SELECT response FROM trigger_requests"
        " WHERE env = ? AND request_key = ? AND created_at > ?",
        (env, request_key, since),
    ).fetchone()
    return bytes(row[0]) if row else None


def save_trigger_request(
    conn: sqlite3.Connection, env: str, request_key: str, now: float, response: bytes
) -> None:
    """Record the answer to a trigger request, in the transaction that made its runs."""
    conn.execute(
        "INSERT OR REPLACE INTO trigger_requests (env, request_key, created_at, response)"
        " VALUES (?, ?, ?, ?)",
        (env, request_key, now, response),
    )


def prune_trigger_requests(conn: sqlite3.Connection, before: float) -> None:
    """Forget the answers to trigger requests made before ``before``."""
    conn.execute("DELETE FROM trigger_requests WHERE created_at <= ?", (before,))


def insert_logs(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert log lines ``(run_id, attempt, ts, level, message, attrs)``."""
    conn.executemany(
        "INSERT INTO logs (run_id, attempt, ts, level, message, attrs) VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )


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


# -- reads -------------------------------------------------------------------------------

_SUMMARY_COLUMNS = (
    "id, task_id, status, env, created_at, updated_at, version, tags, attempt_count,"
    " started_at, finished_at, delay_until, idempotency_key, queue, concurrency_key, priority,"
    " parent_run_id, root_run_id, batch_id, replayed_from, error"
)


def _summary(row: Sequence[Any]) -> RunSummary:
    return RunSummary(
        id=row[0],
        task_id=row[1],
        status=RunStatus(row[2]),
        env=row[3],
        created_at=ts(row[4]),
        updated_at=ts(row[5]),
        version=row[6],
        tags=_tags_decoder.decode(row[7]) if row[7] else [],
        attempt_count=row[8],
        started_at=opt_ts(row[9]),
        finished_at=opt_ts(row[10]),
        delay_until=opt_ts(row[11]),
        idempotency_key=row[12],
        queue=row[13],
        concurrency_key=row[14],
        priority=row[15],
        parent_run_id=row[16],
        root_run_id=row[17],
        batch_id=row[18],
        replayed_from=row[19],
        error=_error_decoder.decode(row[20]) if row[20] else None,
    )


def get_summary(conn: sqlite3.Connection, run_id: str) -> RunSummary | None:
    """One run as listed, or None."""
    row = conn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    return _summary(row) if row else None


def get_summaries(conn: sqlite3.Connection, run_ids: Sequence[str]) -> list[RunSummary]:
    """Several runs as listed, in no particular order."""
    out: list[RunSummary] = []
    for start in range(0, len(run_ids), 500):
        chunk = run_ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE id IN ({marks})", chunk
        ).fetchall()
        out.extend(_summary(r) for r in rows)
    return out


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
    columns = ", ".join(f"r.{c.strip()}" for c in _SUMMARY_COLUMNS.split(","))
    rows = conn.execute(
        f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    page = [_summary(r) for r in rows[:limit]]
    next_cursor = page[-1].id if len(rows) > limit and page else None
    return page, next_cursor


def get_run(
    conn: sqlite3.Connection, blobs: BlobStore, run_id: str, history: bool = True
) -> Run | None:
    """A run, with its attempts and snapshots unless ``history`` is False, or None."""
    row = conn.execute(
        "SELECT id, task_id, status, env, created_at, updated_at, payload, payload_ref, output,"
        " output_ref, error, version, pinned_version, tags, metadata, attempt_count, max_attempts,"
        " started_at, finished_at, delay_until, expires_at, idempotency_key, queue,"
        " concurrency_key, priority, max_duration_s, parent_run_id, root_run_id, batch_id,"
        " replayed_from, machine FROM runs WHERE id = ?",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    payload = blobs.get(row[7]) if row[7] else row[6]
    output = blobs.get(row[9]) if row[9] else row[8]
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
        id=row[0],
        task_id=row[1],
        status=RunStatus(row[2]),
        env=row[3],
        created_at=ts(row[4]),
        updated_at=ts(row[5]),
        payload=stored_json(payload),
        output=stored_json(output),
        error=_error_decoder.decode(row[10]) if row[10] else None,
        version=row[11],
        pinned_version=row[12],
        tags=_tags_decoder.decode(row[13]) if row[13] else [],
        metadata=_dict_decoder.decode(row[14]) if row[14] else None,
        attempt_count=row[15],
        max_attempts=row[16],
        started_at=opt_ts(row[17]),
        finished_at=opt_ts(row[18]),
        delay_until=opt_ts(row[19]),
        expires_at=opt_ts(row[20]),
        idempotency_key=row[21],
        queue=row[22],
        concurrency_key=row[23],
        priority=row[24],
        max_duration_s=row[25],
        parent_run_id=row[26],
        root_run_id=row[27],
        batch_id=row[28],
        replayed_from=row[29],
        machine=row[30],
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


_ACTIVE_COLUMNS = (
    "id, env, task_id, status, queue, created_at, max_attempts, retry, concurrency_key, priority,"
    " tags, metadata, max_duration_s, delay_until, ready_at, expires_at, version, pinned_version,"
    " attempt_count, interruptions, parent_run_id, root_run_id, batch_id, replayed_from,"
    " started_at, idempotency_key, generation, hold, executing_s, machine"
)


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


def _active_run(r: Sequence[Any]) -> ActiveRun:
    return ActiveRun(
        id=r[0],
        env=r[1],
        task_id=r[2],
        status=RunStatus(r[3]),
        queue=r[4],
        created_at=r[5],
        max_attempts=r[6],
        retry=_retry_decoder.decode(r[7]) if r[7] else RetryOptions(),
        concurrency_key=r[8],
        priority=r[9],
        tags=_tags_decoder.decode(r[10]) if r[10] else [],
        metadata=_dict_decoder.decode(r[11]) if r[11] else None,
        max_duration_s=r[12],
        delay_until=r[13],
        ready_at=r[14],
        expires_at=r[15],
        version=r[16],
        pinned_version=r[17],
        attempt=r[18],
        interruptions=r[19],
        parent_run_id=r[20],
        root_run_id=r[21],
        batch_id=r[22],
        replayed_from=r[23],
        started_at=r[24],
        idempotency_key=r[25],
        generation=r[26],
        hold=Hold(r[27]) if r[27] is not None else None,
        executing_s=r[28],
        machine=r[29],
    )


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


def attempt_starts(
    conn: sqlite3.Connection, since: float, env: str, queue: str
) -> list[tuple[str | None, float]]:
    """Attempts of a queue started after ``since``: (concurrency key, start), oldest first."""
    return conn.execute(
        "SELECT r.concurrency_key, a.started_at FROM attempts a JOIN runs r ON r.id = a.run_id"
        " WHERE a.started_at > ? AND r.env = ? AND r.queue = ? ORDER BY a.started_at",
        (since, env, queue),
    ).fetchall()


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


def reset_idempotency_slot(conn: sqlite3.Connection, env: str, task_id: str, key: str) -> list[str]:
    """Free the idempotency key of a task's runs; return the ids of the runs that held it."""
    held = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM runs WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
            (env, task_id, key),
        )
    ]
    conn.execute(
        "UPDATE runs SET idempotency_slot = NULL"
        " WHERE env = ? AND task_id = ? AND idempotency_slot = ?",
        (env, task_id, key),
    )
    return held
