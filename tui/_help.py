"""The help screen: every key of the screen you came from, and how the runs filter reads."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Label, Static

FILTER_HELP = """\
Runs filter (/ on the Runs screen), words separated by spaces:
  status:failed,crashed   any of these statuses; also status:active, status:problem
  task:send-email         any of these tasks (comma-separated)
  tag:user_42             runs carrying any of these tags
  version:20250115.1      runs locked to that version
  since:1h  until:2025-01-15   creation time: a duration back from now, or a date
  env:prod                switch environment
  other words             search the loaded runs' ids, tasks, versions and tags
  run_…                   a whole run id opens that run
Filters with a colon run on the daemon over every run; search words only over loaded ones."""

_KEY_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "colon": ":",
    "space": "space",
    "escape": "esc",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
}


def _key(key: str) -> str:
    return _KEY_NAMES.get(key, key.replace("ctrl+", "^"))


class HelpScreen(ModalScreen[None]):
    """Keys and filter syntax; any of esc, q, ? closes it.

    Args:
        screen: the screen whose keys to list.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss_help", "Close")
    ]

    def __init__(self, screen: Screen[object]) -> None:
        super().__init__()
        self._from = screen

    def compose(self) -> ComposeResult:
        table = Table(box=None, padding=(0, 2), show_header=True, header_style="bold")
        table.add_column("Key", style="bold")
        table.add_column("Does")
        table.add_column("Where", style="dim")
        seen: set[tuple[str, str]] = set()
        for key, active in self._from.active_bindings.items():
            binding = active.binding
            description = binding.description or binding.action
            if (key, description) in seen or not description:
                continue
            seen.add((key, description))
            where = type(active.node).__name__.replace("Screen", "").replace("EmberApp", "global")
            table.add_row(_key(key), description, where or "screen")
        with VerticalScroll(classes="dialog help"):
            yield Label("Keys", classes="dialog-title")
            yield Static(table, id="help-keys")
            yield Static(
                "Mouse: click a row to move there, double-click to open, click the first "
                "column to select; click the tabs in the header. ^p or : opens the command "
                "palette.",
                classes="dialog-detail",
            )
            yield Static(FILTER_HELP, classes="dialog-detail", markup=False)

    def action_dismiss_help(self) -> None:
        """Close the help."""
        self.dismiss()
