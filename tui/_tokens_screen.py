"""The Tokens screen (human in the loop): wait tokens by status; complete a waiting one with
JSON from an editor, and open the runs it resumes."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Literal

import msgspec
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Static, TextArea

from ember._errors import EmberError
from ember._types import TokenInfo
from ember._wait import Wait
from ember.tui._format import ago
from ember.tui._json_editor import JsonEditor
from ember.tui._table_screen import Row, TableScreen

TokenStatus = Literal["WAITING", "COMPLETED", "TIMED_OUT"]

STATUSES: tuple[TokenStatus | None, ...] = (None, "WAITING", "COMPLETED", "TIMED_OUT")
"""What ``f`` cycles through: every token, then one status."""

_STATUS_MARKUP = {
    "WAITING": "[$accent]◷ waiting[/]",
    "COMPLETED": "[$success]✔ completed[/]",
    "TIMED_OUT": "[$error]⏱ timed out[/]",
}


class CompleteTokenDialog(ModalScreen[str | None]):
    """Edit the JSON a token completes with; ctrl+s completes, esc cancels.

    It returns the JSON text, checked as you type (a bad document cannot be sent).

    Args:
        token: the token to complete.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "complete", "Complete", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, token: TokenInfo) -> None:
        super().__init__()
        self.token = token

    def compose(self) -> ComposeResult:
        token = self.token
        waiting = ", ".join(token.waiting_runs) or "no run yet"
        with Vertical(classes="dialog complete-token"):
            yield Label(f"Complete {token.id}", classes="dialog-title")
            yield Static(
                f"Waiting: {waiting}. Every run waiting on it resumes with this data.",
                classes="dialog-detail",
                markup=False,
            )
            yield JsonEditor("{}", id="token-editor")
            yield Static("", id="token-problem", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Complete (^s)", variant="primary", id="complete")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one(JsonEditor).focus()

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        problem = self.query_one(JsonEditor).problem
        self.query_one("#token-problem", Static).update(
            f"not JSON yet: {problem}" if problem else ""
        )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "complete":
            self.action_complete()
        else:
            self.dismiss(None)

    def action_complete(self) -> None:
        """Complete the token with the editor's JSON, if it is JSON."""
        editor = self.query_one(JsonEditor)
        if editor.problem:
            self.notify(f"The data is not valid JSON: {editor.problem}", severity="error")
            return
        self.dismiss(editor.text)

    def action_cancel(self) -> None:
        """Close without completing."""
        self.dismiss(None)


class TokensScreen(TableScreen):
    """Wait tokens, newest first; ``f`` filters by status, enter completes a waiting token,
    ``o`` opens the run waiting on it (or that created it)."""

    MODE = "tokens"
    COLUMNS = ("Token", "Status", "Created", "Times out", "Idempotency key", "Tags", "Runs")
    WIDTHS: ClassVar[dict[str, int]] = {"Status": 12}
    POLL_S = 2.0
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,c", "complete", "Complete"),
        Binding("f", "filter", "Status filter"),
        Binding("o", "open_run", "Open run"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[TokenInfo] = []
        self.status_filter: TokenStatus | None = None
        # Runs a token resumed when completed from here (the list shows only live waiters).
        self.resumed: dict[str, list[str]] = {}

    @property
    def wait(self) -> Wait:
        """Token calls through the app's current client."""
        return Wait(self.ember.client)

    async def fetch(self) -> None:
        page = await self.wait.list_tokens(status=self.status_filter, limit=100)
        # The list carries no waiters: ask for them on the tokens that still have some.
        waiting = [t.id for t in page.data if t.status == "WAITING"]
        details = await asyncio.gather(*(self.wait.retrieve_token(t) for t in waiting))
        by_id = {t.id: t for t in details}
        self.tokens = [by_id.get(t.id, t) for t in page.data]

    def runs_of(self, token: TokenInfo) -> list[str]:
        """The runs to link: those waiting on it (or it resumed), else the one that made it."""
        runs = token.waiting_runs or self.resumed.get(token.id, [])
        if not runs and token.run_id:
            runs = [token.run_id]
        return list(runs)

    def rows(self) -> list[Row]:
        now = self.ember.clock()
        rows: list[Row] = []
        for t in self.tokens:
            runs = self.runs_of(t)
            link = (runs[0] + (f" +{len(runs) - 1}" if len(runs) > 1 else "")) if runs else "—"
            rows.append(
                (
                    t.id,
                    (
                        t.id,
                        Content.from_markup(_STATUS_MARKUP.get(t.status, t.status)),
                        ago(t.created_at, now),
                        ago(t.timeout_at, now) if t.timeout_at else "never",
                        t.idempotency_key or "—",
                        ", ".join(t.tags) or "—",
                        link,
                    ),
                )
            )
        return rows

    def summary(self) -> str:
        shown = (self.status_filter or "all").lower().replace("_", " ")
        if not self.tokens:
            return (
                f"No tokens ({shown}) · f status filter · a run makes one with "
                "wait.create_token() and waits on it with wait.for_token()"
            )
        waiting = sum(1 for t in self.tokens if t.status == "WAITING")
        return (
            f"{len(self.tokens)} tokens ({shown}) · {waiting} waiting · enter complete · "
            "o open run · f status filter"
        )

    def _selected(self) -> TokenInfo | None:
        key = self.current_key()
        return next((t for t in self.tokens if t.id == key), None)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_complete()

    def action_filter(self) -> None:
        """Show the next status: all, waiting, completed, timed out."""
        index = STATUSES.index(self.status_filter)
        self.status_filter = STATUSES[(index + 1) % len(STATUSES)]
        self.reload()

    def action_open_run(self) -> None:
        """Open the run waiting on the token under the cursor (or that created it)."""
        token = self._selected()
        runs = self.runs_of(token) if token else []
        if runs:
            self.ember.open_run(runs[0])
        elif token is not None:
            self.notify(f"No run waits on {token.id}.")

    def action_complete(self) -> None:
        """Complete the waiting token under the cursor with JSON data."""
        token = self._selected()
        if token is None:
            return
        if token.status != "WAITING":
            self.notify(f"{token.id} is {token.status.lower()}: only waiting tokens complete.")
            return

        def chosen(text: str | None) -> None:
            if text is not None and token is not None:
                self._complete(token, text)

        self.app.push_screen(CompleteTokenDialog(token), chosen)

    @work(group="token-complete")
    async def _complete(self, token: TokenInfo, text: str) -> None:
        data: Any = msgspec.json.decode(text.encode() or b"null")
        try:
            await self.wait.complete_token(token.id, data)
        except EmberError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.resumed[token.id] = list(token.waiting_runs)
        if token.waiting_runs:
            runs = ", ".join(token.waiting_runs)
            self.notify(f"Completed {token.id}: {runs} resume · o opens it")
        else:
            self.notify(f"Completed {token.id}: no run was waiting on it.")
        self.reload()
