"""The command palette's Ember commands (ctrl+p or ``:``): go to, filter, switch, open a run."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from ember.tui._env import KNOWN_ENVS
from ember.tui._header import SCREENS

if TYPE_CHECKING:
    from ember.tui._app import EmberApp

QUICK_FILTERS = (
    ("failed runs", "status:problem"),
    ("active runs", "status:active"),
    ("executing runs", "status:executing"),
    ("runs of the last hour", "since:1h"),
    ("runs of the last day", "since:24h"),
    ("all runs (clear the filter)", ""),
)


class EmberCommands(Provider):
    """Everything the dashboard can do from its keys, by name."""

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        app = self.ember
        commands: list[tuple[str, Callable[[], object], str]] = []
        for mode, key, title in SCREENS:
            commands.append((f"Go to {title}", partial(app.switch_mode, mode), f"key {key}"))
        for env in KNOWN_ENVS:
            if env != app.settings.env:
                commands.append(
                    (f"Switch environment to {env}", partial(app.switch_env_to, env), "key e")
                )
        for title, text in QUICK_FILTERS:
            commands.append((f"Show {title}", partial(self._filter, text), text or "no filter"))
        commands.append(("Toggle dark / light theme", app.action_toggle_theme, "ctrl+t"))
        commands.append(("Help: keys and filter syntax", app.action_help, "key ?"))
        if app.launcher is not None:
            commands.append(("Start the daemon", app.action_start_daemon, "key S"))
        return commands

    def _filter(self, text: str) -> None:
        from ember.tui._runs_screen import RunsScreen

        app = self.ember
        app.switch_mode("runs")
        screen = app.screen
        if isinstance(screen, RunsScreen):
            screen.query_one("#query").value = text  # type: ignore[attr-defined]
            screen.apply_query(text)

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        text = query.strip()
        if text.startswith("run_"):
            yield Hit(1.0, f"Open run {text}", partial(self.ember.open_run, text), help="")
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
