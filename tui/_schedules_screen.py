"""The Schedules screen: the environment's cron schedules, declarative and imperative, with
their next and last tick; activate or deactivate one after confirmation."""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.binding import Binding, BindingType
from textual.content import Content

from ember._errors import EmberError
from ember._schedule_types import Schedule
from ember._schedules import Schedules
from ember.tui._dialogs import ConfirmDialog
from ember.tui._format import ago
from ember.tui._table_screen import Row, TableScreen

_ACTIVE = "[$success]● active[/]"
_INACTIVE = "[$warning]○ off[/]"


class SchedulesScreen(TableScreen):
    """Schedules, oldest first; ``a`` activates or deactivates the one under the cursor."""

    MODE = "schedules"
    COLUMNS = (
        "Schedule",
        "Task",
        "Cron",
        "Timezone",
        "Next run",
        "Last run",
        "Active",
        "Type",
        "External id",
    )
    WIDTHS: ClassVar[dict[str, int]] = {"Active": 10}
    POLL_S = 5.0
    BINDINGS: ClassVar[list[BindingType]] = [Binding("a", "toggle_active", "(De)activate")]

    def __init__(self) -> None:
        super().__init__()
        self.schedules: list[Schedule] = []

    async def fetch(self) -> None:
        listing = await Schedules(self.ember.client).list()
        self.schedules = listing.data

    def rows(self) -> list[Row]:
        now = self.ember.clock()
        return [
            (
                s.id,
                (
                    s.id,
                    s.task,
                    s.cron,
                    s.timezone,
                    ago(s.next_run, now) if s.active else "—",
                    ago(s.last_run, now),
                    Content.from_markup(_ACTIVE if s.active else _INACTIVE),
                    s.type.lower(),
                    s.external_id or "—",
                ),
            )
            for s in self.schedules
        ]

    def summary(self) -> str:
        env = self.ember.settings.env
        if not self.schedules:
            return (
                f"No schedules in {env}: declare one with @schedules.task(cron=...) or "
                "create one with schedules.create(...)."
            )
        active = sum(1 for s in self.schedules if s.active)
        return f"{len(self.schedules)} schedules in {env} · {active} active · a (de)activate"

    def action_toggle_active(self) -> None:
        """Deactivate the schedule under the cursor, or activate it, after confirmation."""
        key = self.current_key()
        schedule = next((s for s in self.schedules if s.id == key), None)
        if schedule is None:
            return
        verb = "Deactivate" if schedule.active else "Activate"
        detail = (
            "It stops firing until activated again."
            if schedule.active
            else "It fires again from its next tick; ticks missed while inactive are not run."
        )

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._toggle(schedule.id, not schedule.active)

        self.app.push_screen(
            ConfirmDialog(
                f"{verb} {schedule.id} ({schedule.task}, {schedule.cron})?", detail, verb
            ),
            confirmed,
        )

    @work(group="schedule-action")
    async def _toggle(self, schedule_id: str, activate: bool) -> None:
        calls = Schedules(self.ember.client)
        try:
            if activate:
                done = await calls.activate(schedule_id)
            else:
                done = await calls.deactivate(schedule_id)
        except EmberError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.notify(f"{done.id} is {'active' if done.active else 'inactive'}.")
        self.reload()
