"""The Processes screen: the daemon's run processes with their run, CPU and memory."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.content import Content

from ember._client import Call
from ember._types import ProcessInfo, ProcessList
from ember.tui._format import size
from ember.tui._table_screen import Row, TableScreen

STATE_MARKUP = {
    "busy": "[$primary]● busy[/]",
    "idle": "[$success]○ idle[/]",
    "starting": "[$warning]◌ starting[/]",
    "parked": "[$accent]◆ parked[/]",
    "retiring": "[$text-muted]◌ retiring[/]",
}


class ProcessesScreen(TableScreen):
    """Run processes of every environment (they are the daemon's); enter opens the run."""

    MODE = "processes"
    COLUMNS = ("Worker", "PID", "State", "Env", "Version", "Run", "Task", "Runs", "CPU", "RSS")
    WIDTHS: ClassVar[dict[str, int]] = {"State": 10}
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "open_run", "Open run")]

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[ProcessInfo] = []

    async def fetch(self) -> None:
        listing = await self.ember.client.request(Call("GET", "/api/v1/processes", ProcessList))
        self.processes = sorted(listing.data, key=lambda p: p.worker_id)

    def rows(self) -> list[Row]:
        return [
            (
                str(p.worker_id),
                (
                    str(p.worker_id),
                    str(p.pid or "—"),
                    Content.from_markup(STATE_MARKUP.get(p.state, p.state)),
                    p.env,
                    p.version,
                    p.run_id or "—",
                    p.task_id or "—",
                    str(p.runs_done),
                    "—" if p.cpu_percent is None else f"{p.cpu_percent:.0f}%",
                    size(p.rss_bytes),
                ),
            )
            for p in self.processes
        ]

    def summary(self) -> str:
        if not self.processes:
            return "No run processes: they are forked from a version's zygote when runs start."
        busy = sum(1 for p in self.processes if p.state == "busy")
        rss = sum(p.rss_bytes or 0 for p in self.processes)
        return (
            f"{len(self.processes)} processes · {busy} busy · {size(rss)} resident · "
            "enter opens the run"
        )

    def on_data_table_row_selected(self) -> None:
        self.action_open_run()

    def action_open_run(self) -> None:
        """Open the run the process under the cursor executes."""
        key = self.current_key()
        process = next((p for p in self.processes if str(p.worker_id) == key), None)
        if process is not None and process.run_id:
            self.ember.open_run(process.run_id)
