"""The attempt's own span in the run process: current while the attempt runs, sent only if touched.

Every run's attempt has a span, so what it costs is paid by every no-op run. The daemon
therefore builds that span itself, from the attempt's row (its times, its outcome and the
standard ``ctx.*`` attributes), under an id both sides derive from the run and the attempt
number (``store/traces.py``). In the run process the span is still a real one to everything
that sees it: it is the current span while the attempt runs, so the SDK's and
instrumentations' spans are its children and ``logger`` lines its events, and it keeps
attributes, events (within the SDK's default limits), a name and a status as an SDK span does.
What the attempt's code adds so is all this process sends of it: its *extras*, one record under
the attempt's span id and a piece id of this process (a replay's new process sends a piece of
its own), which the daemon merges into the span it builds. An attempt nobody touched sends
nothing and stores nothing.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util import types

from ember._trace_types import EXTRAS_SEPARATOR
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
    """A recording span that sends only what its attempt's code added (see the module).

    Its setters are called from the loop's thread and from a ``def`` task's thread; each is
    one dict or list operation, atomic under the GIL, and the record copies them. ``changed``
    says whether anything was added since the last record.
    """

    def __init__(
        self,
        *,
        trace_hex: str,
        span_hex: str,
        limits: SpanLimits,
        ended: Callable[[AttemptSpan], None],
        changed: Callable[[], None],
    ) -> None:
        self.trace_hex = trace_hex
        self.span_hex = span_hex
        self.end_ns = 0
        self.changed = False
        self._context: trace.SpanContext | None = None  # made when a child span asks for it
        self._piece = ""
        self._name = ""
        self._attributes: dict[str, Any] = {}
        self._events: list[dict[str, Any]] = []
        self._status = Status(StatusCode.UNSET)
        self._limits = limits
        self._ended = ended
        self._changed = changed

    def _touch(self) -> None:
        # The first change since the last record asks for a flush: what the code added
        # reaches the daemon within a loop iteration, as an ended span does, so a cancel or a
        # kill -9 right after loses none of it.
        if not self.changed:
            self.changed = True
            self._changed()

    def record(self) -> SpanRecord:
        """What was added to the span, as the worker channel carries it (open: ``end_ns`` 0)."""
        self.changed = False  # (before the copies: a change made meanwhile is sent next time)
        if not self._piece:
            # (sortable: a later process's piece, a replay's, sorts after an earlier one's)
            self._piece = f"{time.time_ns():016x}.{os.getpid():x}"
        events = list(self._events)
        return SpanRecord(
            trace_id=self.trace_hex,
            span_id=f"{self.span_hex}{EXTRAS_SEPARATOR}{self._piece}",
            parent_id=self.span_hex,
            name=self._name,
            start_ns=0,
            end_ns=self.end_ns,
            status=self._status.status_code.value,
            status_message=self._status.description or "",
            attrs=_json.encode(dict(self._attributes)),
            events=_json.encode(events) if events else b"[]",
        )

    # -- opentelemetry.trace.Span -------------------------------------------------------

    def get_span_context(self) -> trace.SpanContext:
        if self._context is None:
            self._context = trace.SpanContext(
                int(self.trace_hex, 16), int(self.span_hex, 16), False, _SAMPLED
            )
        return self._context

    def is_recording(self) -> bool:
        return not self.end_ns

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.end_ns:
            return
        limit = self._limits.max_span_attributes
        if key in self._attributes or limit is None or len(self._attributes) < limit:
            self._attributes[key] = plain_value(value)
            self._touch()

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
        self._touch()

    def update_name(self, name: str) -> None:
        if not self.end_ns:
            self._name = name
            self._touch()

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_ns or self._status.status_code is StatusCode.OK:
            return  # (OK is final in OTel's rules)
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status
            self._touch()

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
