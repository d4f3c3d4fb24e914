"""The trace waterfall: a run's spans (waiting in the queue, each attempt, the waits between
retries) as bars on one time axis, as Trigger.dev draws a run's trace.

The run's OpenTelemetry spans (``runs.trace``) are drawn under the queue bars: each attempt
with the spans inside it, waits as hollow bars labelled with how they were held, log lines
as marks on their span, and a child run right under the span that triggered it. A run with
no spans (tracing off, or recorded before it) shows its attempts from its history instead.
Runs it triggered that no span names (found with the run list's ``parent`` filter) follow
as one bar each, and the run detail lists them under the waterfall to open them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.text import Text
from textual.widgets import Static

from ember._trace_types import RunTrace, Span
from ember._types import Run, RunStatus, RunSummary
from ember.tui._format import Clock, duration

LABEL_WIDTH = 30
TIME_WIDTH = 9


@dataclass(frozen=True, slots=True)
class TraceSpan:
    """One bar of the waterfall."""

    label: str
    start: datetime
    end: datetime | None  # None: still going
    style: str
    depth: int = 1
    hollow: bool = False  # a wait: the span held, drawn as an outline
    marks: tuple[datetime, ...] = ()  # log lines and other events on the span


def spans_of(
    run: Run, children: Sequence[RunSummary] = (), trace: RunTrace | None = None
) -> list[TraceSpan]:
    """The spans of a run, in time order: the run, its queue wait, attempts (with their
    recorded spans when there are) and retry waits, then its other child runs."""
    spans = [TraceSpan(f"{run.task_id}", run.created_at, run.finished_at, "bold", depth=0)]
    attempts = sorted(run.attempts, key=lambda a: a.number)
    first_start = attempts[0].started_at if attempts else None
    queued_until = first_start or (run.finished_at if run.status.is_final else None)
    if run.delay_until is not None and (first_start is None or run.delay_until <= first_start):
        spans.append(TraceSpan("delayed", run.created_at, run.delay_until, "$secondary"))
        spans.append(TraceSpan("queued", run.delay_until, queued_until, "$text-muted"))
    else:
        spans.append(TraceSpan("queued", run.created_at, queued_until, "$text-muted"))
    recorded = _by_attempt(trace) if trace is not None else {}
    unclaimed = {child.id: child for child in children}
    previous_end: datetime | None = None
    for attempt in attempts:
        if previous_end is not None and attempt.started_at > previous_end:
            spans.append(
                TraceSpan("retry backoff", previous_end, attempt.started_at, "$text-muted")
            )
        ok = attempt.status == "COMPLETED"
        running = attempt.finished_at is None and not run.status.is_final
        style = "$success" if ok else "$primary" if running else "$error"
        spans.append(
            TraceSpan(
                f"attempt {attempt.number} · {attempt.status.lower()}",
                attempt.started_at,
                attempt.finished_at or (None if running else run.finished_at),
                style,
            )
        )
        spans.extend(_recorded(recorded.get(attempt.number, []), unclaimed))
        previous_end = attempt.finished_at
    rest = sorted(unclaimed.values(), key=lambda c: (c.created_at, c.id))
    spans.extend(_child_bar(c, 1) for c in rest)
    return spans


def _instant(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def _span_style(span: Span) -> str:
    if span.status == "ERROR":
        return "$error"
    return "$success" if span.name.startswith("Attempt") else "$primary"


def _is_wait(span: Span) -> bool:
    return span.name.startswith("wait.") or span.name.endswith("_and_wait")


def _by_attempt(trace: RunTrace) -> dict[int, list[tuple[int, Span]]]:
    """The spans inside each attempt's span (that span itself is the attempt's bar)."""
    out: dict[int, list[tuple[int, Span]]] = {}
    current: int | None = None
    for depth, span in trace.tree()[1:]:
        if depth == 1:
            number = span.attributes.get("ctx.attempt.number")
            current = int(number) if isinstance(number, int) else None
            if current is not None:
                out.setdefault(current, [])
        elif current is not None:
            out[current].append((depth, span))
    return out


def _recorded(tree: list[tuple[int, Span]], unclaimed: dict[str, RunSummary]) -> list[TraceSpan]:
    """Spans of one attempt as bars; a child run right under the span that triggered it."""
    bars: list[TraceSpan] = []
    for depth, span in tree:
        label = span.name
        if held := span.attributes.get("ember.wait.held"):
            label += f" · {held}"
        bars.append(
            TraceSpan(
                label,
                _instant(span.start_ns),
                None if span.end_ns is None else _instant(span.end_ns),
                _span_style(span),
                depth=depth,
                hollow=_is_wait(span),
                marks=tuple(_instant(e.time_ns) for e in span.events),
            )
        )
        if span.name == "trigger":
            child = unclaimed.pop(str(span.attributes.get("ember.run.id", "")), None)
            if child is not None:
                bars.append(_child_bar(child, depth + 1))
    return bars


def _child_bar(child: RunSummary, depth: int) -> TraceSpan:
    final = child.status.is_final
    return TraceSpan(
        f"↳ {child.task_id} · {child.status.value.lower()}",
        child.created_at,
        child.finished_at or (child.updated_at if final else None),
        _child_style(child.status),
        depth=depth,
    )


def _child_style(status: RunStatus) -> str:
    if status is RunStatus.COMPLETED:
        return "$success"
    if status in (RunStatus.CANCELED, RunStatus.QUEUED, RunStatus.DELAYED):
        return "$text-muted"
    if status is RunStatus.WAITING:
        return "$accent"
    return "$error" if status.is_final else "$primary"


def render_trace(
    run: Run,
    now: datetime,
    width: int,
    styles: dict[str, str],
    children: Sequence[RunSummary] = (),
    trace: RunTrace | None = None,
) -> Text:
    """The waterfall as text ``width`` cells wide.

    Args:
        run: the run.
        children: the runs it triggered.
        trace: the run's recorded spans, if any.
        now: where open spans end.
        width: cells available.
        styles: theme colours by variable name (``$error`` → ``#ff0000``).
    """
    spans = spans_of(run, children, trace)
    origin = run.created_at
    end = max([s.end or now for s in spans] + [origin])
    total_s = max((end - origin).total_seconds(), 0.001)
    bar_width = max(10, width - LABEL_WIDTH - TIME_WIDTH - 2)
    text = Text()
    axis = f"0{' ' * (bar_width - len(duration(total_s)) - 1)}{duration(total_s)}"
    text.append(" " * LABEL_WIDTH + " " + axis + "\n", style="dim")
    for span in spans:
        stop = span.end or now
        left = int((span.start - origin).total_seconds() / total_s * bar_width)
        right = int((stop - origin).total_seconds() / total_s * bar_width)
        left = min(max(left, 0), bar_width - 1)
        length = max(1, right - left)
        label = ("  " * span.depth + span.label)[:LABEL_WIDTH].ljust(LABEL_WIDTH)
        colour = _resolve(span.style, styles)
        seconds = (stop - span.start).total_seconds()
        suffix = "…" if span.end is None else ""
        text.append(label + " ", style="bold" if span.depth == 0 else "")
        text.append(" " * left)
        cells = min(length, bar_width - left)
        bar = list(("░" if span.hollow else "█") * cells)
        for mark in span.marks:  # a log line: a mark where it happened on its bar
            at = int((mark - origin).total_seconds() / total_s * bar_width) - left
            if 0 <= at < cells:
                bar[at] = "◆"
        text.append("".join(bar), style=colour)
        text.append(" " * max(0, bar_width - left - length))
        text.append(f" {duration(seconds) + suffix:>{TIME_WIDTH}}\n", style="dim")
    return text


def _resolve(style: str, styles: dict[str, str]) -> str:
    words = []
    for word in style.split():
        words.append(styles.get(word[1:], "default") if word.startswith("$") else word)
    return " ".join(words)


class TraceView(Static):
    """The waterfall of one run, redrawn when the run changes, the width changes or time passes."""

    def __init__(self, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.run: Run | None = None
        self.child_runs: list[RunSummary] = []
        self.trace: RunTrace | None = None

    def show(
        self,
        run: Run,
        children: Sequence[RunSummary] | None = None,
        trace: RunTrace | None = None,
    ) -> None:
        """Draw this run (its child runs and spans; None keeps those drawn)."""
        self.run = run
        if children is not None:
            self.child_runs = list(children)
        if trace is not None:
            self.trace = trace
        self.redraw()

    def redraw(self) -> None:
        """Draw again (time moved, or the size changed)."""
        if self.run is None:
            return
        styles = dict(self.app.theme_variables)
        styles["text-muted"] = styles.get("foreground-darken-2", "grey50")
        width = max(40, self.size.width or 100)
        self.update(
            render_trace(self.run, self.clock(), width, styles, self.child_runs, self.trace)
        )

    def on_resize(self) -> None:
        self.redraw()
