"""The Alerts screen against a real daemon: deliveries of a failed run's alert, live."""

from __future__ import annotations

import socket
from typing import Any

from textual.widgets import DataTable

from ember import Alerts
from ember.tui._alerts_screen import AlertsScreen


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port  # closed again when the socket goes: connections are refused


async def test_a_failing_webhook_shows_its_retries_and_error(tui: Any) -> None:
    hook = f"http://127.0.0.1:{closed_port()}/down"
    await Alerts(tui.harness.client).create(webhook=hook, events=["run.failed"])
    failed = await tui.run("charge", {"card": "declined"})
    app = tui.app()
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.press("8")
        await tui.until(pilot, lambda: isinstance(app.screen, AlertsScreen))
        table = app.screen.query_one("#main-table", DataTable)
        await tui.until(pilot, lambda: table.row_count == 1)
        cells = [str(c) for c in table.get_row_at(0)]
        assert cells[1] == "run.failed" and cells[2] == failed
        assert "retrying" in cells[3] and cells[6] == hook
        await tui.until(pilot, lambda: "Connection refused" in str(table.get_row_at(0)[7]))
        status = str(app.screen.query_one("#table-status").render())
        assert "1 not delivered" in status and hook in status
