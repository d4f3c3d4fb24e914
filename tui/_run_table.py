"""RunTable: a virtual table of runs that paints only the lines on screen.

It draws with Textual's Line API: ``render_line`` is asked for the visible lines alone, so a
million-run store costs what a screenful costs. Rows come from a :class:`RunRows`, which the
runs screen fills page by page as the cursor nears the end (the table posts ``NeedMore``)
and keeps current from the event stream. Inserting a row above the cursor keeps the cursor
on the same run, so live runs do not push the row you are reading away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ember._types import RunStatus, RunSummary
from ember.tui._format import Clock, ago, duration, span, status_cell, status_styles
from ember.tui._rows import RunRows


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its title, its width (None: takes what is left) and its text."""

    title: str
    width: int | None
    text: Callable[[RunSummary, Clock], str]
    drop_rank: int = 0  # dropped first on narrow screens when higher


COLUMNS = (
    Column("", 1, lambda r, c: ""),
    Column("Status", 16, lambda r, c: status_cell(r.status)),
    Column("Task", 18, lambda r, c: r.task_id),
    Column("Run", 30, lambda r, c: r.id),
    Column("Version", 11, lambda r, c: r.version or "—", drop_rank=2),
    Column("Tags", None, lambda r, c: ", ".join(r.tags), drop_rank=3),
    Column("Started", 11, lambda r, c: ago(r.started_at, c())),
    Column("Duration", 8, lambda r, c: duration(span(r.started_at, r.finished_at, c()))),
    Column("Att", 3, lambda r, c: str(r.attempt_count or "—"), drop_rank=1),
)
MIN_FLEX = 8


def _fit(text: str, width: int) -> str:
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    return set_cell_size(text, width)


class RunTable(ScrollView, can_focus=True):
    """The runs, one per line, under a header that stays put.

    Args:
        clock: the app's clock, for relative times and running durations.
    """

    DEFAULT_CSS = """
    RunTable { overflow-x: hidden; background: $surface; }
    RunTable > .run-table--header { text-style: bold; color: $text-muted; }
    RunTable > .run-table--cursor { background: $block-cursor-background; }
    RunTable > .run-table--cursor-blurred { background: $block-cursor-blurred-background; }
    RunTable > .run-table--selected { background: $accent 25%; }
    RunTable > .run-table--dim { color: $text-muted; }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "run-table--header",
        "run-table--cursor",
        "run-table--cursor-blurred",
        "run-table--selected",
        "run-table--dim",
    }
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,g", "first", "First", show=False),
        Binding("end,G", "last", "Last loaded", show=False),
        Binding("enter", "open", "Open"),
        Binding("space", "toggle_select", "Select"),
    ]

    cursor: reactive[int] = reactive(0, always_update=True)

    class Opened(Message):
        """A run was opened (enter or double click)."""

        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

    class NeedMore(Message):
        """The cursor or the view is near the last loaded run: load the next page."""

    class SelectionChanged(Message):
        """The bulk selection changed."""

    def __init__(self, clock: Clock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.rows = RunRows()
        self.selected: set[str] = set()
        self.loading = False
        self.note = ""  # shown in the last line when there is nothing (more) to show
        self._styles: dict[RunStatus, Style] = {}
        self._columns: list[Column] = list(COLUMNS)
        self._widths: list[int] = []
        self._style_cache: dict[str, Style] = {}

    # -- data ---------------------------------------------------------------------------

    def reload(self, rows: RunRows) -> None:
        """Show other rows (new filters): cursor back to the top."""
        self.rows = rows
        self.selected.clear()
        self.cursor = 0
        self.scroll_to(y=0, animate=False)
        self.rows_changed()

    def rows_changed(self) -> None:
        """Rows were added: resize the virtual area and repaint."""
        extra = 1 if (self.loading or not self.rows.exhausted or not len(self.rows)) else 0
        self.virtual_size = Size(self.size.width, len(self.rows) + 1 + extra)
        self.refresh()
        self._check_more()

    def inserted(self, row: int) -> None:
        """A row was inserted at ``row``: keep the cursor and the view on the same runs."""
        following = self.cursor == 0 and self.scroll_y == 0
        # At the top with the cursor on the newest run, follow: new runs stay in view.
        # Otherwise keep the cursor, and the view if scrolled, on the runs being read.
        if len(self.rows) > 1 and row <= self.cursor and not following:
            self.set_reactive(RunTable.cursor, self.cursor + 1)
            if self.scroll_y > 0:
                self.scroll_to(y=self.scroll_y + 1, animate=False)
        self.rows_changed()

    def updated(self, row: int) -> None:
        """A row changed: repaint it if it is on screen."""
        self.refresh_lines(row + 1)

    @property
    def current(self) -> RunSummary | None:
        """The run under the cursor."""
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def targets(self) -> list[RunSummary]:
        """The selected runs, or the one under the cursor when none is selected."""
        if self.selected:
            return [self.rows.runs[i] for i in self.rows.loaded if i in self.selected]
        return [self.current] if self.current else []

    # -- painting -----------------------------------------------------------------------

    def on_mount(self) -> None:
        self._restyle()
        # After the refresh: the new theme's CSS is not applied yet when the signal fires.
        self.app.theme_changed_signal.subscribe(
            self, lambda _: self.call_after_refresh(self._restyle)
        )
        self.set_interval(1.0, self.refresh)  # relative times and running durations

    def _restyle(self) -> None:
        self._styles = status_styles(self.app.theme_variables)
        self._style_cache.clear()
        self.refresh()

    def _style(self, name: str) -> Style:
        # Resolving CSS to a Rich style costs more than painting the line: once per theme.
        style = self._style_cache.get(name)
        if style is None:
            style = self.rich_style if name == "base" else self.get_component_rich_style(name)
            self._style_cache[name] = style
        return style

    def on_resize(self, event: events.Resize) -> None:
        self._layout(event.size.width)
        self.rows_changed()

    def _layout(self, width: int) -> None:
        columns = list(COLUMNS)
        while True:
            fixed = sum((c.width or 0) + 1 for c in columns)
            flex = width - fixed - 1
            if flex >= MIN_FLEX or not any(c.drop_rank for c in columns):
                break
            columns.remove(max(columns, key=lambda c: c.drop_rank))
        self._columns = columns
        self._widths = [c.width if c.width is not None else max(flex, 0) for c in columns]

    def _page_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if not self._widths:
            self._layout(width)
        base = self._style("base")
        if y == 0:
            style = base + self._style("run-table--header")
            cells = zip(self._columns, self._widths, strict=True)
            text = " ".join(_fit(c.title, w) for c, w in cells)
            return Strip([Segment(_fit(text, width), style)], width)
        row = int(self.scroll_y) + y - 1
        if row >= len(self.rows):
            return self._note_line(row, width, base)
        return self._row_line(row, width, base)

    def _note_line(self, row: int, width: int, base: Style) -> Strip:
        if row != len(self.rows):
            return Strip.blank(width, base)
        if self.loading or not self.rows.exhausted:
            text = "  loading more runs…"
        else:
            text = "  " + (self.note or ("no runs match" if not len(self.rows) else "end of runs"))
        style = base + self._style("run-table--dim")
        return Strip([Segment(_fit(text, width), style)], width)

    def _row_line(self, row: int, width: int, base: Style) -> Strip:
        run = self.rows[row]
        if run.id in self.selected:
            base = base + self._style("run-table--selected")
        if row == self.cursor:
            name = "run-table--cursor" if self.has_focus else "run-table--cursor-blurred"
            base = base + self._style(name)
        segments = []
        for column, cell_width in zip(self._columns, self._widths, strict=True):
            if column.title == "":
                mark = "✓" if run.id in self.selected else " "
                segments.append(Segment(_fit(mark, cell_width) + " ", base))
                continue
            style = base + self._styles[run.status] if column.title == "Status" else base
            segments.append(Segment(_fit(column.text(run, self.clock), cell_width), style))
            segments.append(Segment(" ", base))
        used = sum(s.cell_length for s in segments)
        if used < width:
            segments.append(Segment(" " * (width - used), base))
        return Strip(segments).crop(0, width)

    # -- moving -------------------------------------------------------------------------

    def validate_cursor(self, value: int) -> int:
        return max(0, min(value, len(self.rows) - 1))

    def watch_cursor(self, old: int, new: int) -> None:
        top = int(self.scroll_y)
        if new < top:
            self.scroll_to(y=new, animate=False)
        elif new >= top + self._page_rows():
            self.scroll_to(y=new - self._page_rows() + 1, animate=False)
        self.refresh_lines(old + 1)
        self.refresh_lines(new + 1)
        self._check_more()

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self._check_more()

    def _on_focus(self, event: events.Focus) -> None:
        self.refresh()

    def _on_blur(self, event: events.Blur) -> None:
        self.refresh()

    def _check_more(self) -> None:
        if self.loading or self.rows.exhausted:
            return
        bottom = max(self.cursor, int(self.scroll_y) + self._page_rows())
        if bottom >= len(self.rows) - self._page_rows() * 2:
            self.post_message(self.NeedMore())

    def action_move(self, delta: int) -> None:
        """Move the cursor by ``delta`` rows."""
        self.cursor += delta

    def action_page(self, pages: int) -> None:
        """Move the cursor by whole screens."""
        self.cursor += pages * self._page_rows()

    def action_first(self) -> None:
        """Go to the newest run."""
        self.cursor = 0

    def action_last(self) -> None:
        """Go to the oldest run loaded (loading more as you go)."""
        self.cursor = len(self.rows) - 1

    def action_open(self) -> None:
        """Open the run under the cursor."""
        if self.current is not None:
            self.post_message(self.Opened(self.current.id))

    def action_toggle_select(self) -> None:
        """Add the run under the cursor to the bulk selection, or take it out."""
        run = self.current
        if run is None:
            return
        self.selected.symmetric_difference_update({run.id})
        self.post_message(self.SelectionChanged())
        self.cursor += 1
        self.refresh()

    async def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y == 0:
            return
        row = int(self.scroll_y) + offset.y - 1
        if row >= len(self.rows):
            return
        self.cursor = row
        if offset.x < 2:
            self.selected.symmetric_difference_update({self.rows[row].id})
            self.post_message(self.SelectionChanged())
            self.refresh()
        elif event.chain >= 2:
            self.action_open()
