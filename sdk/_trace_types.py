"""Wire types of a run's trace: its OpenTelemetry spans as the daemon stores and serves them."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

SpanStatus = Literal["UNSET", "OK", "ERROR"]
# Between an attempt's span id and a run process's piece id, in the span id under which that
# process records what the attempt's code added to the attempt's span (its "extras").
EXTRAS_SEPARATOR = ":"


class SpanEvent(Struct, frozen=True, kw_only=True):
    """Something that happened at one instant of a span (a ``logger`` line, an exception)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = {}


class Span(Struct, frozen=True, kw_only=True):
    """One span of a run's trace.

    Attributes:
        trace_id: 32 hex digits, shared by every span of the trace.
        span_id: 16 hex digits.
        parent_id: the parent span's id; None for the trace's root.
        name: the task id for the run's own span, ``Attempt N``, ``trigger``,
            ``trigger_and_wait``, ``wait.for_``, ``wait.for_token``, or a user's span.
        start_ns: nanoseconds since the epoch.
        end_ns: likewise; None while the span is open (the run's span of an unfinished run).
        status: OpenTelemetry's status code.
        attributes: ``ctx.run.id``, ``ctx.task.id``, ``ctx.attempt.number``, ... and the span's own.
        events: log lines and exceptions, in time order.
    """

    trace_id: str
    span_id: str
    parent_id: str | None = None
    name: str
    kind: int = 0
    start_ns: int
    end_ns: int | None = None
    status: SpanStatus = "UNSET"
    status_message: str | None = None
    attributes: dict[str, Any] = {}
    events: list[SpanEvent] = []

    @property
    def duration_ms(self) -> float | None:
        """How long the span lasted (None while it is open)."""
        return None if self.end_ns is None else (self.end_ns - self.start_ns) / 1e6


class RunTrace(Struct, frozen=True, kw_only=True):
    """``GET /api/v1/runs/{id}/trace``: the run's span first, then its spans by start time."""

    run_id: str
    trace_id: str
    spans: list[Span]

    def tree(self) -> list[tuple[int, Span]]:
        """The spans depth first, each with its depth; children in start order.

        A span whose parent is not in the trace (a parent in the caller's application)
        hangs under the run's span, so every span is shown once.
        """
        if not self.spans:
            return []
        root = self.spans[0]
        known = {s.span_id for s in self.spans}
        children: dict[str, list[Span]] = {}
        for span in self.spans[1:]:
            parent = span.parent_id if span.parent_id in known else root.span_id
            children.setdefault(parent or root.span_id, []).append(span)
        out: list[tuple[int, Span]] = []
        stack = [(0, root)]
        while stack:
            depth, span = stack.pop()
            out.append((depth, span))
            below = sorted(children.get(span.span_id, ()), key=lambda s: s.start_ns)
            stack.extend((depth + 1, s) for s in reversed(below))
        return out
