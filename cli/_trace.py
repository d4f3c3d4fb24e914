"""``ember runs trace RUN``: a run's spans as a tree with offsets, durations and what they held."""

from __future__ import annotations

import typer

from ember._trace_types import RunTrace, Span

_COLOURS = {"OK": typer.colors.GREEN, "ERROR": typer.colors.RED}
# Attributes worth a glance on the span's line; the rest is in --json.
_SHOWN = (
    "ember.run.id",
    "ember.wait.held",
    "ember.wait.replayed",
    "ember.task",
    "ember.run.status",
)


def millis(ns: int) -> str:
    """``35ms`` or ``1.52s``."""
    ms = ns / 1e6
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def span_line(depth: int, span: Span, origin_ns: int) -> str:
    """One span: its place in the tree, its start after the run's, its length, its status."""
    label = ("  " * (depth - 1) + "└ " if depth else "") + span.name
    start = millis(span.start_ns - origin_ns)
    length = "open" if span.end_ns is None else millis(span.end_ns - span.start_ns)
    status = (
        typer.style(span.status, fg=_COLOURS.get(span.status)) if span.status != "UNSET" else ""
    )
    notes = " ".join(
        f"{key.rsplit('.', 1)[-1]}={span.attributes[key]}"
        for key in _SHOWN
        if key in span.attributes
    )
    events = f" {len(span.events)} events" if span.events else ""
    return f"{label:<40} +{start:>8} {length:>8} {status} {notes}{events}".rstrip()


def print_trace(trace: RunTrace) -> None:
    """The span tree of a run, one line a span; log events under their span with -v."""
    if not trace.spans:
        typer.echo("no spans")
        return
    origin = trace.spans[0].start_ns
    typer.echo(f"trace {trace.trace_id}")
    for depth, span in trace.tree():
        typer.echo(span_line(depth, span, origin))
        if span.status_message and span.status == "ERROR":
            typer.echo("  " * (depth + 1) + typer.style(span.status_message, fg=typer.colors.RED))
