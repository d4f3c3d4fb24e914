"""When no daemon answers: say so, and offer to start one in the background.

The dashboard starts a daemon the way a user would, as ``ember daemon`` in its own session
(so it outlives the dashboard), with its output in a log file beside its state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

if TYPE_CHECKING:
    from ember.tui._app import EmberApp


@dataclass
class DaemonLauncher:
    """How to start a daemon for the dashboard's socket.

    Attributes:
        socket_path: the socket the dashboard talks to.
        state_dir: the daemon's state directory (its default when None).
        log_path: where the daemon's output goes.
        cwd: where to start it (its project's ``[tool.ember]`` is read from there).
        env: extra environment variables for it.
    """

    socket_path: Path
    log_path: Path
    state_dir: Path | None = None
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """The command that starts the daemon."""
        argv = [sys.executable, "-m", "ember.cli", "daemon", "--socket", str(self.socket_path)]
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        return argv

    def start(self) -> subprocess.Popen[bytes]:
        """Start the daemon detached from the dashboard; returns its process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.process


class DaemonDownScreen(ModalScreen[None]):
    """Shown at start when nothing answers; closes itself once the daemon is up."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start daemon"),
        Binding("q", "app.quit", "Quit"),
        Binding("escape", "dismiss_screen", "Browse anyway"),
    ]

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def compose(self) -> ComposeResult:
        app = self.ember
        with Vertical(classes="dialog"):
            yield Label("No Ember daemon is running", classes="dialog-title")
            yield Static(
                f"Nothing answers at {app.settings.where}.\n\n"
                "The dashboard keeps trying and connects as soon as a daemon is up: start one "
                "here, or run `ember dev` (your project, with hot reload) or `ember daemon` "
                "in another terminal.",
                classes="dialog-detail",
                markup=False,
            )
            yield Static("", id="start-note", classes="dialog-detail", markup=False)
            with Horizontal(classes="dialog-buttons"):
                if app.launcher is not None:
                    yield Button("Start daemon (s)", variant="primary", id="start")
                yield Button("Browse anyway (esc)", id="later")
                yield Button("Quit (q)", id="quit")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        elif event.button.id == "quit":
            self.app.exit()
        else:
            self.dismiss()

    def action_start(self) -> None:
        """Start a daemon in the background."""
        note = self.query_one("#start-note", Static)
        started = self.ember.start_daemon()
        if started is not None:
            note.update(f"Starting `{started}`… (log: {self.ember.launcher_log})")

    def action_dismiss_screen(self) -> None:
        """Close and look around; the header shows when the daemon comes."""
        self.dismiss()
