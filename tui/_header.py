"""The header on every screen: environment, daemon status, load, runs/s, and the screen tabs."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from ember.tui._live import Link, LinkState

if TYPE_CHECKING:
    from ember.tui._app import EmberApp

SCREENS = (
    ("runs", "1", "Runs"),
    ("tasks", "2", "Tasks"),
    ("queues", "3", "Queues"),
    ("versions", "4", "Versions"),
    ("processes", "5", "Processes"),
    ("tokens", "6", "Tokens"),
    ("schedules", "7", "Schedules"),
    ("alerts", "8", "Alerts"),
)


class EmberHeader(Widget):
    """Two lines: what you are connected to and how busy it is, then where you are."""

    DEFAULT_CSS = """
    EmberHeader { height: 2; background: $panel; }
    EmberHeader Horizontal { height: 1; }
    EmberHeader #brand { width: auto; color: $warning; text-style: bold; padding: 0 1; }
    EmberHeader #env { width: auto; padding: 0 1; }
    EmberHeader #link { width: auto; padding: 0 1; }
    EmberHeader #load { width: 1fr; padding: 0 1; color: $text-muted; }
    EmberHeader #rate { width: 24; }
    EmberHeader #rate-label { width: auto; padding: 0 1; color: $text-muted; }
    EmberHeader #tabs { width: 1fr; padding: 0 1; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Static("✹ ember", id="brand")
            yield Static(id="env")
            yield Static(id="link")
            yield Static(id="load")
            yield Sparkline([0.0], id="rate")
            yield Static(id="rate-label")
        yield Static(id="tabs")

    @property
    def ember(self) -> EmberApp:
        """The app, typed."""
        from ember.tui._app import EmberApp

        return cast(EmberApp, self.app)

    def on_mount(self) -> None:
        app = self.ember
        app.link_changed.subscribe(self, self._show_link)
        self._show_link(app.link_state)
        self.set_interval(1.0, self._show_rate)
        self._show_rate()

    def show_tabs(self, current: str) -> None:
        """Mark the screen you are on; the others are clickable."""
        parts = []
        for mode, key, title in SCREENS:
            if mode == current:
                parts.append(f"[reverse $accent] {key} {title} [/]")
            else:
                parts.append(f"[@click=app.switch_mode('{mode}')] {key} {title} [/]")
        parts.append("  [$text-muted]? help  ^p commands  e env[/]")
        self.query_one("#tabs", Static).update(" ".join(parts))

    def _show_link(self, state: LinkState) -> None:
        app = self.ember
        self.query_one("#env", Static).update(
            f"[@click=app.switch_env()]env [b]{app.settings.env}[/b][/]"
        )
        link = self.query_one("#link", Static)
        load = self.query_one("#load", Static)
        if state.link is Link.UP and state.health is not None:
            health = state.health
            link.update(f"[$success]● daemon {health.version}[/]")
            load.update(
                f"executing {health.executing_runs}/{health.max_concurrent_runs} · "
                f"queued {health.queued_runs} · processes {health.processes}"
            )
        elif state.link is Link.CONNECTING:
            link.update("[$warning]◌ connecting…[/]")
            load.update(state.where)
        else:
            retry = f"retrying in {state.retry_in_s:.0f}s" if state.retry_in_s else "reconnecting"
            hint = " · S starts one" if app.launcher is not None else ""
            link.update(f"[$error]○ daemon unreachable[/] [$text-muted]{retry}{hint}[/]")
            load.update(state.where)

    def _show_rate(self) -> None:
        meter = self.ember.meter
        series = meter.series()
        self.query_one("#rate", Sparkline).data = series[-24:]
        self.query_one("#rate-label", Static).update(f"{meter.rate():.1f} runs/s")
