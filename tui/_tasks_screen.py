"""The Tasks screen: the tasks of each version with their queue, retry and limits, and a
test panel (enter) to trigger one with a payload and follow the run."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Select, Static

from ember._client import Call
from ember._errors import EmberError
from ember._types import TaskInfo, VersionInfo, VersionList
from ember.tui._base import EmberScreen
from ember.tui._format import duration


def retry_text(task: TaskInfo) -> str:
    """``3× 1s→60s ×2`` : attempts, first and largest backoff, factor."""
    retry = task.retry
    if retry.max_attempts <= 1:
        return "no retry"
    jitter = " ±" if retry.randomize else ""
    return (
        f"{retry.max_attempts}× {duration(retry.min_timeout_s)}→{duration(retry.max_timeout_s)}"
        f" ×{retry.factor:g}{jitter}"
    )


class TasksScreen(EmberScreen):
    """Tasks per version; ``v`` picks the version, enter opens the test panel."""

    MODE = "tasks"
    AUTO_FOCUS = "#task-table"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,t", "test", "Test task"),
        Binding("v", "pick_version", "Version"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[VersionInfo] = []
        self.version: VersionInfo | None = None

    def compose_body(self) -> ComposeResult:
        yield Select[str]([], prompt="version", id="version-select", allow_blank=True)
        yield DataTable(id="task-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="task-detail", classes="status-line")

    def on_mount(self) -> None:
        table = self.query_one("#task-table", DataTable)
        table.add_columns(
            "Task", "Queue", "Limit", "Retry", "Max duration", "TTL", "Machine", "File"
        )
        super().on_mount()
        table.focus()

    def reload(self) -> None:
        """Fetch the versions (each carries its tasks)."""
        self._load()

    @work(exclusive=True, group="tasks")
    async def _load(self) -> None:
        try:
            listing = await self.ember.client.request(Call("GET", "/api/v1/versions", VersionList))
        except EmberError as exc:
            self.query_one("#task-detail", Static).update(str(exc))
            return
        self.versions = listing.data
        keep = self.version.id if self.version else None
        chosen = next((v for v in self.versions if v.id == keep), None) or next(
            (v for v in self.versions if v.is_current), self.versions[0] if self.versions else None
        )
        select = self.query_one("#version-select", Select)
        with self.prevent(Select.Changed):
            select.set_options(
                (f"{v.id}{'  ● current' if v.is_current else ''}  ({len(v.tasks)} tasks)", v.id)
                for v in self.versions
            )
            if chosen is not None:
                select.value = chosen.id
        self._show(chosen)

    def _show(self, version: VersionInfo | None) -> None:
        self.version = version
        table = self.query_one("#task-table", DataTable)
        table.clear()
        detail = self.query_one("#task-detail", Static)
        if version is None:
            detail.update(
                f"No version in {self.ember.settings.env} yet: run `ember dev` in your project "
                "(or `ember deploy`) to register one."
            )
            return
        for task in version.tasks:
            table.add_row(
                task.id,
                task.queue,
                str(task.queue_concurrency_limit or "∞"),
                retry_text(task),
                duration(task.max_duration_s),
                str(task.ttl) if task.ttl is not None else "—",
                task.machine or "—",
                f"{task.file_path}:{task.export_name}",
                key=task.id,
            )
        state = "current" if version.is_current else "not current"
        error = f" · failed: {version.error}" if version.error else ""
        detail.update(
            f"version {version.id} ({state}) · {len(version.tasks)} tasks{error} · "
            "enter: test a task · v: another version"
        )

    def on_select_changed(self, event: Select.Changed) -> None:
        chosen = next((v for v in self.versions if v.id == event.value), None)
        if chosen is not None:
            self._show(chosen)
            self.query_one("#task-table", DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_test()

    def action_pick_version(self) -> None:
        """Open the version list."""
        select = self.query_one("#version-select", Select)
        select.focus()
        select.expanded = True

    def action_test(self) -> None:
        """Open the test panel for the task under the cursor."""
        from ember.tui._test_panel import TaskTestPanel

        table = self.query_one("#task-table", DataTable)
        if self.version is None or not table.row_count:
            return
        row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        task = next(t for t in self.version.tasks if t.id == row_key.value)
        pin = None if self.version.is_current else self.version.id
        self.app.push_screen(TaskTestPanel(task, pin))
