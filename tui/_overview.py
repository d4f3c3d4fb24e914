"""The run overview: properties, the error with its traceback, payload, output and metadata."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from ember._types import Run
from ember.tui._format import Clock, ago, duration, span, stamp, status_markup
from ember.tui._json import json_content, traceback_content


def _link(run_id: str | None, which: str) -> str:
    if not run_id:
        return "—"
    return f"[@click=screen.jump('{which}')][u]{run_id}[/u][/]"


class Overview(Widget):
    """Everything about one run on one scrollable page."""

    DEFAULT_CSS = """
    Overview { height: auto; padding: 0 1; }
    Overview Static { height: auto; }
    Overview #error-stack { background: $error 10%; padding: 0 1; }
    Overview .json { background: $surface; padding: 0 1; }
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def compose(self) -> ComposeResult:
        yield Static(id="props")
        yield Static("Error", classes="section-title error-part")
        yield Static(id="error-message", classes="error-part")
        yield Static(id="error-stack", classes="error-part")
        yield Static("Payload", classes="section-title")
        yield Static(id="payload", classes="json")
        yield Static("Output", classes="section-title output-part")
        yield Static(id="output", classes="json output-part")
        yield Static("Metadata", classes="section-title metadata-part")
        yield Static(id="metadata", classes="json metadata-part")

    def show(self, run: Run) -> None:
        """Fill the page from a run."""
        now = self.clock()
        rows = [
            ("Status", status_markup(run.status), "Task", f"[b]{run.task_id}[/b]"),
            ("Run", run.id, "Environment", run.env),
            ("Version", run.version or "—", "Pinned", run.pinned_version or "—"),
            (
                "Created",
                f"{stamp(run.created_at)} ({ago(run.created_at, now)})",
                "Queue",
                run.queue + (f" · key {run.concurrency_key}" if run.concurrency_key else ""),
            ),
            (
                "Started",
                stamp(run.started_at),
                "Attempts",
                f"{run.attempt_count}/{run.max_attempts}",
            ),
            (
                "Finished",
                stamp(run.finished_at),
                "Duration",
                duration(span(run.started_at, run.finished_at, now)),
            ),
            ("Delay until", stamp(run.delay_until), "Expires", stamp(run.expires_at)),
            ("Tags", ", ".join(run.tags) or "—", "Priority", f"{run.priority:g}"),
            (
                "Idempotency key",
                run.idempotency_key or "—",
                "Max duration",
                duration(run.max_duration_s),
            ),
            (
                "Parent",
                _link(run.parent_run_id, "parent"),
                "Root",
                _link(run.root_run_id if run.root_run_id != run.id else None, "root"),
            ),
            ("Replayed from", _link(run.replayed_from, "origin"), "Batch", run.batch_id or "—"),
        ]
        width = 16
        lines = [
            f"[$text-muted]{a:<{width}}[/]{b}"
            + " " * max(1, 48 - len(Content.from_markup(b)))
            + f"[$text-muted]{c:<{width}}[/]{d}"
            for a, b, c, d in rows
        ]
        self.query_one("#props", Static).update("\n".join(lines))
        error = run.error
        for part in self.query(".error-part"):
            part.display = error is not None
        if error is not None:
            self.query_one("#error-message", Static).update(
                Content.from_markup(
                    "[b $error]$name[/]: $message  [$text-muted]($code)[/]",
                    name=error.name,
                    message=error.message,
                    code=error.code,
                )
            )
            stack = self.query_one("#error-stack", Static)
            stack.display = bool(error.stack)
            stack.update(traceback_content(error.stack) if error.stack else "")
        self.query_one("#payload", Static).update(json_content(run.payload))
        has_output = bytes(run.output) not in (b"", b"null") or run.status.value == "COMPLETED"
        for part in self.query(".output-part"):
            part.display = has_output
        self.query_one("#output", Static).update(json_content(run.output))
        for part in self.query(".metadata-part"):
            part.display = run.metadata is not None
        if run.metadata is not None:
            self.query_one("#metadata", Static).update(json_content(run.metadata))
