"""LogView: a run's log lines, the stored ones first, then live ones as they are logged."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import work
from textual.content import Content
from textual.widgets import RichLog

from ember._errors import EmberError
from ember._runs import Runs
from ember._types import LogLine
from ember.tui._format import Clock

if TYPE_CHECKING:
    from ember.tui._app import EmberApp

LEVEL_STYLES = {
    "debug": "$text-muted",
    "info": "$primary",
    "log": "$primary",
    "warn": "$warning",
    "warning": "$warning",
    "error": "$error",
}


class LogView(RichLog):
    """Follows one run's logs; scrolls with new lines unless you scrolled up.

    Args:
        run_id: whose logs.
        clock: unused for now but kept for symmetry with other views.
    """

    def __init__(self, run_id: str, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id, wrap=True, markup=False, auto_scroll=True)
        self.run_id = run_id
        self.clock = clock
        self._seen: set[tuple[object, ...]] = set()
        self._pending: list[LogLine] | None = []  # live lines while the stored ones load
        self.count = 0

    def load(self) -> None:
        """Fetch the stored lines (again: after a reconnection some may be new)."""
        self._pending = self._pending if self._pending is not None else []
        self._fetch()

    @work(exclusive=True, group="logs")
    async def _fetch(self) -> None:
        app = cast("EmberApp", self.app)
        try:
            page = await Runs(app.client).logs(self.run_id)
        except EmberError as exc:
            self.write(Content.from_markup("[$error]$error[/]", error=str(exc)))
            return
        pending, self._pending = self._pending or [], None
        for line in [*page.data, *pending]:
            self._write(line)
        if not self.count:
            self.write(Content.styled("no log lines yet: they appear here as the run logs", "dim"))

    def add(self, line: LogLine) -> None:
        """Append a line from the event stream."""
        if self._pending is not None:
            self._pending.append(line)
        else:
            self._write(line)

    def _write(self, line: LogLine) -> None:
        key = (line.ts, line.attempt, line.level, line.message)
        if key in self._seen:
            return
        self._seen.add(key)
        self.count += 1
        attrs = " ".join(f"{k}={v!r}" for k, v in line.attrs.items())
        style = LEVEL_STYLES.get(line.level.lower(), "")
        self.write(
            Content.assemble(
                (line.ts.strftime("%H:%M:%S.%f")[:-3], "$text-muted"),
                (f" #{line.attempt} ", "$text-muted"),
                (f"{line.level.upper():<5}", style),
                " ",
                line.message,
                (f" {attrs}" if attrs else "", "$text-muted"),
            )
        )
