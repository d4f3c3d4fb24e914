"""The replay dialog: run a task again with a past run's payload, then follow the new run."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, RadioButton, RadioSet, Static

from ember._errors import EmberError
from ember._runs import Runs
from ember._types import Run
from ember.tui._json import json_content

if TYPE_CHECKING:
    from ember.tui._app import EmberApp


class ReplayDialog(ModalScreen[str | None]):
    """Replay one run: same payload, tags and metadata, on the version you pick.

    Dismisses with the new run's id (and opens it) or None.

    Args:
        run_id: the run to replay.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss_none", "Cancel"),
        Binding("y,ctrl+s", "replay", "Replay"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.run: Run | None = None

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog replay"):
            yield Label(f"Replay {self.run_id}", classes="dialog-title")
            yield Static("loading…", id="replay-about", classes="dialog-detail")
            with VerticalScroll(id="replay-payload"):
                yield Static(id="replay-json")
            with RadioSet(id="replay-version"):
                yield RadioButton("the current version", value=True, id="current")
                yield RadioButton("the version it ran on", id="same")
            yield Static("", id="replay-error", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Replay (y)", variant="primary", id="replay")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#replay", Button).focus()
        self._load()

    @work
    async def _load(self) -> None:
        try:
            run = await Runs(self.ember.client).retrieve(self.run_id)
        except EmberError as exc:
            self.query_one("#replay-error", Static).update(str(exc))
            return
        self.run = run
        self.query_one("#replay-about", Static).update(
            f"Task [b]{run.task_id}[/b] · tags {', '.join(run.tags) or '—'} · "
            f"ran on {run.version or 'no version yet'}. Payload:"
        )
        self.query_one("#replay-json", Static).update(json_content(run.payload, 60))
        same = self.query_one("#same", RadioButton)
        same.label = f"the version it ran on ({run.version})" if run.version else "—"
        same.disabled = run.version is None

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "replay":
            self.action_replay()
        elif event.button.id == "cancel":
            self.dismiss(None)

    def action_replay(self) -> None:
        """Replay and open the new run."""
        self._replay()

    @work(exclusive=True)
    async def _replay(self) -> None:
        pin = self.run.version if self.run and self.query_one("#same", RadioButton).value else None
        try:
            new = await Runs(self.ember.client).replay(self.run_id, version=pin)
        except EmberError as exc:
            self.query_one("#replay-error", Static).update(str(exc))
            return
        self.app.notify(f"Replayed {self.run_id} → {new.id}")
        self.dismiss(new.id)
        self.ember.open_run(new.id)

    def action_dismiss_none(self) -> None:
        """Close without replaying."""
        self.dismiss(None)
