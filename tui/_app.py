"""EmberApp: the dashboard's shell: screens, global keys, environment, connection, theme."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.command import Provider
from textual.screen import Screen
from textual.signal import Signal
from textual.worker import Worker

from ember._client import Client
from ember._config import ClientSettings
from ember._types import LogEvent, RunSummary
from ember.tui._commands import EmberCommands
from ember.tui._daemon import DaemonDownScreen, DaemonLauncher
from ember.tui._format import Clock, system_clock
from ember.tui._live import Link, LinkState, LiveFeed, RateMeter
from ember.tui._screens import MODES
from ember.tui._styles import APP_CSS


class EmberApp(App[None]):
    """``ember tui``: runs, tasks, queues, versions, processes, wait tokens, schedules and
    alerts of one daemon, live.

    Args:
        settings: where the daemon is and which environment to show.
        clock: what "now" is (tests freeze it so that relative times do not move).
        launcher: how to start a daemon when none answers; None hides the offer.
        live: follow the daemon (health and events); tests of static screens turn it off.
    """

    CSS = APP_CSS
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = dict(MODES)
    COMMANDS: ClassVar[set[type[Provider] | Callable[[], type[Provider]]]] = App.COMMANDS | {
        EmberCommands
    }
    TITLE = "Ember"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('runs')", "Runs", show=False),
        Binding("2", "switch_mode('tasks')", "Tasks", show=False),
        Binding("3", "switch_mode('queues')", "Queues", show=False),
        Binding("4", "switch_mode('versions')", "Versions", show=False),
        Binding("5", "switch_mode('processes')", "Processes", show=False),
        Binding("6", "switch_mode('tokens')", "Tokens", show=False),
        Binding("7", "switch_mode('schedules')", "Schedules", show=False),
        Binding("8", "switch_mode('alerts')", "Alerts", show=False),
        Binding("e", "switch_env", "Env", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("ctrl+p", "command_palette", "Commands", show=False, priority=True),
        # Not a priority binding: a colon typed in the filter box is text ("status:failed").
        Binding("colon", "command_palette", "Commands", show=False),
        Binding("S", "start_daemon", "Start daemon", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        settings: ClientSettings,
        *,
        clock: Clock = system_clock,
        launcher: DaemonLauncher | None = None,
        live: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.client = Client(settings)
        self.clock = clock
        self.launcher = launcher
        self.live = live
        self.run_changed: Signal[RunSummary] = Signal(self, "run-changed")
        self.log_received: Signal[LogEvent] = Signal(self, "log-received")
        self.link_changed: Signal[LinkState] = Signal(self, "link-changed")
        self.resynced: Signal[None] = Signal(self, "resynced")
        self.env_changed: Signal[str] = Signal(self, "env-changed")
        self.link_state = LinkState(Link.CONNECTING, settings.where)
        self.meter = RateMeter()
        self._feed_worker: Worker[None] | None = None
        self._was_up = False

    @property
    def launcher_log(self) -> str:
        """Where a daemon started from here writes its output."""
        return str(self.launcher.log_path) if self.launcher else ""

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.switch_mode("runs")
        self._start_feed()

    async def on_unmount(self) -> None:
        # Close the event stream before its connection pool, or the socket leaks.
        if self._feed_worker is not None:
            self._feed_worker.cancel()
            with contextlib.suppress(Exception):
                await self._feed_worker.wait()
        await self.client.aclose()

    # -- connection ---------------------------------------------------------------------

    def _start_feed(self) -> None:
        if not self.live:
            self._on_link(LinkState(Link.UP, self.settings.where))
            return
        if self._feed_worker is not None:
            self._feed_worker.cancel()
        feed = LiveFeed(
            self.client,
            on_state=self._on_link,
            on_run=self.run_changed.publish,
            on_log=self.log_received.publish,
            on_resync=lambda: self.resynced.publish(None),
        )
        self.meter = feed.meter
        self._feed_worker = self.run_worker(feed.run(), name="live-feed", exclusive=False)

    def _on_link(self, state: LinkState) -> None:
        previous = self.link_state
        self.link_state = state
        self.link_changed.publish(state)
        if state.link is Link.UP:
            if not self._was_up and isinstance(self.screen, DaemonDownScreen):
                self.screen.dismiss()
            if previous.link is Link.DOWN and self._was_up:
                self.notify("The daemon is back: showing what changed meanwhile.")
            self._was_up = True
        elif state.link is Link.DOWN and previous.link is not Link.DOWN:
            if self._was_up:
                self.notify(
                    "Lost the daemon: reconnecting. Runs in the table are as last seen.",
                    severity="warning",
                )
            elif not isinstance(self.screen, DaemonDownScreen):
                self.push_screen(DaemonDownScreen())

    def start_daemon(self) -> str | None:
        """Start a daemon with the launcher; returns its command line, or None."""
        if self.launcher is None:
            self.notify("This dashboard cannot start a daemon here (TCP URL).", severity="error")
            return None
        if self.link_state.link is Link.UP:
            self.notify("The daemon is already running.")
            return None
        self.launcher.start()
        command = " ".join(self.launcher.argv[1:])
        self.notify(f"Starting a daemon: {command}")
        return command

    def action_start_daemon(self) -> None:
        """Start a daemon when none answers."""
        self.start_daemon()

    # -- environment, theme, help -------------------------------------------------------

    def switch_env_to(self, env: str) -> None:
        """Show another environment: new client, new event stream, every screen reloads."""
        if env == self.settings.env:
            return
        self.settings = dataclasses.replace(self.settings, env=env)
        old, self.client = self.client, Client(self.settings)
        self._start_feed()
        self.run_worker(old.aclose(), name="close-old-client")
        self.link_changed.publish(self.link_state)
        self.env_changed.publish(env)
        self.notify(f"Environment: {env}")

    def action_switch_env(self) -> None:
        """Choose the environment."""
        from ember.tui._env import EnvironmentDialog

        def chosen(env: str | None) -> None:
            if env:
                self.switch_env_to(env)

        self.push_screen(EnvironmentDialog(self.settings.env), chosen)

    def action_toggle_theme(self) -> None:
        """Switch between the dark and the light theme."""
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_help(self) -> None:
        """List the keys of the screen you are on."""
        from ember.tui._help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def open_run(self, run_id: str) -> None:
        """Show a run's detail screen."""
        from ember.tui._run_detail import RunDetailScreen

        self.push_screen(RunDetailScreen(run_id))
