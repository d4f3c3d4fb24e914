"""The replay dialog: run a task again with a past run's payload (edited, if you like), then
follow the new run."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, RadioButton, RadioSet, Static, TextArea

from ember._errors import EmberError
from ember._runs import Runs
from ember._types import Run

if TYPE_CHECKING:
    from ember.tui._app import EmberApp


class ReplayDialog(ModalScreen[str | None]):
    """Replay one run: its payload in an editor to change, same tags and metadata, on the
    version you pick. An edited payload is sent only if it is valid JSON; the daemon checks
    it against the task's schema and the dialog shows its answer.

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
        self._original = ""

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog replay"):
            yield Label(f"Replay {self.run_id}", classes="dialog-title")
            yield Static("loading…", id="replay-about", classes="dialog-detail")
            yield TextArea("", id="replay-editor", soft_wrap=True, show_line_numbers=True)
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
        self._original = _pretty(bytes(run.payload))
        self.query_one("#replay-editor", TextArea).load_text(self._original)
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
        changes: dict[str, Any] = {}
        text = self.query_one("#replay-editor", TextArea).text
        if self.run is not None and text.strip() != self._original.strip():
            try:
                changes["payload"] = json.loads(text)
            except json.JSONDecodeError as exc:
                self.query_one("#replay-error", Static).update(
                    f"the payload is not valid JSON: {exc.msg} at line {exc.lineno} column "
                    f"{exc.colno}; fix it, or press esc to leave"
                )
                return
        try:
            new = await Runs(self.ember.client).replay(self.run_id, version=pin, **changes)
        except EmberError as exc:
            self.query_one("#replay-error", Static).update(str(exc))
            return
        self.app.notify(f"Replayed {self.run_id} → {new.id}")
        self.dismiss(new.id)
        self.ember.open_run(new.id)

    def action_dismiss_none(self) -> None:
        """Close without replaying."""
        self.dismiss(None)


def _pretty(payload: bytes) -> str:
    """A payload as indented JSON for editing (as it came, if it does not parse)."""
    try:
        return json.dumps(json.loads(payload or b"null"), indent=2, ensure_ascii=False)
    except ValueError:
        return payload.decode(errors="replace")
