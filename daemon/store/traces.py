"""The spans of runs: written in the group commit, read for the trace view, pruned with runs.

A run is one trace. Its own span (the root, or the child of a caller's span when the trigger
carried a ``traceparent``) is not stored: it lasts as long as the run, longer than any process,
so it is built from the run's row when it is read (and exported when the run ends). Its ids
are derived from the run id, so every process and the daemon agree on them without a write.
Each attempt's span is built the same way, from the attempt's row (times, outcome, the
standard attributes), under an id derived from the run id and the attempt's number: a run
process sends only what the attempt's code added to it (its extras, ``child/attempt_span.py``),
stored as rows of their own and merged in when the span is built.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ember._trace_types import EXTRAS_SEPARATOR, RunTrace, Span, SpanEvent, SpanStatus
from ember._types import RunError, RunStatus
from ember.daemon.model import ActiveRun

_STATUS: dict[int, SpanStatus] = {0: "UNSET", 1: "OK", 2: "ERROR"}
_attrs_decoder = msgspec.json.Decoder(dict[str, Any])
_events_decoder = msgspec.json.Decoder(list[dict[str, Any]])
_tags_decoder = msgspec.json.Decoder(list[str])
_error_decoder = msgspec.json.Decoder(RunError)
_FAILED = {
    RunStatus.FAILED,
    RunStatus.CRASHED,
    RunStatus.SYSTEM_FAILURE,
    RunStatus.TIMED_OUT,
    RunStatus.EXPIRED,
}
SPAN_ROWS_PER_WRITE = 2000


def run_trace_ids(run_id: str, traceparent: str | None) -> tuple[str, str, str | None]:
    """(trace id, the run's span id, its parent span id) of a run.

    A run with a caller's ``traceparent`` joins the caller's trace under the caller's span;
    any other run is a trace of its own, whose id is derived from the run id.
    """
    digest = hashlib.sha256(run_id.encode()).hexdigest()
    span_id = digest[32:48]
    if traceparent:
        _, trace_id, parent, _ = traceparent.split("-")
        return trace_id, span_id, parent
    return digest[:32], span_id, None


def attempt_span_id(run_id: str, number: int) -> str:
    """The span id of a run's attempt ``number``, the same in the daemon and the process."""
    return hashlib.sha256(f"{run_id}#{number}".encode()).hexdigest()[:16]


def execute_traceparent(run: ActiveRun) -> str:
    """The traceparent naming the span of the run's attempt, for the spans of its process to
    hang under (sent only where run processes trace: it costs two hashes)."""
    trace_id, _, _ = run_trace_ids(run.id, run.traceparent)
    return f"00-{trace_id}-{attempt_span_id(run.id, run.attempt)}-01"


# (run_id, span_id, trace_id, parent_id, name, kind, start_ns, end_ns, status,
#  status_message, attrs, events): a span as the worker channel carries it, with its run.
SpanRow = tuple[str, str, str, str, str, int, int, int, int, str, bytes, bytes]


def insert_spans(conn: sqlite3.Connection, rows: Iterable[SpanRow]) -> None:
    """Record spans of runs; a span sent again (an attempt's extras, at a wait, then at its
    end) replaces it."""
    conn.executemany(
        "INSERT OR REPLACE INTO spans (run_id, span_id, trace_id, parent_id, name, kind, start_ns,"
        " end_ns, status, status_message, attrs, events) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )


def span_of_row(row: Sequence[Any]) -> Span:
    """A stored span (columns from ``span_id`` on, as ``SpanRow`` has them after the run)."""
    events = [
        SpanEvent(name=e["name"], time_ns=e["time_ns"], attributes=e.get("attrs") or {})
        for e in _events_decoder.decode(row[10])
    ]
    return Span(
        trace_id=row[1],
        span_id=row[0],
        parent_id=row[2] or None,
        name=row[3],
        kind=row[4],
        start_ns=row[5],
        end_ns=row[6] or None,  # 0: not ended (yet)
        status=_STATUS.get(row[7], "UNSET"),
        status_message=row[8] or None,
        attributes=_attrs_decoder.decode(row[9]),
        events=events,
    )


def run_span(
    run_id: str,
    *,
    env: str,
    task_id: str,
    status: RunStatus,
    created_at: float,
    finished_at: float | None,
    version: str | None,
    tags: list[str],
    traceparent: str | None,
    error: str | None = None,
) -> Span:
    """The run's own span, from its record (open while the run is not final)."""
    trace_id, span_id, parent = run_trace_ids(run_id, traceparent)
    attributes: dict[str, Any] = {
        "ctx.run.id": run_id,
        "ctx.task.id": task_id,
        "ctx.environment.type": env,
        "ember.run.status": status.value,
    }
    if version:
        attributes["ctx.worker.version"] = version
    if tags:
        attributes["ctx.run.tags"] = tags
    end_ns = None if finished_at is None else int(finished_at * 1e9)
    final = end_ns is not None
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent,
        name=task_id,
        kind=1,  # SERVER: the run serves its trigger
        start_ns=int(created_at * 1e9),
        end_ns=end_ns,
        status=("ERROR" if status in _FAILED else "OK") if final else "UNSET",
        status_message=error if status in _FAILED else None,
        attributes=attributes,
    )


def get_trace(conn: sqlite3.Connection, run_id: str) -> RunTrace | None:
    """A run's trace: its own span, then its attempts' and the spans its processes sent, by
    start time."""
    found = _run_spans(conn, run_id)
    if found is None:
        return None
    root, attempts, recorded = found
    spans = sorted([*attempts, *recorded], key=lambda span: span.start_ns)  # (stable)
    return RunTrace(run_id=run_id, trace_id=root.trace_id, spans=[root, *spans])


def run_and_attempt_spans(conn: sqlite3.Connection, run_id: str) -> list[Span]:
    """The spans the daemon builds for a run (its own, its attempts'), as exported at its end."""
    found = _run_spans(conn, run_id)
    return [] if found is None else [found[0], *found[1]]


def _run_spans(conn: sqlite3.Connection, run_id: str) -> tuple[Span, list[Span], list[Span]] | None:
    """(the run's span, its attempts' spans, the spans its processes sent)."""
    row = conn.execute(
        "SELECT env, task_id, status, created_at, finished_at, version, tags, traceparent, error"
        " FROM runs WHERE id = ?",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    status = RunStatus(row[2])
    tags = _tags_decoder.decode(row[6]) if row[6] else []
    error = _error_decoder.decode(row[8]) if row[8] else None
    root = run_span(
        run_id,
        env=row[0],
        task_id=row[1],
        status=status,
        created_at=row[3],
        finished_at=row[4],
        version=row[5],
        tags=tags,
        traceparent=row[7],
        error=f"{error.name}: {error.message}" if error is not None else None,
    )
    recorded: list[Span] = []
    extras: dict[str, list[Span]] = {}
    for r in conn.execute(
        "SELECT span_id, trace_id, parent_id, name, kind, start_ns, end_ns, status,"
        " status_message, attrs, events FROM spans WHERE run_id = ? ORDER BY start_ns, span_id",
        (run_id,),
    ):
        span = span_of_row(r)
        if EXTRAS_SEPARATOR in span.span_id:
            extras.setdefault(r[2], []).append(span)  # (by piece: in the order they began)
        else:
            recorded.append(_closed(span, root.end_ns))
    attempts = [
        _closed(
            _attempt_span(
                root,
                run_id,
                number,
                state,
                started_at,
                finished_at,
                version or row[5],
                error_blob,
            ),
            root.end_ns,
            extras.get(attempt_span_id(run_id, number), ()),
        )
        for number, state, started_at, finished_at, version, error_blob in conn.execute(
            "SELECT number, status, started_at, finished_at, version, error FROM attempts"
            " WHERE run_id = ? ORDER BY number",
            (run_id,),
        )
    ]
    return root, attempts, recorded


def _attempt_span(
    root: Span,
    run_id: str,
    number: int,
    state: str,
    started_at: float,
    finished_at: float | None,
    version: str | None,
    error_blob: bytes | None,
) -> Span:
    """An attempt's span from its row (open while it executes), under its run's span."""
    # The run's own attributes (its id, task, environment, tags), the attempt's number and
    # the version it ran on: what Trigger.dev's attempt spans carry.
    attributes = {
        **{k: v for k, v in root.attributes.items() if k != "ember.run.status"},
        "ctx.attempt.number": number,
    }
    if version:
        attributes["ctx.worker.version"] = version
    status: SpanStatus = "UNSET"
    message = None
    if finished_at is not None:
        status = "OK" if state == "COMPLETED" else "ERROR"
        if status == "ERROR":
            error = _error_decoder.decode(error_blob) if error_blob else None
            message = f"{error.name}: {error.message}" if error is not None else state.lower()
    return Span(
        trace_id=root.trace_id,
        span_id=attempt_span_id(run_id, number),
        parent_id=root.span_id,
        name=f"Attempt {number}",
        kind=0,
        start_ns=int(started_at * 1e9),
        end_ns=None if finished_at is None else int(finished_at * 1e9),
        status=status,
        status_message=message,
        attributes=attributes,
    )


def _closed(span: Span, run_end_ns: int | None, extras: Sequence[Span] = ()) -> Span:
    """A span with the extras its processes sent merged in, and ended where its run ended if
    the process that held it died first."""
    if extras:
        attributes = dict(span.attributes)
        events = list(span.events)
        name, status, message = span.name, span.status, span.status_message
        for piece in extras:
            attributes.update(piece.attributes)
            events.extend(piece.events)
            name = piece.name or name
            if piece.status != "UNSET":  # the code set a status: it stands (as in OTel)
                status, message = piece.status, piece.status_message
        events.sort(key=lambda event: event.time_ns)
        span = msgspec.structs.replace(
            span,
            name=name,
            status=status,
            status_message=message,
            attributes=attributes,
            events=events,
        )
    if span.end_ns is not None or run_end_ns is None:
        return span
    return msgspec.structs.replace(
        span,
        end_ns=max(run_end_ns, span.start_ns),
        status="ERROR",
        status_message="its process ended before the span did (killed, or crashed)",
    )


def delete_spans(conn: sqlite3.Connection, ids: list[str]) -> int:
    """Delete up to ``SPAN_ROWS_PER_WRITE`` spans of these runs (retention); how many went."""
    marks = ", ".join("?" for _ in ids)
    cursor = conn.execute(
        "DELETE FROM spans WHERE (run_id, span_id) IN (SELECT run_id, span_id FROM spans"
        f" WHERE run_id IN ({marks}) LIMIT ?)",
        (*ids, SPAN_ROWS_PER_WRITE),
    )
    return cursor.rowcount
