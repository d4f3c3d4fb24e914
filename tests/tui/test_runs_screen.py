"""The Runs screen against a real daemon: live rows, filters, search, bulk actions."""

from __future__ import annotations

from typing import Any

from ember import RunStatus
from ember.tui._run_table import RunTable
from ember.tui._runs_screen import RunsScreen


def table(app: Any) -> RunTable:
    return app.screen.query_one(RunTable)


async def test_runs_show_newest_first_and_update_live(tui: Any) -> None:
    first = await tui.run("echo", {"n": 1})
    second = await tui.run("charge", {"card": "declined"})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 2)
        assert isinstance(app.screen, RunsScreen)
        rows = table(app).rows
        assert [rows[0].id, rows[1].id] == [second, first]
        assert rows[0].status is RunStatus.FAILED
        third = await tui.run("echo", {"n": 3})
        await tui.until(pilot, lambda: len(table(app).rows) == 3)
        await tui.until(pilot, lambda: table(app).rows[0].status is RunStatus.COMPLETED)
        assert table(app).rows[0].id == third
