"""The attempt's own span: a light OpenTelemetry ``Span`` that builds its record directly.

Every run's attempt has a span, so what it costs is paid by every no-op run: through the
SDK's ``Tracer.start_span`` (sampler, bounded attributes, a lock, a ``ReadableSpan`` copy at
its end, then ``to_record``) it cost ~100 µs of the ~140 µs tracing added to an attempt.
This span is the same to everything that sees it: it is the current span while the attempt
runs, so the SDK's and instrumentations' spans are its children and ``logger`` lines its
events; it keeps attributes, events (within the SDK's default limits) and status as an SDK
span does, and at its end hands its :class:`SpanRecord` to the channel's processor.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util import types

from ember.daemon.procs.protocol import SpanRecord

_json = msgspec.json.Encoder()
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
# Attribute values OTel accepts, kept as they are; anything else is sent as its repr.
_PLAIN = (str, bool, int, float)


def plain_value(value: Any) -> Any:
    """An attribute value as JSON can carry it (what is not OTel's types, as its repr)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple | list):
        return [v if isinstance(v, _PLAIN) else repr(v) for v in value]
    return repr(value)


def plain(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes as JSON can carry them."""
    if not attributes:
        return {}
    return {key: plain_value(value) for key, value in attributes.items()}


class AttemptSpan(trace.Span):
    """A recording span whose end sends its record (see the module).

    Its setters are called from the loop's thread and from a ``def`` task's thread; each is
    one dict or list operation, atomic under the GIL, and the record copies them at the end.
    """

    def __init__(
        self,
        *,
        name: str,
        trace_hex: str,
        span_id: int,
        parent_hex: str,
        attributes: dict[str, Any],
        limits: SpanLimits,
        ended: Callable[[AttemptSpan], None],
    ) -> None:
        self.name = name
        self.trace_hex = trace_hex
        self.span_hex = f"{span_id:016x}"
        self.parent_hex = parent_hex
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self._context = trace.SpanContext(int(trace_hex, 16), span_id, False, _SAMPLED)
        self._attributes = attributes
        self._events: list[dict[str, Any]] = []
        self._status = Status(StatusCode.UNSET)
        self._limits = limits
        self._ended = ended

    def record(self) -> SpanRecord:
        """The span as the worker channel carries it (open while ``end_ns`` is 0)."""
        events = list(self._events)
        return SpanRecord(
            trace_id=self.trace_hex,
            span_id=self.span_hex,
            parent_id=self.parent_hex,
            name=self.name,
            start_ns=self.start_ns,
            end_ns=self.end_ns,
            status=self._status.status_code.value,
            status_message=self._status.description or "",
            attrs=_json.encode(self._attributes),
            events=_json.encode(events) if events else b"[]",
        )

    # -- opentelemetry.trace.Span -------------------------------------------------------

    def get_span_context(self) -> trace.SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self.end_ns

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.end_ns:
            return
        limit = self._limits.max_span_attributes
        if key in self._attributes or limit is None or len(self._attributes) < limit:
            self._attributes[key] = plain_value(value)

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        limit = self._limits.max_events
        if self.end_ns or (limit is not None and len(self._events) >= limit):
            return  # (the SDK drops events over its limit too; the logs table keeps them)
        attrs = plain(attributes)
        cap = self._limits.max_event_attributes
        if cap is not None and len(attrs) > cap:
            attrs = dict(list(attrs.items())[:cap])
        self._events.append({"name": name, "time_ns": timestamp or time.time_ns(), "attrs": attrs})

    def update_name(self, name: str) -> None:
        if not self.end_ns:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_ns or self._status.status_code is StatusCode.OK:
            return  # (OK is final in OTel's rules)
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        name = f"{module}.{kind.__qualname__}" if module != "builtins" else kind.__qualname__
        event: dict[str, Any] = {
            "exception.type": name,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return
        self.end_ns = end_time or time.time_ns()
        self._ended(self)
