"""Spans around the SDK's calls (``trigger``, waits) and the W3C ``traceparent`` of a trigger.

OpenTelemetry's API costs ~50 ms to import, so ``import ember`` never imports it: these
helpers act only when the process already has (a run process always does, its zygote set up
the tracer provider; an application that traces has too). A process that never imported
OpenTelemetry has no active span, so it has no trace to continue and no span to record.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

_API = "opentelemetry.trace"


@contextlib.contextmanager
def span(name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
    """A span named ``name``, current inside the block; records an exception that leaves it.

    Yields the span (None when OpenTelemetry is not loaded). Control flow that derives from
    BaseException (a cancel, an eviction) ends the span without marking it failed.
    """
    if _API not in sys.modules:
        yield None
        return
    from opentelemetry import trace

    tracer = trace.get_tracer("ember")
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except Exception as exc:
            current.record_exception(exc)
            current.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None when there is none."""
    if _API not in sys.modules:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
