"""EmberScreen: what every full screen of the dashboard shares (header, footer, app access)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from ember._runs import Runs, Tasks
from ember.tui._header import EmberHeader

if TYPE_CHECKING:
    from ember.tui._app import EmberApp


class EmberScreen(Screen[None]):
    """A screen with the Ember header on top and the key bar at the bottom.

    Subclasses yield their body from :meth:`compose_body` and reload what they show in
    :meth:`reload`, which runs on mount and after an environment switch; after a reconnection
    :meth:`resync` runs, which reloads unless the screen can merge what changed.
    """

    MODE = "runs"

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    @property
    def runs(self) -> Runs:
        """Run calls through the app's current client."""
        return Runs(self.ember.client)

    @property
    def tasks(self) -> Tasks:
        """Task calls through the app's current client."""
        return Tasks(self.ember.client)

    def compose(self) -> ComposeResult:
        yield EmberHeader()
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        """The screen's own widgets, between header and footer."""
        yield from ()

    def on_mount(self) -> None:
        self.ember.resynced.subscribe(self, lambda _: self.resync())
        self.ember.env_changed.subscribe(self, lambda _: self.reload())
        self.query_one(EmberHeader).show_tabs(self.MODE)
        self.reload()

    def reload(self) -> None:
        """Fetch what the screen shows again."""

    def resync(self) -> None:
        """Catch up after a (re)connection: events sent meanwhile were lost."""
        self.reload()
