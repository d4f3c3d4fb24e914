"""OpenTelemetry in the run processes: the tracer provider, the attempt's span, span batches.

The zygote installs one ``TracerProvider`` as OTel's global provider before it forks, so the
SDK is imported once and every run process starts with it (the plain ``trace.get_tracer``
API and any instrumentation a project configures find it). Its only processor,
:class:`ChannelSpanProcessor`, keeps no thread (a zygote must stay single-threaded to fork
safely): each span that ends is turned into a :class:`SpanRecord` and buffered; the buffer
goes to the daemon as one ``Spans`` frame at the end of the loop iteration in which the first
of them ended, and at once before every frame that matters more (a wait, the attempt's end),
before a checkpoint closes the channel and before the process exits. So a span that ended is
on the daemon's socket within one loop iteration, and a ``kill -9`` after that loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import Span, Status, StatusCode

from ember._runtime import Context
from ember.daemon.procs.protocol import Message, SpanRecord, Spans

_json = msgspec.json.Encoder()
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
# Attribute values OTel accepts, kept as they are; anything else is sent as its repr.
_PLAIN = (str, bool, int, float)


class ChannelSpanProcessor(SpanProcessor):
    """Buffers ended spans for the run executing and sends them in batches (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: list[SpanRecord] = []
        self.run_id = ""
        self._send: Callable[[Message], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def bind(self, send: Callable[[Message], None], loop: asyncio.AbstractEventLoop) -> None:
        """Send batches with ``send``, flushing on ``loop`` (the run process's)."""
        self._send = send
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def on_end(self, span: ReadableSpan) -> None:
        self.add(to_record(span))

    def add(self, record: SpanRecord) -> None:
        """Buffer a span record; the first of a batch schedules its flush."""
        with self._lock:
            self._buffer.append(record)
            first = len(self._buffer) == 1
        if first and self._loop is not None:
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self.flush)
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed: the process ends
                    self._loop.call_soon_threadsafe(self.flush)

    def take(self) -> Spans | None:
        """The buffered spans as one frame (None: none), the buffer emptied."""
        with self._lock:
            spans, self._buffer = self._buffer, []
        if not spans or not self.run_id:
            return None
        if len(spans) > 1 and not spans[0].end_ns:
            # An attempt that began and ended within the batch: its open record is moot.
            spans = list({s.span_id: s for s in spans}.values())
        return Spans(run_id=self.run_id, spans=spans)

    def flush(self) -> None:
        """Send the buffered spans now, as one frame."""
        batch = self.take()
        if batch is not None and self._send is not None:
            self._send(batch)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.flush()
        return True

    def shutdown(self) -> None:
        self.flush()


_processor: ChannelSpanProcessor | None = None
_tracer: trace.Tracer | None = None  # (get_tracer builds a new tracer each call: ~100 µs)


def install(enabled: bool) -> None:
    """In the zygote, before any fork: make the channel's provider OTel's global one."""
    global _processor, _tracer
    if not enabled:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": "ember"}),
        # No atexit hook: run processes leave with os._exit and flush by themselves.
        shutdown_on_exit=False,
    )
    _processor = ChannelSpanProcessor()
    provider.add_span_processor(_processor)
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("ember")


def instrument(names: list[str]) -> None:
    """Apply each ``"module:Class"`` OpenTelemetry instrumentor once (``instrument()``).

    Raises:
        ImportError: one cannot be imported or applied, with what to do (the version's
            index then fails with this message).
    """
    for name in names:
        module_name, _, class_name = name.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in class_name.split("."):
                found = getattr(found, part)
            found().instrument()
        except Exception as exc:
            raise ImportError(
                f"instrumentation {name!r} of [tool.ember] could not be applied "
                f"({type(exc).__name__}: {exc}): install its package where the daemon runs "
                "(or in the version's requirements), or remove it from instrumentations"
            ) from exc


def bind(send: Callable[[Message], None], loop: asyncio.AbstractEventLoop) -> None:
    """In a run process: send span batches over its channel."""
    if _processor is not None:
        _processor.bind(send, loop)


def flush() -> None:
    """Send what ended so far (before a wait, a checkpoint, an exit)."""
    if _processor is not None:
        _processor.flush()


def take() -> tuple[Spans, ...]:
    """What ended so far, as a frame to send with another (the attempt's ``Done``)."""
    batch = _processor.take() if _processor is not None else None
    return () if batch is None else (batch,)


def enabled() -> bool:
    """Whether this process traces its runs."""
    return _processor is not None


def to_record(span: ReadableSpan) -> SpanRecord:
    """The wire form of an ended span."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    # OTel keeps only plain values (str, bool, int, float, tuples of them), which msgspec
    # encodes as they are.
    events = [
        {"name": e.name, "time_ns": e.timestamp, "attrs": dict(e.attributes or {})}
        for e in span.events
    ]
    return SpanRecord(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=span.name,
        kind=span.kind.value,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        status=span.status.status_code.value,
        status_message=span.status.description or "",
        attrs=_json.encode(dict(span.attributes or {})),
        events=_json.encode(events) if events else b"[]",
    )


def _plain(attributes: Any) -> dict[str, Any]:
    if not attributes:
        return {}
    return {key: _plain_value(value) for key, value in attributes.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple | list):
        return [v if isinstance(v, _PLAIN) else repr(v) for v in value]
    return repr(value)


@contextlib.contextmanager
def attempt_span(context: Context, traceparent: str) -> Iterator[Span | None]:
    """The attempt's span, current while it runs, a child of the run's root span.

    The daemon owns the root (a run lives longer than any process); ``traceparent`` names it.
    Spans end whatever way the attempt leaves (an eviction or a cancel raises through here),
    and are flushed before the attempt's ``Done`` is sent.
    """
    if _processor is None or _tracer is None or not traceparent:
        yield None
        return
    _processor.run_id = context.run_id
    _, trace_hex, parent_hex, _ = traceparent.split("-")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(
            trace.SpanContext(int(trace_hex, 16), int(parent_hex, 16), True, _SAMPLED)
        )
    )
    attributes: dict[str, Any] = {
        "ctx.run.id": context.run_id,
        "ctx.task.id": context.task_id,
        "ctx.attempt.number": context.attempt,
        "ctx.environment.type": context.env,
        "ctx.worker.version": context.version,
    }
    if context.tags:
        attributes["ctx.run.tags"] = list(context.tags)
    name = f"Attempt {context.attempt}"
    span = _tracer.start_span(name, context=parent, attributes=attributes)
    # Sent open too (end 0): the trace shows the attempt while it runs, and a process killed
    # mid-attempt leaves the span its others hang under.
    _processor.add(
        SpanRecord(
            trace_id=trace_hex,
            span_id=f"{span.get_span_context().span_id:016x}",
            parent_id=parent_hex,
            name=name,
            start_ns=getattr(span, "start_time", None) or time.time_ns(),
            end_ns=0,
            attrs=_json.encode(attributes),
        )
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        span.set_attribute("ember.attempt.outcome", type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def end_attempt(span: Span | None, ok: bool, error: str | None) -> None:
    """Set the attempt span's status from its outcome."""
    if span is None:
        return
    if ok:
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_status(Status(StatusCode.ERROR, error or "failed"))


def log_event(level: str, message: str, attrs: dict[str, Any]) -> None:
    """A ``logger`` line as an event of the current span (the logs table keeps every line)."""
    if _processor is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(message, {"log.level": level, **_plain(attrs)})


# Wait holds seen by this process: a wait that spans one was held by a CRIU checkpoint.
_checkpoints = 0


def note_checkpoint() -> None:
    """This process is about to be checkpointed (it closes its channel and parks)."""
    global _checkpoints
    _checkpoints += 1


def checkpoints() -> int:
    """How many checkpoints this process has been through."""
    return _checkpoints


def set_wait_attributes(**attributes: Any) -> None:
    """Add attributes to the current span (the SDK's wait span): how the wait was held."""
    if _processor is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)
