"""The daemon as the runs' trace collector: span batches in, rows out, and the exporters told.

Run processes send ``Spans`` frames (``child/tracing.py``); each batch is buffered until the
end of the loop iteration and written with whatever else that iteration writes (one group
commit), like log lines. Sinks (the OTLP exporter, ``ops/otlp.py``) get the same spans as they
come, and the spans the daemon builds (the run's own and its attempts', ``store/traces.py``)
once the run's end is recorded: those live as long as the run and its attempts' rows.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ember._errors import ConfigError
from ember._trace_types import EXTRAS_SEPARATOR, Span
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

    def run_ended(self, spans: list[Span]) -> None:
        """The spans of a run that reached a final status: its own, then its attempts'."""
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

    def __init__(self, db: Database, spawn: Callable[[Coroutine[Any, Any, Any]], None]) -> None:
        self._db = db
        self._spawn = spawn
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
        if self.sinks:
            # An attempt's extras are merged into its span, exported with the run's end.
            spans = [row for row in rows if EXTRAS_SEPARATOR not in row[1]]
            for sink in self.sinks:
                sink.spans(spans)

    def run_recorded(self, run_id: str) -> None:
        """A run's end is recorded: its own and its attempts' spans go to the sinks."""
        self._spawn(self._export_run(run_id))

    async def _export_run(self, run_id: str) -> None:
        spans = await self._db.read(lambda conn: store.run_and_attempt_spans(conn, run_id))
        for sink in self.sinks:
            sink.run_ended(spans)
