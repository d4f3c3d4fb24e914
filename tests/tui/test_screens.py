"""Tasks (and the test panel), Queues, Versions, Processes, environments, help, palette, theme."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from textual.widgets import DataTable, Static

from ember import Runs, RunStatus, Tasks
from ember.tui._run_detail import RunDetailScreen
from ember.tui._run_table import RunTable
from ember.tui._test_panel import TaskTestPanel


def main_table(app: Any) -> DataTable[Any]:
    return app.screen.query(DataTable).first()


def cells(app: Any) -> list[list[str]]:
    table = main_table(app)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_tasks_list_their_settings_and_the_test_panel_triggers(tui: Any) -> None:
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        await tui.until(pilot, lambda: main_table(app).row_count == 4)
        rows = {row[0]: row for row in cells(app)}
        assert rows["echo"][1:3] == ["emails", "2"]
        assert rows["flaky"][3].startswith("2×")
        assert rows["charge"][3] == "no retry"
        main_table(app).move_cursor(row=list(rows).index("echo"))
        await pilot.press("enter")
        await tui.until(pilot, lambda: isinstance(app.screen, TaskTestPanel))
        editor = app.screen.query_one("#payload-editor")
        editor.load_text('{"hello": ')  # type: ignore[attr-defined]
        await pilot.pause(0.1)
        assert "not JSON yet" in str(app.screen.query_one("#payload-problem").render())
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, TaskTestPanel)  # refused: nothing triggered
        editor.load_text('{"hello": "panel"}')  # type: ignore[attr-defined]
        await pilot.click("#opt-tags")
        await pilot.press(*"from-panel")
        await pilot.press("ctrl+s")
        await tui.until(
            pilot,
            lambda: (
                isinstance(app.screen, RunDetailScreen)
                and app.screen.run is not None
                and app.screen.run.status is RunStatus.COMPLETED
            ),
        )
        run = app.screen.run
        assert run is not None
        assert run.task_id == "echo"
        assert run.tags == ["from-panel"]
        assert run.output_as() == {"echo": {"hello": "panel"}}


async def test_queues_pause_resume_and_limit(tui: Any) -> None:
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await tui.until(pilot, lambda: any(r[0] == "emails" for r in cells(app)))
        main_table(app).move_cursor(row=[r[0] for r in cells(app)].index("emails"))
        await pilot.press("p")
        await tui.until(pilot, lambda: "paused" in cells(app)[main_table(app).cursor_row][4])
        handle = await Tasks(tui.harness.client).trigger("echo", {})
        await tui.until(pilot, lambda: cells(app)[main_table(app).cursor_row][3] == "1")
        assert (await Runs(tui.harness.client).retrieve(handle.id)).status is RunStatus.QUEUED
        await pilot.press("p")
        run = await tui.harness.wait(handle.id)
        assert run.status is RunStatus.COMPLETED
        await pilot.press("l", "ctrl+u", "5", "enter")
        await tui.until(pilot, lambda: cells(app)[main_table(app).cursor_row][2] == "5")
        await pilot.press("l", "ctrl+u", "0", "enter")
        await pilot.pause(0.1)
        assert "at least 1" in str(app.screen.query_one("#error").render())
        await pilot.press("ctrl+u", "enter")  # empty: back to the limit in the code
        await tui.until(pilot, lambda: cells(app)[main_table(app).cursor_row][2] == "2")


async def test_versions_mark_the_current_one_and_promote_after_confirmation(tui: Any) -> None:
    from conftest import make_archive

    files = {
        "tasks/__init__.py": "",
        "tasks/extra.py": """
            from ember import task

            @task(id="extra")
            async def extra() -> None:
                pass
        """,
    }
    staged = await tui.harness.daemon.register_version("dev", make_archive(files), promote=False)
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4")
        await tui.until(pilot, lambda: main_table(app).row_count == 2)
        rows = cells(app)
        assert "current" in rows[1][0]
        assert rows[0][1] == staged.id
        main_table(app).move_cursor(row=0)
        await pilot.press("p")
        await pilot.pause(0.1)
        await pilot.press("y")
        await tui.until(pilot, lambda: "current" in cells(app)[0][0])
    assert tui.harness.daemon.engine.current["dev"] == staged.id


async def test_processes_show_the_run_and_open_it(tui: Any) -> None:
    gate = tui.gate()
    handle = await Tasks(tui.harness.client).trigger("steps", {"gate": str(gate)})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        await tui.until(pilot, lambda: any(r[5] == handle.id for r in cells(app)))
        row = next(i for i, r in enumerate(cells(app)) if r[5] == handle.id)
        assert "busy" in cells(app)[row][2]
        assert cells(app)[row][6] == "steps"
        assert cells(app)[row][9].endswith("MB")
        main_table(app).move_cursor(row=row)
        await pilot.press("enter")
        await tui.until(pilot, lambda: isinstance(app.screen, RunDetailScreen))
        gate.touch()
        await tui.harness.wait(handle.id)


async def test_switching_environment_shows_its_runs(tui: Any) -> None:
    await tui.run("echo", {})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await tui.until(pilot, lambda: len(app.screen.query_one(RunTable).rows) == 1)
        await pilot.press("e")
        await pilot.pause(0.1)
        await pilot.press("down", "enter")  # dev -> staging
        await tui.until(pilot, lambda: app.settings.env == "staging")
        await tui.until(pilot, lambda: app.screen.query_one(RunTable).rows.exhausted)
        assert len(app.screen.query_one(RunTable).rows) == 0
        assert "staging" in str(app.screen.query_one("#env").render())
        await pilot.press("slash", *"env:dev", "enter")
        await tui.until(pilot, lambda: len(app.screen.query_one(RunTable).rows) == 1)


async def test_help_lists_the_keys_and_the_palette_runs_commands(tui: Any) -> None:
    from ember.tui._help import HelpScreen
    from ember.tui._queues_screen import QueuesScreen

    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        await tui.until(pilot, lambda: isinstance(app.screen, HelpScreen))
        console = Console(width=100)
        with console.capture() as capture:
            console.print(app.screen.query_one("#help-keys", Static).content)
        text = capture.get()
        for words in ("Cancel", "Replay", "Filter", "Select"):
            assert words in text
        await pilot.press("escape", "ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"go to queues")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await tui.until(pilot, lambda: isinstance(app.screen, QueuesScreen))
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
