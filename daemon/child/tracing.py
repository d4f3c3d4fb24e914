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

The attempt's span (:class:`AttemptSpan`) is built by the daemon from the attempt's row, under
the id the ``Execute`` frame names; this process sends only what the attempt's code added to
it (its extras), at the end of the loop iteration it changed in, and nothing for an attempt
that added nothing (every no-op).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.trace import Span

from ember._runtime import Context
from ember.daemon.child.attempt_span import AttemptSpan, plain
from ember.daemon.procs.protocol import Message, SpanRecord, Spans

_json = msgspec.json.Encoder()


class ChannelSpanProcessor(SpanProcessor):
    """Buffers ended spans for the run executing and sends them in batches (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: list[SpanRecord] = []
        self.run_id = ""
        self._send: Callable[[Message], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._attempt: AttemptSpan | None = None  # the attempt running

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
        if first:
            self._soon(self._flush_batch)

    def attempt_changed(self) -> None:
        """The attempt's code added to its span: its extras go at the iteration's end."""
        self._soon(self.flush)

    def _soon(self, flush: Callable[[], None]) -> None:
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(flush)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process ends
                self._loop.call_soon_threadsafe(flush)

    def attempt_started(self, span: AttemptSpan) -> None:
        """The attempt's span started (on the loop's thread)."""
        self._attempt = span

    def attempt_ended(self, span: AttemptSpan) -> None:
        """The attempt's span ended (on the loop's thread): its extras, if any, go last."""
        if self._attempt is span:
            self._attempt = None
        if span.changed:
            self.add(span.record())

    def take(self, with_attempt: bool = True) -> Spans | None:
        """The buffered spans as one frame (None: none), the buffer emptied.

        The running attempt's extras, if they changed, go first: with any batch, or alone
        when ``with_attempt``.
        """
        with self._lock:
            spans, self._buffer = self._buffer, []
        attempt = self._attempt
        if attempt is not None and attempt.changed and (spans or with_attempt):
            spans.insert(0, attempt.record())
        if not spans or not self.run_id:
            return None
        return Spans(run_id=self.run_id, spans=spans)

    def flush(self) -> None:
        """Send the buffered spans now, as one frame, the attempt's extras with them."""
        self._send_batch(self.take())

    def _flush_batch(self) -> None:
        # What ended in the loop iteration (if the attempt's end did not take it already).
        self._send_batch(self.take(with_attempt=False))

    def _send_batch(self, batch: Spans | None) -> None:
        if batch is not None and self._send is not None:
            self._send(batch)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.flush()
        return True

    def shutdown(self) -> None:
        self.flush()


_processor: ChannelSpanProcessor | None = None
# The provider's limits, for the attempt spans (made without its tracer).
_limits: SpanLimits | None = None


def install(enabled: bool) -> None:
    """In the zygote, before any fork: make the channel's provider OTel's global one."""
    global _processor, _limits
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
    _limits = SpanLimits()  # (read from OTEL_* as the provider's are, here in the zygote)


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
    batch = _processor.take(with_attempt=False) if _processor is not None else None
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


@contextlib.contextmanager
def attempt_span(context: Context, traceparent: str) -> Iterator[Span | None]:
    """The attempt's span, current while it runs; ``traceparent`` names it (``Execute``).

    The daemon builds the span from the attempt's row; this one carries what the attempt's
    code adds to it, sent when it ends whatever way the attempt leaves (an eviction or a cancel
    raises through here, noted as the outcome), before the attempt's ``Done``.
    """
    processor = _processor
    if processor is None or _limits is None or not traceparent:
        yield None
        return
    processor.run_id = context.run_id
    _, trace_hex, span_hex, _ = traceparent.split("-")
    span = AttemptSpan(
        trace_hex=trace_hex,
        span_hex=span_hex,
        limits=_limits,
        ended=processor.attempt_ended,
        changed=processor.attempt_changed,
    )
    processor.attempt_started(span)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        span.set_attribute("ember.attempt.outcome", type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def log_event(level: str, message: str, attrs: dict[str, Any]) -> None:
    """A ``logger`` line as an event of the current span (the logs table keeps every line)."""
    if _processor is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(message, {"log.level": level, **plain(attrs)})


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
