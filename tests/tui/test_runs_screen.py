"""The Runs screen against a real daemon: live rows, filters, search, bulk actions."""

from __future__ import annotations

import asyncio
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


async def test_filter_by_status_and_task_runs_on_the_daemon(tui: Any) -> None:
    await tui.run("echo", {"n": 1})
    failed = await tui.run("charge", {"card": "declined"})
    await tui.run("charge", {"cents": 5})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 3)
        await pilot.press("slash", *"status:failed task:charge", "enter")
        await tui.until(pilot, lambda: len(table(app).rows) == 1)
        assert table(app).rows[0].id == failed
        status = str(app.screen.query_one("#runs-status").render())
        assert "filter: status:failed task:charge" in status


async def test_a_bad_filter_says_what_is_wrong(tui: Any) -> None:
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("slash", *"status:broken", "enter")
        await pilot.pause(0.1)
        status = str(app.screen.query_one("#runs-status").render())
        assert "status:broken is not a run status" in status
        assert app.screen.query_one("#query").has_class("-invalid")


async def test_search_words_filter_loaded_rows_and_a_run_id_opens_it(tui: Any) -> None:
    from ember.tui._run_detail import RunDetailScreen

    tagged = await tui.run("echo", {"n": 1}, tags=["user_42"])
    await tui.run("echo", {"n": 2}, tags=["user_7"])
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 2)
        await pilot.press("slash", *"user_42", "enter")
        await tui.until(pilot, lambda: len(table(app).rows) == 1)
        assert table(app).rows[0].id == tagged
        assert len(table(app).rows.loaded) == 2  # client-side: nothing re-listed
        await pilot.press("slash", "ctrl+u", *tagged, "enter")
        await tui.until(pilot, lambda: isinstance(app.screen, RunDetailScreen))
        assert app.screen.run_id == tagged


async def test_bulk_select_and_cancel(tui: Any) -> None:
    from ember import Runs, Tasks

    tasks = Tasks(tui.harness.client)
    ids = [(await tasks.trigger("steps", {"gate": str(tui.gate(f"g{i}"))})).id for i in range(2)]
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 2)
        await pilot.press("space", "space", "c")
        await pilot.pause(0.1)
        await pilot.press("y")
        await tui.until(
            pilot,
            lambda: all(r.status is RunStatus.CANCELED for r in table(app).rows.runs.values()),
        )
    for run_id in ids:
        assert (await Runs(tui.harness.client).retrieve(run_id)).status is RunStatus.CANCELED


async def test_bulk_replay_adds_new_runs_live(tui: Any) -> None:
    from ember import Runs

    first = await tui.run("echo", {"n": 1})
    second = await tui.run("echo", {"n": 2})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 2)
        await pilot.press("ctrl+a", "r")
        await pilot.pause(0.1)
        await pilot.press("y")
        await tui.until(pilot, lambda: len(table(app).rows) == 4)
        await tui.until(
            pilot,
            lambda: all(r.status is RunStatus.COMPLETED for r in table(app).rows.runs.values()),
        )
        replays = [table(app).rows[0].id, table(app).rows[1].id]
    origins = {(await Runs(tui.harness.client).retrieve(i)).replayed_from for i in replays}
    assert origins == {first, second}


async def test_select_all_cancels_every_matching_run_through_a_bulk_action(tui: Any) -> None:
    from ember import Queues, Runs, Tasks

    client = tui.harness.client
    await Queues(client).pause("emails")  # the echo runs stay QUEUED
    echoes = await Tasks(client).batch_trigger([("echo", {"n": i}) for i in range(250)])
    other = await tui.run("charge", {"cents": 1})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("slash", *"task:echo", "enter")
        await tui.until(pilot, lambda: len(table(app).rows) >= 100)
        assert len(table(app).rows.loaded) < 250  # the rest is not even loaded
        await pilot.press("ctrl+a")
        status = str(app.screen.query_one("#runs-status").render())
        assert "all matching selected" in status
        await pilot.press("c")
        await pilot.pause(0.1)
        await pilot.press("y")
        runs = Runs(client)

        async def all_done() -> bool:
            actions = await runs.bulk.list()
            return bool(actions) and actions[0].status == "COMPLETED"

        deadline = asyncio.get_running_loop().time() + 60
        while not await all_done():
            assert asyncio.get_running_loop().time() < deadline, "the bulk cancel did not end"
            await pilot.pause(0.1)
        action = (await runs.bulk.list())[0]
        assert (action.action, action.total, action.succeeded) == ("cancel", 250, 250)
    for handle in echoes[::50]:
        assert (await runs.retrieve(handle.id)).status is RunStatus.CANCELED
    assert (await runs.retrieve(other)).status is RunStatus.COMPLETED
    queued = await runs.list(task="echo", status="QUEUED")
    assert queued.data == []


async def test_filter_dialog_applies_statuses(tui: Any) -> None:
    from textual.widgets import SelectionList

    await tui.run("echo", {"n": 1})
    failed = await tui.run("charge", {"card": "declined"})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) == 2)
        await pilot.press("f")
        await tui.until(pilot, lambda: bool(app.screen.query(SelectionList)))
        app.screen.query_one(SelectionList).select(RunStatus.FAILED)
        await pilot.press("ctrl+s")
        await tui.until(pilot, lambda: len(table(app).rows) == 1)
        assert table(app).rows[0].id == failed
        assert app.screen.query_one("#query").value == "status:failed"


async def test_pages_load_as_the_cursor_nears_the_end(tui: Any) -> None:
    from ember import Tasks
    from ember.tui._runs_screen import FIRST_PAGE

    await Tasks(tui.harness.client).batch_trigger([("echo", {"n": i}) for i in range(150)])
    await tui.harness.daemon.engine.run_until_idle()
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(table(app).rows) >= FIRST_PAGE)
        assert len(table(app).rows) in (FIRST_PAGE, 150)
        await pilot.press("end")
        await tui.until(pilot, lambda: table(app).rows.exhausted and len(table(app).rows) == 150)
        await pilot.press("end")
        assert table(app).cursor == 149
        ids = table(app).rows.loaded
        assert ids == sorted(ids, reverse=True)
