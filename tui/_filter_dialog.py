"""The filter dialog: pick statuses, task, tags, version and time range from lists."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, SelectionList

from ember._client import Call
from ember._errors import EmberError
from ember._types import RunStatus, VersionList
from ember.tui._format import status_cell
from ember.tui._query import QueryError, RunQuery

if TYPE_CHECKING:
    from ember.tui._app import EmberApp

TIME_RANGES = (
    ("any time", ""),
    ("last 15 minutes", "15m"),
    ("last hour", "1h"),
    ("last 6 hours", "6h"),
    ("last 24 hours", "24h"),
    ("last 7 days", "7d"),
    ("last 30 days", "30d"),
)


class FilterDialog(ModalScreen[RunQuery | None]):
    """Edit the runs filter with lists; ctrl+s applies.

    Args:
        query: the filter in force.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss_none", "Cancel"),
        Binding("ctrl+s", "apply", "Apply", priority=True),
    ]

    def __init__(self, query: RunQuery) -> None:
        super().__init__()
        self.start = query

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def compose(self) -> ComposeResult:
        query = self.start
        since = query.since or ""
        ranges = list(TIME_RANGES)
        if since and since not in {value for _, value in ranges}:
            ranges.append((f"since {since}", since))
        with Vertical(classes="dialog filters"):
            yield Label("Filter runs", classes="dialog-title")
            with Horizontal(id="filter-columns"):
                yield SelectionList[RunStatus](
                    *((status_cell(s), s, s in query.statuses) for s in RunStatus),
                    id="filter-status",
                )
                with Vertical():
                    yield Label("Task")
                    yield Select[str]([], prompt="any task", id="filter-task")
                    yield Label("Version")
                    yield Select[str]([], prompt="any version", id="filter-version")
                    yield Label("Created")
                    yield Select[str](
                        [(label, value or "any") for label, value in ranges],
                        value=since or "any",
                        allow_blank=False,
                        id="filter-time",
                    )
                    yield Label("Tags (any of, comma-separated)")
                    yield Input(",".join(query.tags), id="filter-tags")
                    yield Label("Search loaded runs")
                    yield Input(" ".join(query.words), id="filter-words")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Clear", id="clear")
                yield Button("Apply (^s)", variant="primary", id="apply")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()
        self._load_choices()

    @work
    async def _load_choices(self) -> None:
        try:
            versions = await self.ember.client.request(Call("GET", "/api/v1/versions", VersionList))
        except EmberError:
            return
        tasks = sorted({t.id for v in versions.data for t in v.tasks} | set(self.start.tasks))
        task_select = self.query_one("#filter-task", Select)
        task_select.set_options((t, t) for t in tasks)
        if self.start.tasks:
            task_select.value = self.start.tasks[0]
        version_select = self.query_one("#filter-version", Select)
        version_select.set_options(
            (f"{v.id}{' (current)' if v.is_current else ''}", v.id) for v in versions.data
        )
        if self.start.version:
            version_select.value = self.start.version

    def _query(self) -> RunQuery:
        task = self.query_one("#filter-task", Select).value
        version = self.query_one("#filter-version", Select).value
        since = self.query_one("#filter-time", Select).value
        tags = self.query_one("#filter-tags", Input).value
        words = self.query_one("#filter-words", Input).value
        return dataclasses.replace(
            self.start,
            statuses=tuple(self.query_one(SelectionList).selected),
            tasks=(str(task),) if isinstance(task, str) else (),
            version=str(version) if isinstance(version, str) else None,
            since=None if since in ("any", Select.BLANK) else str(since),
            tags=tuple(t.strip() for t in tags.split(",") if t.strip()),
            words=tuple(words.split()),
        )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "clear":
            self.dismiss(RunQuery())
        else:
            self.action_apply()

    def action_apply(self) -> None:
        """Use these filters."""
        query = self._query()
        try:
            RunQuery.parse(str(query))
        except QueryError as exc:
            self.notify(str(exc), severity="error")
            return
        self.dismiss(query)

    def action_dismiss_none(self) -> None:
        """Keep the filters as they were."""
        self.dismiss(None)
