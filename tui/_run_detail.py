"""The run detail screen: overview, attempts, history, live logs and the trace of one run.

It loads the run in full, then follows it: every change of the run on the event stream
reloads it (debounced), and its log lines are appended as they are logged.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import DataTable, Static, TabbedContent, TabPane

from ember._errors import EmberError
from ember._trace_types import RunTrace
from ember._types import LogEvent, Run, RunStatus, RunSummary
from ember.tui._base import EmberScreen
from ember.tui._dialogs import ConfirmDialog, InputDialog
from ember.tui._format import ago, duration, size, span, stamp, status_markup
from ember.tui._logs import LogView
from ember.tui._overview import Overview
from ember.tui._trace import TraceView

RELOAD_DEBOUNCE_S = 0.05
CHILDREN_SHOWN = 100


class RunDetailScreen(EmberScreen):
    """One run, live. Keys: o a h l w switch tabs; c r s act; p P O jump to related runs;
    enter on a child run in the trace tab opens it.

    Args:
        run_id: the run to show.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("o", "tab('overview')", "Overview", show=False),
        Binding("a", "tab('attempts')", "Attempts", show=False),
        Binding("h", "tab('history')", "History", show=False),
        Binding("l", "tab('logs')", "Logs", show=False),
        Binding("w", "tab('trace')", "Trace", show=False),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "replay", "Replay"),
        Binding("s", "reschedule", "Reschedule"),
        Binding("p", "jump('parent')", "Parent"),
        Binding("P", "jump('root')", "Root"),
        Binding("O", "jump('origin')", "Replayed from"),
        Binding("y", "copy_id", "Copy id", show=False),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.run: Run | None = None
        self.child_runs: list[RunSummary] = []
        self.trace: RunTrace | None = None
        self._reload_pending = False

    def compose_body(self) -> ComposeResult:
        yield Static(f"loading {self.run_id}…", id="run-title")
        with TabbedContent(initial="overview"):
            with TabPane("Overview \\[o]", id="overview"), VerticalScroll():
                yield Overview(self.ember.clock)
            with TabPane("Attempts \\[a]", id="attempts"):
                yield DataTable(id="attempt-table", cursor_type="row", zebra_stripes=True)
            with TabPane("History \\[h]", id="history"), VerticalScroll():
                yield Static(id="timeline")
            with TabPane("Logs \\[l]", id="logs"):
                yield LogView(self.run_id, self.ember.clock, id="log-view")
            with TabPane("Trace \\[w]", id="trace"), VerticalScroll():
                yield TraceView(self.ember.clock, id="trace-view")
                yield Static("", id="children-title", classes="section-title")
                yield DataTable(id="child-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.MODE = self.ember.current_mode
        table = self.query_one("#attempt-table", DataTable)
        table.add_columns("#", "Status", "Version", "PID", "Started", "Took", "CPU", "Peak RSS")
        table.add_column("Error", width=60)
        children = self.query_one("#child-table", DataTable)
        children.add_columns("Status", "Task", "Run", "Created", "Took")
        self.ember.run_changed.subscribe(self, self._on_run, immediate=True)
        self.ember.log_received.subscribe(self, self._on_log, immediate=True)
        self.set_interval(1.0, self._tick)
        super().on_mount()

    # -- loading ------------------------------------------------------------------------

    def reload(self) -> None:
        """Fetch the run (and, the first time, its logs)."""
        self._load()
        self.query_one(LogView).load()

    @work(exclusive=True, group="run-load")
    async def _load(self) -> None:
        self._reload_pending = False
        try:
            run = await self.runs.retrieve(self.run_id)
            page = await self.runs.list(parent=self.run_id, limit=CHILDREN_SHOWN)
            trace = await self._fetch_trace()
        except EmberError as exc:
            self.query_one("#run-title", Static).update(f"[$error]{exc}[/]")
            return
        self.run = run
        self.child_runs = sorted(page.data, key=lambda child: (child.created_at, child.id))
        if not self.is_mounted:
            return  # the screen closed while the answers came
        self.trace = trace
        self._show(run)
        self.refresh_bindings()

    def _on_run(self, run: RunSummary) -> None:
        related = run.id == self.run_id or run.parent_run_id == self.run_id
        if related and not self._reload_pending:
            self._reload_pending = True
            self.set_timer(RELOAD_DEBOUNCE_S, self._load)

    def _on_log(self, event: LogEvent) -> None:
        if event.run_id == self.run_id:
            self.query_one(LogView).add(event.line)

    def _tick(self) -> None:
        if self.run is not None and not self.run.is_final:
            self._show_title(self.run)
            self.query_one(TraceView).redraw()
            self._load_trace()  # spans arrive while the run executes, without a run event

    @work(exclusive=True, group="trace-load")
    async def _load_trace(self) -> None:
        trace = await self._fetch_trace()
        if trace is not None and self.run is not None and self.is_mounted:
            self.trace = trace
            self.query_one(TraceView).show(self.run, trace=trace)

    async def _fetch_trace(self) -> RunTrace | None:
        """The run's spans; None where there are none to get (a remote's mirrored run)."""
        try:
            return await self.runs.trace(self.run_id)
        except EmberError:
            return None  # the waterfall falls back to the attempts

    # -- showing ------------------------------------------------------------------------

    def _show(self, run: Run) -> None:
        self._show_title(run)
        self.query_one(Overview).show(run)
        self._show_attempts(run)
        self._show_timeline(run)
        self.query_one(TraceView).show(run, self.child_runs, self.trace)
        self._show_children()

    def _show_title(self, run: Run) -> None:
        now = self.ember.clock()
        took = duration(span(run.started_at, run.finished_at, now))
        self.query_one("#run-title", Static).update(
            f" {status_markup(run.status)}  [b]{run.task_id}[/b]  {run.id}  "
            f"[$text-muted]version[/] {run.version or '—'}  "
            f"[$text-muted]attempt[/] {run.attempt_count}/{run.max_attempts}  "
            f"[$text-muted]created[/] {ago(run.created_at, now)}  [$text-muted]took[/] {took}"
        )

    def _show_attempts(self, run: Run) -> None:
        table = self.query_one("#attempt-table", DataTable)
        table.clear()
        now = self.ember.clock()
        for attempt in run.attempts:
            error = attempt.error
            table.add_row(
                str(attempt.number),
                attempt.status.lower(),
                attempt.version or "—",
                str(attempt.pid or "—"),
                ago(attempt.started_at, now),
                duration(span(attempt.started_at, attempt.finished_at, now)),
                "—" if attempt.cpu_s is None else f"{attempt.cpu_s:.2f}s",
                size(attempt.peak_rss_bytes),
                f"{error.name}: {error.message}" if error else "",
            )

    def _show_children(self) -> None:
        table = self.query_one("#child-table", DataTable)
        current = table.cursor_row
        table.clear()
        now = self.ember.clock()
        for child in self.child_runs:
            table.add_row(
                Content.from_markup(status_markup(child.status)),
                child.task_id,
                child.id,
                ago(child.created_at, now),
                duration(span(child.started_at, child.finished_at, now)),
                key=child.id,
            )
        table.display = bool(self.child_runs)
        if self.child_runs:
            table.move_cursor(row=min(current, len(self.child_runs) - 1), animate=False)
        more = "+" if len(self.child_runs) >= CHILDREN_SHOWN else ""
        self.query_one("#children-title", Static).update(
            f"Child runs ({len(self.child_runs)}{more}) · enter opens one"
            if self.child_runs
            else "No child runs"
        )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "child-table" and event.row_key.value is not None:
            self.ember.open_run(str(event.row_key.value))

    def _show_timeline(self, run: Run) -> None:
        lines = []
        for snapshot in run.snapshots:
            offset = (snapshot.created_at - run.created_at).total_seconds()
            attempt = f"attempt {snapshot.attempt}" if snapshot.attempt else ""
            lines.append(
                f"[$text-muted]{stamp(snapshot.created_at)}  +{offset:8.3f}s[/]  "
                f"[$accent]●[/] [b]{snapshot.status:<26}[/b] {attempt:<10} "
                f"[$text-muted]{snapshot.description}[/]"
            )
        self.query_one("#timeline", Static).update("\n".join(lines) or "no history yet")

    # -- actions ------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        run = self.run
        if run is None:
            return action in ("tab", "pop_screen", "copy_id") or None
        if action == "cancel":
            return not run.is_final
        if action == "reschedule":
            return run.status is RunStatus.DELAYED
        if action == "jump":
            target = {
                "parent": run.parent_run_id,
                "root": run.root_run_id if run.root_run_id != run.id else None,
                "origin": run.replayed_from,
            }[str(parameters[0])]
            return target is not None
        return True

    def action_tab(self, tab: str) -> None:
        """Show a tab."""
        self.query_one(TabbedContent).active = tab

    def action_cancel(self) -> None:
        """Cancel this run (it is stopped if executing)."""

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._act("cancel")

        self.app.push_screen(
            ConfirmDialog(f"Cancel {self.run_id}?", "A running attempt is stopped.", "Cancel run"),
            confirmed,
        )

    def action_replay(self) -> None:
        """Replay this run (for a final run this is also 'retry now') and follow the new one."""
        from ember.tui._replay import ReplayDialog

        self.app.push_screen(ReplayDialog(self.run_id))

    def action_reschedule(self) -> None:
        """Move a delayed run's start."""

        def chosen(value: str | None) -> None:
            if value:
                self._act("reschedule", value)

        self.app.push_screen(
            InputDialog(
                "Reschedule: start after",
                "A duration from now (90s, 10m, 2h) or a date (2025-01-15T12:00:00Z).",
                "10m",
                check=lambda text: None if text else "type a duration or a date",
            ),
            chosen,
        )

    @work(group="run-action")
    async def _act(self, action: str, value: str = "") -> None:
        try:
            if action == "cancel":
                await self.runs.cancel(self.run_id)
                self.notify(f"Canceled {self.run_id}")
            else:
                await self.runs.reschedule(self.run_id, value)
                self.notify(f"Rescheduled {self.run_id} to start after {value}")
        except EmberError as exc:
            self.notify(str(exc), severity="error", timeout=8)
        self._load()

    def action_jump(self, which: str) -> None:
        """Open the parent, root or original run."""
        run = self.run
        if run is None:
            return
        target = {
            "parent": run.parent_run_id,
            "root": run.root_run_id,
            "origin": run.replayed_from,
        }[which]
        if target:
            self.ember.open_run(target)

    def action_copy_id(self) -> None:
        """Copy the run id to the clipboard (OSC 52)."""
        self.app.copy_to_clipboard(self.run_id)
        self.notify(f"Copied {self.run_id}")
