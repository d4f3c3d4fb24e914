"""The dashboard's top-level screens, one Textual mode each (keys 1-8)."""

from __future__ import annotations

from textual.screen import Screen

from ember.tui._alerts_screen import AlertsScreen
from ember.tui._processes_screen import ProcessesScreen
from ember.tui._queues_screen import QueuesScreen
from ember.tui._runs_screen import RunsScreen
from ember.tui._schedules_screen import SchedulesScreen
from ember.tui._tasks_screen import TasksScreen
from ember.tui._tokens_screen import TokensScreen
from ember.tui._versions_screen import VersionsScreen

MODES: dict[str, type[Screen[None]]] = {
    "runs": RunsScreen,
    "tasks": TasksScreen,
    "queues": QueuesScreen,
    "versions": VersionsScreen,
    "processes": ProcessesScreen,
    "tokens": TokensScreen,
    "schedules": SchedulesScreen,
    "alerts": AlertsScreen,
}
