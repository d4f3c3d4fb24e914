"""OTLP/HTTP export of the runs' spans: protobuf ``ExportTraceServiceRequest`` bodies, batched.

The engine hands every span batch it stores, and each run's own span when the run ends, to
:class:`OtlpExporter` (an ``engine.traces.SpanSink``). A loop sends what is queued at most
every ``FLUSH_S``, or as soon as ``BATCH_SPANS`` are waiting, with the stdlib's HTTP client in
a thread (the event loop never waits for a collector). A refusal or an unreachable collector
keeps the batch and tries again, doubling the pause up to a minute; at most ``MAX_QUEUED``
spans wait, the oldest dropped beyond (counted in the log): a collector down for a day must
not grow the daemon without bound. The store keeps every span whatever the exporter does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import urllib.error
import urllib.request
from typing import Any, cast

import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from ember._trace_types import Span
from ember.daemon.store.traces import SpanRow, span_of_row

log = logging.getLogger("ember.daemon")

FLUSH_S = 1.0
BATCH_SPANS = 512
MAX_QUEUED = 100_000
TIMEOUT_S = 10.0
MAX_BACKOFF_S = 60.0
_STATUS = {"UNSET": Status.STATUS_CODE_UNSET, "OK": Status.STATUS_CODE_OK}
_json = msgspec.json.Encoder()


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    return AnyValue(string_value=_json.encode(value).decode())


def _attributes(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in attributes.items()]


def to_protobuf(span: Span) -> PbSpan:
    """One span in OTLP's form (an open span is sent only once it ends)."""
    return PbSpan(
        trace_id=bytes.fromhex(span.trace_id),
        span_id=bytes.fromhex(span.span_id),
        parent_span_id=bytes.fromhex(span.parent_id) if span.parent_id else b"",
        name=span.name,
        # OTLP counts from UNSPECIFIED = 0; OTel's API from INTERNAL = 0.
        kind=cast(PbSpan.SpanKind.ValueType, span.kind + 1),
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns or span.start_ns,
        attributes=_attributes(span.attributes),
        events=[
            PbSpan.Event(
                time_unix_nano=e.time_ns, name=e.name, attributes=_attributes(e.attributes)
            )
            for e in span.events
        ],
        status=Status(
            code=_STATUS.get(span.status, Status.STATUS_CODE_ERROR),
            message=span.status_message or "",
        ),
    )


def export_request(spans: list[Span]) -> bytes:
    """The body of one export: the spans under Ember's resource and scope."""
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=_attributes({"service.name": "ember"})),
                scope_spans=[
                    ScopeSpans(
                        scope=InstrumentationScope(name="ember"),
                        spans=[to_protobuf(s) for s in spans],
                    )
                ],
            )
        ]
    )
    return bytes(request.SerializeToString())


class OtlpExporter:
    """Sends spans to an OTLP/HTTP collector (see the module).

    Args:
        endpoint: the traces URL (``http://localhost:4318/v1/traces``).
        headers: sent with every export (an API key of a hosted backend).
    """

    def __init__(self, endpoint: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.endpoint = endpoint
        self._headers = {"Content-Type": "application/x-protobuf", **dict(headers)}
        self._queue: collections.deque[Span] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.exported = 0

    # -- SpanSink ------------------------------------------------------------------------

    def spans(self, rows: list[SpanRow]) -> None:
        """Queue spans a run process sent."""
        for row in rows:
            if row[7]:  # (an open span is sent again when it ends)
                self._put(span_of_row(row[1:]))

    def run_ended(self, spans: list[Span]) -> None:
        """Queue a run's own span and its attempts'."""
        for span in spans:
            self._put(span)

    def _put(self, span: Span) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(span)
        if len(self._queue) >= BATCH_SPANS:
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Start sending (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout_s``), then stop."""
        if self._task is not None:
            self._task.cancel()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._send_all()
            except (TimeoutError, OSError) as exc:
                log.warning("OTLP export: %d spans not sent at stop (%s)", len(self._queue), exc)

    async def _run(self) -> None:
        backoff_s = FLUSH_S
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._send_all()
                backoff_s = FLUSH_S
            except OSError as exc:
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                log.warning(
                    "OTLP export to %s failed (%s); %d spans kept, next try in %.0fs",
                    self.endpoint,
                    exc,
                    len(self._queue),
                    backoff_s,
                )
            if self.dropped:
                log.warning("OTLP export: dropped %d spans (queue full)", self.dropped)
                self.dropped = 0

    async def _send_all(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_SPANS, len(self._queue)))]
            try:
                await asyncio.to_thread(self._post, export_request(batch))
            except BaseException:
                self._queue.extendleft(reversed(batch))  # kept, in order, for the next try
                raise
            self.exported += len(batch)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self.endpoint, data=body, headers=self._headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise OSError(f"HTTP {exc.code}: {exc.read()[:200]!r}") from None
