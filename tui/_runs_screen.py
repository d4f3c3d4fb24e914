"""The Runs screen: every run of the environment, live, filtered, with bulk cancel and replay."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.widgets import Input, Static

from ember._errors import EmberError
from ember._types import RunPage, RunsFilter, RunStatus, RunSummary
from ember.tui._base import EmberScreen
from ember.tui._dialogs import ConfirmDialog
from ember.tui._query import QueryError, RunQuery
from ember.tui._rows import RunRows
from ember.tui._run_table import RunTable

FIRST_PAGE = 100  # a screenful and a bit: the first paint waits for this page only
NEXT_PAGE = 500
SEARCH_BUDGET = 10_000  # runs scanned for search words before asking to go on
FULL_RUN_ID_LEN = len("run_") + 26


class RunsScreen(EmberScreen):
    """Runs, newest first: ``/`` filters, enter opens, space selects, c cancels, r replays."""

    MODE = "runs"
    AUTO_FOCUS = "RunTable"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_query", "Filter"),
        Binding("f", "filter_dialog", "Filters"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "replay", "Replay"),
        Binding("ctrl+a", "select_all", "Select all", show=False),
        Binding("escape", "clear", "Clear", show=False),
        Binding("L", "search_more", "Search more", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.query_obj = RunQuery()
        self._generation = 0
        self._search_budget = SEARCH_BUDGET
        self._focus_table = False
        # A page that could not be listed is not asked for again until the link is back (a
        # resync) or the user reloads: the table would otherwise ask at once, in a busy loop.
        self._page_failed = False
        # ctrl+a: c and r act on every run the filter matches, through a daemon bulk action.
        self.all_matching = False
        self.bulk_status = ""

    def compose_body(self) -> ComposeResult:
        yield Input(
            placeholder="/ filter: status:failed task:send-email tag:vip since:1h · other words "
            "search loaded runs · a run id opens it",
            id="query",
        )
        yield RunTable(self.ember.clock, id="runs")
        yield Static("", id="runs-status", classes="status-line")

    @property
    def table(self) -> RunTable:
        """The runs table."""
        return self.query_one(RunTable)

    def on_mount(self) -> None:
        self.ember.run_changed.subscribe(self, self._on_run, immediate=True)
        super().on_mount()
        self.table.focus()

    # -- loading ------------------------------------------------------------------------

    def reload(self) -> None:
        """List again from the first page with the current filters."""
        self._generation += 1
        self._search_budget = SEARCH_BUDGET
        self._page_failed = False
        self.all_matching = False
        query = self.query_obj
        rows = RunRows(query.matches_words if query.words else None)
        table = self.table
        table.loading = True
        table.note = ""
        table.reload(rows)
        self._load_page(self._generation, FIRST_PAGE)

    def resync(self) -> None:
        """Merge the newest page into the table: keeps the cursor, the selection, the pages."""
        self._page_failed = False
        if not self.table.rows.loaded:
            self.reload()
        else:
            self._merge_newest(self._generation)

    @work(group="runs-merge")
    async def _merge_newest(self, generation: int) -> None:
        try:
            page = await self._list(FIRST_PAGE, None)
        except EmberError:
            return
        if generation == self._generation:
            for run in reversed(page.data):
                self._on_run(run)

    async def _list(self, limit: int, cursor: str | None) -> RunPage:
        query = self.query_obj
        now = self.ember.clock()
        return await self.runs.list(
            status=query.statuses or None,
            task=query.tasks or None,
            tag=query.tags or None,
            version=query.version,
            created_after=query.created_after(now),
            created_before=query.created_before(now),
            limit=limit,
            cursor=cursor,
        )

    def on_run_table_need_more(self, message: RunTable.NeedMore) -> None:
        table = self.table
        if table.loading or table.rows.exhausted or self._page_failed:
            return
        if self.query_obj.words and len(table.rows.loaded) >= self._search_budget:
            table.note = f"searched the {len(table.rows.loaded):,} newest runs · L searches further"
            table.refresh()
            return
        table.loading = True
        self._load_page(self._generation, NEXT_PAGE)

    @work(group="runs-page")
    async def _load_page(self, generation: int, limit: int) -> None:
        table = self.table
        try:
            page = await self._list(limit, table.rows.next_cursor)
        except EmberError as exc:
            if generation == self._generation:
                self._page_failed = True
                table.loading = False
                table.note = f"could not list runs: {exc}"
                table.rows_changed()
            return
        if generation != self._generation:
            return  # the filters changed while this page was on its way
        table.rows.add_page(page.data, page.next_cursor)
        table.loading = False
        table.rows_changed()
        if self._focus_table:
            self._focus_table = False
            self.set_focus(table)
        self._show_status()

    def _on_run(self, run: RunSummary) -> None:
        if run.env != self.ember.settings.env:
            return
        matches = self.query_obj.matches_server(run, self.ember.clock())
        kind, row = self.table.rows.apply(run, matches)
        if row is None:
            return
        if kind == "inserted":
            self.table.inserted(row)
            self._show_status()
        elif kind == "updated":
            self.table.updated(row)

    def _show_status(self, error: str = "") -> None:
        try:
            status = self.query_one("#runs-status", Static)
        except NoMatches:
            return  # (a bulk action's worker ends after the app took the screen down)
        status.set_class(bool(error), "error")
        if error:
            status.update(error)
            return
        table = self.table
        rows = table.rows
        parts = [f"{len(rows):,} runs" + ("" if rows.exhausted else "+")]
        if self.query_obj.words:
            parts[0] = f"{len(rows):,} matches in {len(rows.loaded):,} loaded runs"
        if self.all_matching:
            parts.append("all matching selected (c cancel · r replay · esc clear)")
        elif table.selected:
            parts.append(f"{len(table.selected)} selected (c cancel · r replay · esc clear)")
        if self.bulk_status:
            parts.append(self.bulk_status)
        filters = str(self.query_obj)
        parts.append(f"filter: {filters}" if filters else "no filter (/ or f)")
        if mirror := _mirror_freshness(rows):
            parts.append(mirror)
        status.update(" · ".join(parts))

    def on_run_table_selection_changed(self, message: RunTable.SelectionChanged) -> None:
        self.all_matching = False
        self._show_status()

    def on_run_table_opened(self, message: RunTable.Opened) -> None:
        self.ember.open_run(message.run_id)

    # -- filters ------------------------------------------------------------------------

    def action_focus_query(self) -> None:
        """Type filters."""
        self.query_one("#query", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "query":
            return
        text = event.value.strip()
        if text.startswith("run_") and len(text) == FULL_RUN_ID_LEN:
            self.ember.open_run(text)
            return
        self.apply_query(text)

    def apply_query(self, text: str) -> None:
        """Filter the table by a filter line (see :mod:`ember.tui._query`)."""
        box = self.query_one("#query", Input)
        try:
            query = RunQuery.parse(text)
        except QueryError as exc:
            box.add_class("-invalid")
            self._show_status(str(exc))
            return
        box.remove_class("-invalid")
        if query.env is not None:
            self.ember.switch_env_to(query.env)
            query = dataclasses.replace(query, env=None)
        box.value = str(query)
        server_changed = query.server_part != self.query_obj.server_part
        self.query_obj = query
        if server_changed:
            self.reload()
        else:
            self.table.rows.set_search(query.matches_words if query.words else None)
            self._search_budget = len(self.table.rows.loaded) + SEARCH_BUDGET
            self.table.reload(self.table.rows)
        self._show_status()
        self.set_focus(self.table)
        # Reloading takes the focus back to the box on the way; give it to the table again
        # once the first page is in, so that enter opens the run under the cursor.
        self._focus_table = server_changed

    def action_filter_dialog(self) -> None:
        """Pick filters from lists."""
        from ember.tui._filter_dialog import FilterDialog

        def chosen(query: RunQuery | None) -> None:
            if query is not None:
                self.apply_query(str(query))

        self.app.push_screen(FilterDialog(self.query_obj), chosen)

    def action_search_more(self) -> None:
        """Let the search scan another batch of older runs."""
        self._search_budget = len(self.table.rows.loaded) + SEARCH_BUDGET
        self.table.note = ""
        self.table.rows_changed()

    def action_clear(self) -> None:
        """Clear the selection, else leave the filter box."""
        if self.table.selected:
            self.table.selected.clear()
            self.all_matching = False
            self.table.refresh()
            self._show_status()
        self.table.focus()

    def action_select_all(self) -> None:
        """Select every run the filter matches: c and r then act on all, loaded or not."""
        rows = self.table.rows
        self.table.selected = set(rows.shown)
        self.all_matching = not self.query_obj.words
        self.table.refresh()
        self._show_status()

    # -- actions ------------------------------------------------------------------------

    def _matching_filter(self, only_active: bool) -> RunsFilter | None:
        """The filter's runs for a bulk action on the daemon, or None (search words)."""
        query = self.query_obj
        if query.words:
            self.notify(
                "Search words only filter the loaded runs: select runs with space, or filter "
                "with key:value words (status: task: tag: since:) to act on every match.",
                severity="warning",
            )
            return None
        now = self.ember.clock()
        statuses = list(query.statuses)
        if only_active:
            statuses = [s for s in statuses or RunStatus if not s.is_final]
        return RunsFilter(
            status=statuses,
            task=list(query.tasks),
            tag=list(query.tags),
            version=query.version,
            created_after=query.created_after(now),
            created_before=query.created_before(now),
        )

    def action_cancel(self) -> None:
        """Cancel the selected runs (or the one under the cursor; ctrl+a: every match)."""
        if self.all_matching:
            self._confirm_matching("cancel")
            return
        targets = [r for r in self.table.targets() if not r.status.is_final]
        if not targets:
            self.notify("Nothing to cancel: those runs are already final.", severity="warning")
            return
        what = targets[0].id if len(targets) == 1 else f"{len(targets)} runs"
        detail = "\n".join(f"{r.id}  {r.task_id}  {r.status.value}" for r in targets[:8])
        if len(targets) > 8:
            detail += f"\n… and {len(targets) - 8} more"

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._bulk("cancel", run_ids=[r.id for r in targets])

        self.app.push_screen(ConfirmDialog(f"Cancel {what}?", detail, "Cancel runs"), confirmed)

    def action_replay(self) -> None:
        """Replay the selected runs (or the one under the cursor; ctrl+a: every match)."""
        if self.all_matching:
            self._confirm_matching("replay")
            return
        targets = self.table.targets()
        if not targets:
            return
        if len(targets) == 1:
            from ember.tui._replay import ReplayDialog

            self.app.push_screen(ReplayDialog(targets[0].id))
            return
        detail = "Each gets a new run with the same payload, tags and metadata."

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._bulk("replay", run_ids=[r.id for r in targets])

        self.app.push_screen(
            ConfirmDialog(f"Replay {len(targets)} runs?", detail, "Replay"), confirmed
        )

    def _confirm_matching(self, action: str) -> None:
        flt = self._matching_filter(only_active=action == "cancel")
        if flt is None:
            return
        shown = str(self.query_obj) or "none (every run)"
        detail = (
            f"Filter: {shown}\nThe daemon acts on every run it matches, loaded or not, "
            "created before now."
        )
        verb = "Cancel" if action == "cancel" else "Replay"

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._bulk(action, flt=flt)

        self.app.push_screen(
            ConfirmDialog(f"{verb} every matching run?", detail, f"{verb} runs"), confirmed
        )

    @work(group="runs-bulk")
    async def _bulk(
        self, action: str, run_ids: list[str] | None = None, flt: RunsFilter | None = None
    ) -> None:
        """Run a bulk action on the daemon and show its progress until it ends."""
        bulk = self.runs.bulk
        verb = "Canceled" if action == "cancel" else "Replayed"
        try:
            start = bulk.cancel if action == "cancel" else bulk.replay
            done = await start(filter=flt, run_ids=run_ids)
            while done.status == "RUNNING":
                self.bulk_status = f"{action}: {done.processed:,} of {done.total:,}"
                self._show_status()
                await asyncio.sleep(0.2)
                done = await bulk.retrieve(done.id)
        except EmberError as exc:
            self.notify(f"The bulk {action} failed: {exc}", severity="error")
            return
        finally:
            self.bulk_status = ""
        if done.failed:
            self.notify(
                f"{verb} {done.succeeded:,} of {done.total:,}; {done.failed:,} could not be "
                "(already final, or gone).",
                severity="warning",
            )
        else:
            self.notify(f"{verb} {done.succeeded:,} run{'s' if done.succeeded != 1 else ''}.")
        self.table.selected.clear()
        self.all_matching = False
        self.table.refresh()
        self._show_status()


def _mirror_freshness(rows: RunRows) -> str:
    """For a forwarded environment's runs: whose mirror they are and how fresh."""
    marks = [rows.runs[i].sync for i in rows.loaded[:1]]
    mark = marks[0] if marks else None
    if mark is None:
        return ""
    where = f"mirror of {mark.profile} ({mark.url})"
    if mark.live:
        return f"{where}: live"
    if mark.as_of is None:
        return f"{where}: never reached yet"
    return f"{where}: offline, as of {mark.as_of.astimezone():%Y-%m-%d %H:%M:%S}"
