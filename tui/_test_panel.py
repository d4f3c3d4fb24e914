"""The test panel: trigger a task with a payload from an editor, then follow the new run.

The editor starts with the payload of the task's latest run when there is one (as
Trigger.dev's test page offers recent payloads), else ``{}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, Static, TextArea

from ember._errors import EmberError
from ember._types import TaskInfo
from ember.tui._base import EmberScreen
from ember.tui._json import pretty_json
from ember.tui._json_editor import JsonEditor
from ember.tui._tasks_screen import retry_text


class TaskTestPanel(EmberScreen):
    """Trigger ``task``; ctrl+s runs it and opens the run.

    Args:
        task: the task to test.
        version: pin the run to this version (None: the current one).
    """

    AUTO_FOCUS = "JsonEditor"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "trigger", "Run test", priority=True),
        Binding("escape", "app.pop_screen", "Back"),
    ]

    def __init__(self, task: TaskInfo, version: str | None) -> None:
        super().__init__()
        self.task_info = task
        self.version = version

    def compose_body(self) -> ComposeResult:
        task = self.task_info
        pinned = f"version {self.version} (pinned)" if self.version else "the current version"
        yield Static(
            f" Test [b]{task.id}[/b] · queue {task.queue} · retry {retry_text(task)} · "
            f"runs on {pinned}",
            classes="pane-title",
        )
        with Horizontal(id="test-body"):
            with Vertical(id="test-payload"):
                yield Label("Payload (JSON)")
                yield JsonEditor("{}", id="payload-editor")
                yield Static("", id="payload-problem", classes="dialog-error", markup=False)
            with Vertical(id="test-options"):
                yield Label("Tags (comma-separated)")
                yield Input(id="opt-tags", placeholder="user_42, test")
                yield Label("Delay")
                yield Input(id="opt-delay", placeholder="e.g. 30s, 1h or a date")
                yield Label("Idempotency key")
                yield Input(id="opt-idempotency", placeholder="optional")
                yield Label("Max attempts")
                yield Input(id="opt-attempts", placeholder=str(task.retry.max_attempts))
                yield Static("ctrl+s runs the test and follows the run", classes="muted")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(JsonEditor).focus()

    def reload(self) -> None:
        """Fill the editor with the latest payload of this task."""
        self._prefill()

    @work(exclusive=True, group="prefill")
    async def _prefill(self) -> None:
        try:
            page = await self.runs.list(task=self.task_info.id, limit=1)
            if not page.data:
                return
            run = await self.runs.retrieve(page.data[0].id)
        except EmberError:
            return
        editor = self.query_one(JsonEditor)
        if editor.text.strip() == "{}":
            editor.load_text(pretty_json(run.payload))

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        problem = self.query_one(JsonEditor).problem
        self.query_one("#payload-problem", Static).update(
            f"not JSON yet: {problem}" if problem else ""
        )

    def _options(self) -> dict[str, Any]:
        def text(widget_id: str) -> str:
            return self.query_one(widget_id, Input).value.strip()

        options: dict[str, Any] = {}
        if tags := [t.strip() for t in text("#opt-tags").split(",") if t.strip()]:
            options["tags"] = tags
        if delay := text("#opt-delay"):
            options["delay"] = delay
        if key := text("#opt-idempotency"):
            options["idempotency_key"] = key
        if attempts := text("#opt-attempts"):
            options["max_attempts"] = int(attempts)
        if self.version:
            options["version"] = self.version
        return options

    def action_trigger(self) -> None:
        """Trigger the task with the editor's payload and open the run."""
        editor = self.query_one(JsonEditor)
        if editor.problem:
            self.notify(f"The payload is not valid JSON: {editor.problem}", severity="error")
            return
        try:
            options = self._options()
        except ValueError:
            self.notify("Max attempts must be a whole number.", severity="error")
            return
        self._trigger(editor.value(), options)

    @work(exclusive=True, group="trigger")
    async def _trigger(self, payload: Any, options: dict[str, Any]) -> None:
        try:
            handle = await self.tasks.trigger(self.task_info.id, payload, **options)
        except EmberError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        cached = " (existing run: idempotency key matched)" if handle.is_cached else ""
        self.notify(f"Triggered {self.task_info.id} → {handle.id}{cached}")
        self.ember.open_run(handle.id)
