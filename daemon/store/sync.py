"""The sync tables: the outbox of what a forwarded environment still has to send, and the
mirror of the remote's runs (and of local runs not sent yet).

Each function takes a ``sqlite3.Connection`` and runs inside the caller's transaction (the
group commit), like ``runs``. :class:`ember.daemon.engine.mirror.MirrorDb` puts them behind
the interface a :class:`ember.sync.SyncLink` talks to.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ember._types import LogLine, Run, RunError, RunStatus, RunSummary
from ember.daemon.store import runs as store
from ember.sync._link import Delivered, OutboxItem, local_id_of

_encoder = msgspec.json.Encoder()
_summary_decoder = msgspec.json.Decoder(RunSummary)
_run_decoder = msgspec.json.Decoder(Run)
_logs_decoder = msgspec.json.Decoder(list[LogLine])
_SUMMARY_FIELDS = frozenset(RunSummary.__struct_fields__)
_FINAL = tuple(s.value for s in RunStatus if s.is_final)
_FAILED = ("FAILED", "CRASHED", "SYSTEM_FAILURE", "CANCELED", "EXPIRED", "TIMED_OUT")


def summary_of(run: Run) -> RunSummary:
    """The listed form of a run."""
    values = {f: getattr(run, f) for f in _SUMMARY_FIELDS if hasattr(run, f)}
    return RunSummary(**values)


@dataclass(frozen=True, slots=True)
class MirrorRow:
    """A run as the local daemon holds it for a forwarded environment."""

    id: str
    local_id: str | None
    remote_id: str | None
    summary: RunSummary
    run: Run | None
    logs: list[LogLine] | None
    mirrored_at: float | None


_ROW = "id, local_id, remote_id, summary, run, logs, mirrored_at"


def _row(r: Sequence[Any]) -> MirrorRow:
    return MirrorRow(
        id=r[0],
        local_id=r[1],
        remote_id=r[2],
        summary=_summary_decoder.decode(r[3]),
        run=_run_decoder.decode(r[4]) if r[4] is not None else None,
        logs=_logs_decoder.decode(r[5]) if r[5] is not None else None,
        mirrored_at=r[6],
    )


# -- the outbox ----------------------------------------------------------------------------


def enqueue_trigger(
    conn: sqlite3.Connection, summary: RunSummary, body: bytes, user_key: str | None
) -> None:
    """A run to forward: its outbox item and its row (QUEUED until the remote says more)."""
    now = summary.created_at.timestamp()
    conn.execute(
        "INSERT INTO sync_outbox (env, kind, target, body, created_at)"
        " VALUES (?, 'trigger', ?, ?, ?)",
        (summary.env, summary.id, body, now),
    )
    conn.execute(
        "INSERT INTO sync_runs (id, env, local_id, task_id, status, idempotency_key, updated_at,"
        " summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            summary.id,
            summary.env,
            summary.id,
            summary.task_id,
            summary.status.value,
            user_key,
            now,
            _encoder.encode(summary),
        ),
    )


def enqueue_action(
    conn: sqlite3.Connection, env: str, kind: str, target: str, body: bytes, now: float
) -> None:
    """A cancel or a token completion to send after everything before it."""
    conn.execute(
        "INSERT INTO sync_outbox (env, kind, target, body, created_at) VALUES (?, ?, ?, ?, ?)",
        (env, kind, target, body, now),
    )


def drop_unsent(conn: sqlite3.Connection, local_id: str, now: float) -> bool:
    """Cancel a run the outbox never tried to send: it is never sent. False when a send was
    tried (the remote may hold it, its answer lost) or done."""
    deleted = conn.execute(
        "DELETE FROM sync_outbox WHERE kind = 'trigger' AND target = ? AND tries = 0",
        (local_id,),
    ).rowcount
    if not deleted:
        return False
    row = conn.execute("SELECT summary FROM sync_runs WHERE local_id = ?", (local_id,)).fetchone()
    summary = msgspec.structs.replace(
        _summary_decoder.decode(row[0]),
        status=RunStatus.CANCELED,
        updated_at=store.ts(now),
        finished_at=store.ts(now),
    )
    _put_summary(conn, local_id, summary, None)
    return True


def find_key(conn: sqlite3.Connection, env: str, task_id: str, key: str) -> str | None:
    """A forwarded run holding the user's idempotency key (failed runs free it)."""
    row = conn.execute(
        "SELECT id FROM sync_runs WHERE env = ? AND task_id = ? AND idempotency_key = ?"
        f" AND status NOT IN ({','.join('?' * len(_FAILED))})",
        (env, task_id, key, *_FAILED),
    ).fetchone()
    return str(row[0]) if row else None


def outbox(conn: sqlite3.Connection, env: str, limit: int) -> list[OutboxItem]:
    """The oldest items still to send; a cancel names its run by the remote id (empty when
    the run never became a remote one)."""
    rows = conn.execute(
        "SELECT o.seq, o.kind, CASE WHEN o.kind = 'cancel' THEN coalesce((SELECT r.remote_id"
        " FROM sync_runs r WHERE r.id = o.target), '') ELSE o.target END, o.body"
        " FROM sync_outbox o WHERE o.env = ? ORDER BY o.seq LIMIT ?",
        (env, limit),
    ).fetchall()
    return [OutboxItem(seq=r[0], kind=r[1], target=r[2], body=bytes(r[3])) for r in rows]


def tried(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    """Items about to be sent: from now on the remote may hold them."""
    conn.executemany("UPDATE sync_outbox SET tries = tries + 1 WHERE seq = ?", [(s,) for s in seqs])


def outbox_size(conn: sqlite3.Connection, env: str) -> int:
    """How many items wait to be sent."""
    return int(conn.execute("SELECT count(*) FROM sync_outbox WHERE env = ?", (env,)).fetchone()[0])


def delivered(conn: sqlite3.Connection, env: str, done: Sequence[Delivered], now: float) -> None:
    """Remove sent items, link runs to their remote ids, and record refusals."""
    for item in done:
        conn.execute("DELETE FROM sync_outbox WHERE seq = ?", (item.seq,))
        if item.kind == "trigger" and item.remote_id is not None:
            _link(conn, item.target, item.remote_id)
        elif item.kind == "trigger":
            row = conn.execute(
                "SELECT summary FROM sync_runs WHERE local_id = ?", (item.target,)
            ).fetchone()
            refused = msgspec.structs.replace(
                _summary_decoder.decode(row[0]),
                status=RunStatus.SYSTEM_FAILURE,
                updated_at=store.ts(now),
                finished_at=store.ts(now),
                error=RunError(name="SyncRefused", message=item.error or "", code="SYNC_REFUSED"),
            )
            _put_summary(conn, item.target, refused, None)
        elif item.error is not None:
            set_error(conn, env, f"{item.kind} {item.target} was refused: {item.error}")


def _link(conn: sqlite3.Connection, local_id: str, remote_id: str) -> None:
    """The local run became this remote run. Its row keeps the local id (what the trigger
    answered, what the dashboard shows) and learns the remote one."""
    # A row the mirror made for the remote run before it knew the local one goes.
    conn.execute(
        "DELETE FROM sync_runs WHERE remote_id = ? AND local_id IS NULL",
        (remote_id,),
    )
    conn.execute(
        "UPDATE sync_runs SET remote_id = ? WHERE local_id = ? AND remote_id IS NULL",
        (remote_id, local_id),
    )


def _put_summary(
    conn: sqlite3.Connection, row_id: str, summary: RunSummary, mirrored_at: float | None
) -> None:
    conn.execute(
        "UPDATE sync_runs SET status = ?, updated_at = ?, summary = ?,"
        " mirrored_at = coalesce(?, mirrored_at) WHERE id = ? OR local_id = ?",
        (
            summary.status.value,
            summary.updated_at.timestamp(),
            _encoder.encode(summary),
            mirrored_at,
            row_id,
            row_id,
        ),
    )


# -- the mirror ----------------------------------------------------------------------------


def mirror(
    conn: sqlite3.Connection, env: str, summaries: Sequence[RunSummary], now: float
) -> tuple[list[str], list[str]]:
    """Record remote runs; return the row ids that changed and the final runs to fetch whole.

    An older view of a run (a catch-up page listed before an event) never replaces a newer.
    A row not mirrored yet holds only the outbox's view, stamped by this daemon's clock: the
    remote's first view replaces it whatever the two clocks say (a laptop ahead of
    production would otherwise show its runs QUEUED until production's clock caught up).
    """
    changed, fetch = [], []
    for summary in summaries:
        local_id = local_id_of(summary)
        if local_id is not None:
            _link(conn, local_id, summary.id)
        row = conn.execute(
            "SELECT id, updated_at, run IS NOT NULL, mirrored_at FROM sync_runs"
            " WHERE remote_id = ?",
            (summary.id,),
        ).fetchone()
        updated = summary.updated_at.timestamp()
        if row is None:
            conn.execute(
                "INSERT INTO sync_runs (id, env, local_id, remote_id, task_id, status, updated_at,"
                " summary, mirrored_at) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?)",
                (
                    summary.id,
                    env,
                    summary.id,
                    summary.task_id,
                    summary.status.value,
                    updated,
                    _encoder.encode(summary),
                    now,
                ),
            )
            row_id, has_run = summary.id, False
        elif row[3] is None or updated >= row[1]:
            row_id, has_run = row[0], bool(row[2])
            _put_summary(conn, row_id, summary, now)
        else:
            conn.execute("UPDATE sync_runs SET mirrored_at = ? WHERE id = ?", (now, row[0]))
            continue
        changed.append(row_id)
        if summary.status.is_final and not has_run:
            fetch.append(summary.id)
    return changed, fetch


def finished(
    conn: sqlite3.Connection, env: str, run: Run, logs: Sequence[LogLine], now: float
) -> list[str]:
    """A final run held whole, with its logs; returns the row ids that changed."""
    changed, _ = mirror(conn, env, [summary_of(run)], now)
    conn.execute(
        "UPDATE sync_runs SET run = ?, logs = ? WHERE remote_id = ?",
        (_encoder.encode(run), _encoder.encode(list(logs)), run.id),
    )
    return changed


def unfetched(conn: sqlite3.Connection, env: str) -> list[str]:
    """Remote runs known to be final but not held whole yet."""
    rows = conn.execute(
        "SELECT id FROM sync_runs WHERE env = ? AND remote_id IS NOT NULL AND run IS NULL"
        f" AND status IN ({','.join('?' * len(_FINAL))})",
        (env, *_FINAL),
    ).fetchall()
    return [r[0] for r in rows]


def get(conn: sqlite3.Connection, env: str, run_id: str) -> MirrorRow | None:
    """A run by its shown id (the local one, for a run triggered here) or its remote id."""
    row = conn.execute(
        f"SELECT {_ROW} FROM sync_runs WHERE env = ? AND (id = ? OR remote_id = ?)",
        (env, run_id, run_id),
    ).fetchone()
    return _row(row) if row else None


def list_rows(
    conn: sqlite3.Connection,
    env: str,
    statuses: Sequence[str],
    tasks: Sequence[str],
    limit: int,
    cursor: str | None,
) -> tuple[list[MirrorRow], str | None]:
    """A page of runs, newest first (ids are time-ordered), and the next page's cursor."""
    where, args = ["env = ?"], [env]
    if statuses:
        where.append(f"status IN ({','.join('?' * len(statuses))})")
        args += statuses
    if tasks:
        where.append(f"task_id IN ({','.join('?' * len(tasks))})")
        args += tasks
    if cursor is not None:
        where.append("id < ?")
        args.append(cursor)
    rows = conn.execute(
        f"SELECT {_ROW} FROM sync_runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*args, limit + 1),
    ).fetchall()
    page = [_row(r) for r in rows[:limit]]
    return page, (page[-1].id if len(rows) > limit and page else None)


# -- the cursor ----------------------------------------------------------------------------


def cursor(conn: sqlite3.Connection, env: str) -> tuple[str | None, float, float | None]:
    """The last event id held, the remote time runs are caught up to, the last contact."""
    row = conn.execute(
        "SELECT last_event_id, caught_up_to, last_contact_at FROM sync_state WHERE env = ?",
        (env,),
    ).fetchone()
    return (row[0], row[1], row[2]) if row else (None, 0.0, None)


def save_cursor(
    conn: sqlite3.Connection,
    env: str,
    event_id: str | None,
    caught_up_to: float | None,
    contact_at: float | None,
) -> None:
    """Move the cursor (None leaves a value as it is)."""
    conn.execute(
        "INSERT INTO sync_state (env, last_event_id, caught_up_to, last_contact_at)"
        " VALUES (?, ?, coalesce(?, 0), ?) ON CONFLICT (env) DO UPDATE SET"
        " last_event_id = coalesce(excluded.last_event_id, last_event_id),"
        " caught_up_to = coalesce(?, caught_up_to),"
        " last_contact_at = coalesce(excluded.last_contact_at, last_contact_at)",
        (env, event_id, caught_up_to, contact_at, caught_up_to),
    )


def set_error(conn: sqlite3.Connection, env: str, error: str | None) -> None:
    """The last thing that went wrong with the environment's sync (None: cleared)."""
    conn.execute(
        "INSERT INTO sync_state (env, last_error) VALUES (?, ?)"
        " ON CONFLICT (env) DO UPDATE SET last_error = excluded.last_error",
        (env, error),
    )


# -- answers read through to the remote --------------------------------------------------


def save_answer(conn: sqlite3.Connection, env: str, path: str, body: bytes, now: float) -> None:
    """Keep the remote's last answer to a read, for when it cannot be reached."""
    conn.execute(
        "INSERT OR REPLACE INTO sync_cache (env, path, body, fetched_at) VALUES (?, ?, ?, ?)",
        (env, path, body, now),
    )


def cached_answer(conn: sqlite3.Connection, env: str, path: str) -> tuple[bytes, float] | None:
    """The remote's last answer to a read and when it came, or None."""
    row = conn.execute(
        "SELECT body, fetched_at FROM sync_cache WHERE env = ? AND path = ?", (env, path)
    ).fetchone()
    return (bytes(row[0]), row[1]) if row else None
