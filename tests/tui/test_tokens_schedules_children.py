"""The Tokens and Schedules screens and child runs in the trace, against a real daemon."""

from __future__ import annotations

from typing import Any

from conftest import Harness
from textual.widgets import DataTable

from ember import Runs, RunStatus, Schedules, Tasks
from ember.tui._dialogs import ConfirmDialog
from ember.tui._run_detail import RunDetailScreen
from ember.tui._tokens_screen import CompleteTokenDialog, TokensScreen

from .conftest import TASKS

EXTRA = {
    "tasks/extra.py": """
        from ember import schedules, task, wait

        @task(id="approve")
        async def approve(payload: dict) -> dict:
            token = await wait.create_token(tags=["review"], idempotency_key=payload["key"])
            result = await wait.for_token(token)
            return {"approved": result.unwrap()}

        @task(id="parent")
        async def parent(payload: dict) -> int:
            from tasks.shop import echo

            first = await echo.trigger_and_wait({"n": 1})
            second = await echo.trigger_and_wait({"n": 2})
            return len([r for r in (first, second) if r.ok])

        @schedules.task(id="nightly")
        async def nightly(payload) -> None:
            return None
    """,
}


async def register_extra(harness: Harness) -> None:
    info = await harness.register({**TASKS, **EXTRA})
    assert info.status == "READY", info.error


def rows(app: Any) -> list[list[str]]:
    table = app.screen.query(DataTable).first()
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_a_waiting_token_is_completed_with_json_and_its_run_resumes(tui: Any) -> None:
    await register_extra(tui.harness)
    handle = await Tasks(tui.harness.client).trigger("approve", {"key": "order-7"})
    runs = Runs(tui.harness.client)
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("6")
        await tui.until(
            pilot, lambda: any("waiting" in r[1] and r[6] == handle.id for r in rows(app))
        )
        assert isinstance(app.screen, TokensScreen)
        row = next(r for r in rows(app) if r[6] == handle.id)
        assert row[4:6] == ["order-7", "review"]
        await pilot.press("f")  # waiting only
        await tui.until(pilot, lambda: app.screen.status_filter == "WAITING")  # type: ignore[attr-defined]
        await pilot.press("enter")
        await tui.until(pilot, lambda: isinstance(app.screen, CompleteTokenDialog))
        editor = app.screen.query_one("#token-editor")
        editor.load_text('{"ok": ')  # type: ignore[attr-defined]
        await pilot.pause(0.1)
        assert "not JSON yet" in str(app.screen.query_one("#token-problem").render())
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, CompleteTokenDialog)  # refused
        editor.load_text('{"by": "ada"}')  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        run = await tui.harness.wait(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert run.output_as() == {"approved": {"by": "ada"}}
        await tui.until(pilot, lambda: not rows(app))  # no longer waiting
        await pilot.press("f")  # completed
        await tui.until(pilot, lambda: any("completed" in r[1] for r in rows(app)))
        await pilot.press("o")
        await tui.until(
            pilot,
            lambda: isinstance(app.screen, RunDetailScreen) and app.screen.run_id == handle.id,
        )
    assert (await runs.retrieve(handle.id)).status is RunStatus.COMPLETED


async def test_schedules_list_and_deactivate_after_confirmation(tui: Any) -> None:
    await register_extra(tui.harness)
    calls = Schedules(tui.harness.client)
    made = await calls.create(
        "nightly", "0 9 * * *", timezone="Europe/Paris", external_id="customer-42"
    )
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("7")
        await tui.until(pilot, lambda: any(r[0] == made.id for r in rows(app)))
        row = next(r for r in rows(app) if r[0] == made.id)
        assert row[1:4] == ["nightly", "0 9 * * *", "Europe/Paris"]
        assert row[4].startswith("in ")
        assert "active" in row[6]
        assert row[7:] == ["imperative", "customer-42"]
        await pilot.press("a")
        await tui.until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.press("n")
        assert (await calls.retrieve(made.id)).active
        await pilot.press("a")
        await tui.until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.press("y")
        await tui.until(pilot, lambda: "off" in next(r for r in rows(app) if r[0] == made.id)[6])
        assert not (await calls.retrieve(made.id)).active
        await pilot.press("a", "y")
        await tui.until(pilot, lambda: "active" in next(r for r in rows(app) if r[0] == made.id)[6])
        assert (await calls.retrieve(made.id)).active


async def test_child_runs_show_in_the_trace_and_open_with_enter(tui: Any) -> None:
    await register_extra(tui.harness)
    parent = await tui.run("parent", {})
    runs = Runs(tui.harness.client)
    children = (await runs.list(parent=parent)).data
    assert sorted(c.task_id for c in children) == ["echo", "echo"]
    assert all(c.parent_run_id == parent for c in children)
    assert (await runs.list(parent=children[0].id)).data == []
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_run(parent)
        await tui.until(
            pilot, lambda: isinstance(app.screen, RunDetailScreen) and bool(app.screen.child_runs)
        )
        await pilot.press("w")
        table = app.screen.query_one("#child-table", DataTable)
        await tui.until(pilot, lambda: table.row_count == 2)
        first = sorted(children, key=lambda c: (c.created_at, c.id))[0]
        assert "↳ echo · completed" in str(app.screen.query_one("#trace-view").render())
        assert [str(c) for c in table.get_row_at(0)][1:3] == ["echo", first.id]
        table.focus()
        await pilot.press("enter")
        await tui.until(
            pilot,
            lambda: isinstance(app.screen, RunDetailScreen) and app.screen.run_id == first.id,
        )
        await tui.until(pilot, lambda: app.screen.run is not None)  # type: ignore[attr-defined]
        await pilot.press("p")  # and back up to the parent
        await tui.until(
            pilot,
            lambda: isinstance(app.screen, RunDetailScreen) and app.screen.run_id == parent,
        )
