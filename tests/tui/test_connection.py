"""No daemon at start, a daemon that goes away and comes back, and starting one from the TUI."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from conftest import running_daemon

from ember import ClientSettings
from ember.tui import DaemonLauncher, EmberApp
from ember.tui._daemon import DaemonDownScreen
from ember.tui._live import Link
from ember.tui._run_table import RunTable


def header_link(app: Any) -> str:
    return str(app.screen.query_one("#link").render())


async def test_no_daemon_says_so_and_starts_one(tmp_path: Path, tui: Any) -> None:
    state = tmp_path / "started"
    socket = tmp_path / "started.sock"
    launcher = DaemonLauncher(socket_path=socket, state_dir=state, log_path=tmp_path / "d.log")
    app = EmberApp(ClientSettings(socket_path=socket), launcher=launcher)
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: isinstance(app.screen, DaemonDownScreen))
        assert str(socket) in str(app.screen.query(".dialog-detail").first().render())
        await pilot.press("s")
        try:
            await tui.until(pilot, lambda: app.link_state.link is Link.UP, timeout_s=30)
            await tui.until(pilot, lambda: not isinstance(app.screen, DaemonDownScreen))
            assert "daemon" in header_link(app)
            # (the table lists again once the link is back, not in a loop while it is down)
            await tui.until(pilot, lambda: app.screen.query_one(RunTable).rows.exhausted)
        finally:
            assert launcher.process is not None
            os.kill(launcher.process.pid, signal.SIGTERM)
            launcher.process.wait(30)


async def test_the_header_shows_a_lost_daemon_and_the_table_catches_up(
    tui: Any, state_dir: Path
) -> None:
    first = await tui.run("echo", {"n": 1})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(app.screen.query_one(RunTable).rows) == 1)
        await tui.harness.daemon.stop()
        await tui.until(pilot, lambda: app.link_state.link is Link.DOWN)
        assert "unreachable" in header_link(app)
        assert app.screen.query_one(RunTable).rows[0].id == first  # still shown
        async with running_daemon(state_dir) as again:
            await again.daemon.register_version("dev", _archive(), promote=True)
            from ember import Tasks

            handle = await Tasks(again.client).trigger("echo", {"n": 2})
            await again.wait(handle.id)
            await tui.until(pilot, lambda: app.link_state.link is Link.UP, timeout_s=20)
            await tui.until(pilot, lambda: len(app.screen.query_one(RunTable).rows) == 2)
            assert app.screen.query_one(RunTable).rows[0].id == handle.id


def _archive() -> bytes:
    from conftest import make_archive

    return make_archive(
        {
            "tasks/__init__.py": "",
            "tasks/shop.py": """
                from ember import task

                @task(id="echo")
                async def echo(payload: dict) -> dict:
                    return payload
            """,
        }
    )
