"""TableScreen: a screen that shows one list from the API in a table and polls it while shown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from ember._errors import EmberError
from ember.tui._base import EmberScreen

Row = tuple[str, Sequence[object]]
"""A row's key and its cells."""


class TableScreen(EmberScreen):
    """Subclasses give :attr:`COLUMNS`, :meth:`fetch` and :meth:`rows`; polling is shared.

    The cursor stays on the same row (by key) across refreshes.
    """

    AUTO_FOCUS = "#main-table"
    COLUMNS: tuple[str, ...] = ()
    # Columns of coloured Content need a width: DataTable sizes columns by their title.
    WIDTHS: ClassVar[dict[str, int]] = {}
    POLL_S: float | None = 1.0

    def compose_body(self) -> ComposeResult:
        yield DataTable(id="main-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="table-status", classes="status-line")

    @property
    def table(self) -> DataTable[object]:
        """The table."""
        return self.query_one("#main-table", DataTable)

    def on_mount(self) -> None:
        for title in self.COLUMNS:
            self.table.add_column(title, width=self.WIDTHS.get(title))
        super().on_mount()
        self.table.focus()
        if self.POLL_S:
            self.set_interval(self.POLL_S, self._poll)

    def _poll(self) -> None:
        if self.is_current:
            self.reload()

    def reload(self) -> None:
        """Fetch and show the list."""
        self._load()

    @work(exclusive=True, group="table-load")
    async def _load(self) -> None:
        try:
            await self.fetch()
        except EmberError as exc:
            self.status(str(exc), error=True)
            return
        table = self.table
        current = self.current_key()
        table.clear()
        for key, cells in self.rows():
            table.add_row(*cells, key=key)
        if current is not None:
            for index, (key, _) in enumerate(self.rows()):
                if key == current:
                    table.move_cursor(row=index, animate=False)
                    break
        self.status(self.summary())

    def current_key(self) -> str | None:
        """The key of the row under the cursor."""
        table = self.table
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return str(key) if key is not None else None

    def status(self, text: str, error: bool = False) -> None:
        """Write the line under the table."""
        line = self.query_one("#table-status", Static)
        line.set_class(error, "error")
        line.update(text)

    async def fetch(self) -> None:
        """Fetch the data (raise EmberError to show it)."""

    def rows(self) -> list[Row]:
        """The rows to show, from the fetched data."""
        return []

    def summary(self) -> str:
        """The status line after a load."""
        return ""
