"""The daemon as the runs' trace collector: span batches in, rows out, and the exporters told.

Run processes send ``Spans`` frames (``child/tracing.py``); each batch is buffered until the
end of the loop iteration and written with whatever else that iteration writes (one group
commit), like log lines. Sinks (the OTLP exporter, ``ops/otlp.py``) get the same rows, and the
run's own span when the run ends: that span lives as long as the run, so the daemon makes it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from ember._errors import ConfigError
from ember._trace_types import Span
from ember._types import RunError, RunStatus
from ember.daemon.model import ActiveRun
from ember.daemon.procs.protocol import Spans
from ember.daemon.store import traces as store
from ember.daemon.store.db import Database
from ember.daemon.store.traces import SpanRow

# W3C Trace Context, version 00: trace id and parent id lower-case hex, not all zeros.
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


class SpanSink(Protocol):
    """Somewhere spans go besides the store (an exporter)."""

    def spans(self, rows: list[SpanRow]) -> None:
        """Spans a run process sent (already on their way into the store)."""
        ...

    def run_ended(self, span: Span) -> None:
        """The span of a run that reached a final status."""
        ...


def check_traceparent(value: str | None) -> str | None:
    """``value`` if it is a W3C traceparent (or None).

    Raises:
        ConfigError: it is not one.
    """
    if value is None:
        return None
    match = _TRACEPARENT.match(value)
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        raise ConfigError(
            f"{value[:80]!r} is not a W3C traceparent: send 00-<32 hex trace id>-<16 hex span "
            "id>-<2 hex flags> (what OpenTelemetry's propagator writes), or leave it out"
        )
    return value


class SpanIngest:
    """Buffers span batches for one group commit per loop iteration; tells the sinks."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._buffer: list[SpanRow] = []
        self.sinks: list[SpanSink] = []

    def ingest(self, message: Spans) -> None:
        """A ``Spans`` frame from a run process."""
        if not self._buffer:
            asyncio.get_running_loop().call_soon(self._flush)
        run_id = message.run_id
        self._buffer.extend(
            (
                run_id,
                s.span_id,
                s.trace_id,
                s.parent_id,
                s.name,
                s.kind,
                s.start_ns,
                s.end_ns,
                s.status,
                s.status_message,
                s.attrs,
                s.events,
            )
            for s in message.spans
        )

    def _flush(self) -> None:
        rows, self._buffer = self._buffer, []
        if not rows:
            return
        self._db.write(lambda conn: store.insert_spans(conn, rows))
        for sink in self.sinks:
            sink.spans(rows)

    def run_final(
        self, run: ActiveRun, status: RunStatus, now: float, error: RunError | None
    ) -> None:
        """A run ended: its own span is complete (built only when a sink wants it)."""
        if not self.sinks:
            return
        span = store.run_span(
            run.id,
            env=run.env,
            task_id=run.task_id,
            status=status,
            created_at=run.created_at,
            finished_at=now,
            version=run.version,
            tags=run.tags,
            traceparent=run.traceparent,
            error=f"{error.name}: {error.message}" if error is not None else None,
        )
        for sink in self.sinks:
            sink.run_ended(span)
