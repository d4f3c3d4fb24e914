"""The run detail screen against a real daemon: error, attempts, history, live logs, trace,
and the actions: cancel, replay, reschedule, and jumping to related runs."""

from __future__ import annotations

from typing import Any

import msgspec
from textual.widgets import DataTable, Static

from ember import Call, Runs, RunStatus, Tasks
from ember._types import TriggerOptions, TriggerRequest, TriggerResponse
from ember.tui._logs import LogView
from ember.tui._run_detail import RunDetailScreen
from ember.tui._trace import TraceView


def detail(app: Any) -> RunDetailScreen:
    screen = app.screen
    assert isinstance(screen, RunDetailScreen)
    return screen


def text_of(screen: Any, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


async def open_detail(tui: Any, pilot: Any, run_id: str) -> RunDetailScreen:
    pilot.app.open_run(run_id)
    await tui.until(
        pilot, lambda: isinstance(pilot.app.screen, RunDetailScreen) and pilot.app.screen.run
    )
    return detail(pilot.app)


async def new_run_completes(tui: Any, pilot: Any, run_id: str) -> Any:
    """Wait until the detail screen shows another run than ``run_id``, completed."""
    app = pilot.app
    await tui.until(
        pilot,
        lambda: (
            isinstance(app.screen, RunDetailScreen)
            and app.screen.run_id != run_id
            and app.screen.run is not None
            and app.screen.run.status is RunStatus.COMPLETED
        ),
    )
    return detail(app).run


async def test_a_failed_run_shows_its_error_attempts_and_history(tui: Any) -> None:
    run_id = await tui.run("charge", {"card": "declined"})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, run_id)
        assert "ValueError" in text_of(screen, "#error-message")
        assert "card declined by the bank" in text_of(screen, "#error-message")
        stack = text_of(screen, "#error-stack")
        assert 'raise ValueError("card declined by the bank")' in stack
        assert "_worker.py" not in stack  # Ember's own frames are folded
        assert '"card": "declined"' in text_of(screen, "#payload")
        await pilot.press("a")
        attempts = screen.query_one("#attempt-table", DataTable)
        assert attempts.row_count == 1
        assert attempts.get_row_at(0)[1] == "failed"
        await pilot.press("h")
        history = text_of(screen, "#timeline")
        for status in ("RUN_CREATED", "QUEUED", "EXECUTING", "FINISHED"):
            assert status in history
        await pilot.press("w")
        trace = str(screen.query_one(TraceView).render())
        assert "queued" in trace
        assert "attempt 1 · failed" in trace


async def test_retries_show_as_attempts_and_backoff_in_the_trace(tui: Any) -> None:
    run_id = await tui.run("flaky", {})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, run_id)
        assert screen.query_one("#attempt-table", DataTable).row_count == 2
        trace = str(screen.query_one(TraceView).render())
        assert "retry backoff" in trace
        assert "attempt 2 · completed" in trace
        assert text_of(screen, "#output").strip() == "2"


async def test_logs_stream_live_while_the_run_executes(tui: Any) -> None:
    gate = tui.gate()
    handle = await Tasks(tui.harness.client).trigger("steps", {"gate": str(gate)})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, handle.id)
        await pilot.press("l")
        logs = screen.query_one(LogView)
        await tui.until(pilot, lambda: logs.count == 1)
        assert screen.run is not None
        assert screen.run.status is RunStatus.EXECUTING
        gate.touch()
        await tui.until(pilot, lambda: logs.count == 2)
        await tui.until(pilot, lambda: screen.run is not None and screen.run.is_final)
        assert screen.run.status is RunStatus.COMPLETED
        lines = [str(line.text) for line in logs.lines]
        assert any("step one" in line for line in lines)
        assert any("WARN" in line and "step two" in line for line in lines)


async def test_replay_opens_the_new_run_and_o_jumps_back(tui: Any) -> None:
    run_id = await tui.run("echo", {"hello": "world"}, tags=["t1"])
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await open_detail(tui, pilot, run_id)
        await pilot.press("r")
        await tui.until(pilot, lambda: getattr(app.screen, "run", None) is not None)
        await pilot.press("y")
        replay = await new_run_completes(tui, pilot, run_id)
        assert replay is not None
        assert replay.replayed_from == run_id
        assert replay.tags == ["t1"]
        await pilot.press("O")
        await tui.until(pilot, lambda: detail(app).run_id == run_id)
        await pilot.press("escape", "escape")
        await tui.until(pilot, lambda: detail(app).run_id == run_id)


async def test_cancel_an_executing_run(tui: Any) -> None:
    handle = await Tasks(tui.harness.client).trigger("steps", {"gate": str(tui.gate())})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, handle.id)
        await tui.until(
            pilot, lambda: screen.run is not None and screen.run.status.value == "EXECUTING"
        )
        await pilot.press("c")
        await pilot.pause(0.1)
        await pilot.press("y")
        await tui.until(pilot, lambda: screen.run is not None and screen.run.is_final)
        assert screen.run is not None
        assert screen.run.status is RunStatus.CANCELED


async def test_reschedule_a_delayed_run(tui: Any) -> None:
    handle = await Tasks(tui.harness.client).trigger("echo", {}, delay="1h")
    before = await Runs(tui.harness.client).retrieve(handle.id)
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, handle.id)
        await pilot.press("s")
        await pilot.pause(0.1)
        await pilot.press("ctrl+u", *"3h", "enter")
        await tui.until(
            pilot,
            lambda: screen.run is not None and screen.run.delay_until != before.delay_until,
        )
    after = await Runs(tui.harness.client).retrieve(handle.id)
    assert after.status is RunStatus.DELAYED
    assert before.delay_until is not None
    assert after.delay_until is not None
    assert 7000 < (after.delay_until - before.delay_until).total_seconds() < 7400
    await Runs(tui.harness.client).cancel(handle.id)


async def test_parent_link_jumps_to_the_parent(tui: Any) -> None:
    parent = await tui.run("echo", {"n": 1})
    # The SDK's trigger() takes no parent (the daemon sets it for child runs): use the wire.
    body = TriggerRequest(payload=msgspec.Raw(b"{}"), options=TriggerOptions(parent_run_id=parent))
    call = Call("POST", "/api/v1/tasks/echo/trigger", TriggerResponse, msgspec.json.encode(body))
    child = (await tui.harness.client.request(call)).id
    await tui.harness.wait(child)
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, child)
        assert parent in text_of(screen, "#props")
        await pilot.press("p")
        await tui.until(pilot, lambda: detail(app).run_id == parent)


async def test_actions_that_do_not_apply_are_hidden(tui: Any) -> None:
    run_id = await tui.run("echo", {})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, run_id)
        await pilot.pause(0.1)
        actions = {b.binding.action for b in screen.active_bindings.values()}
        assert "replay" in actions
        assert "cancel" not in actions
        assert "reschedule" not in actions
        assert "jump('parent')" not in actions


async def test_replay_with_an_edited_payload(tui: Any) -> None:
    from textual.widgets import TextArea

    run_id = await tui.run("echo", {"hello": "world"}, tags=["t1"])
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        await open_detail(tui, pilot, run_id)
        await pilot.press("r")
        await tui.until(pilot, lambda: getattr(app.screen, "run", None) is not None)
        dialog = app.screen
        editor = dialog.query_one("#replay-editor", TextArea)
        assert '"hello": "world"' in editor.text
        error = dialog.query_one("#replay-error", Static)
        # Not JSON: the dialog says so and sends nothing.
        editor.load_text("{not json")
        await pilot.press("ctrl+s")
        await tui.until(pilot, lambda: "not valid JSON" in str(error.render()))
        # JSON the task's schema refuses (echo takes an object): the daemon's 400 is shown.
        editor.load_text("[1, 2]")
        await pilot.press("ctrl+s")
        await tui.until(pilot, lambda: "expected object, got array" in str(error.render()))
        assert len((await Runs(tui.harness.client).list(task="echo")).data) == 1
        # Typed into the editor as a user would.
        editor.load_text("")
        editor.focus()
        await pilot.press(*'{"hello": "edited"}')
        await pilot.press("ctrl+s")
        replay = await new_run_completes(tui, pilot, run_id)
        assert replay is not None and replay.replayed_from == run_id
        assert replay.output_as()["echo"] == {"hello": "edited"}
        assert replay.tags == ["t1"]


TRACED = {
    "tasks/__init__.py": "",
    "tasks/traced.py": """
        import asyncio
        from pathlib import Path
        from ember import logger, task, wait

        @task(id="leaf")
        async def leaf(payload: dict) -> int:
            return 1

        @task(id="traced")
        async def traced(payload: dict) -> int:
            with logger.trace("prepare"):
                logger.info("preparing")
            gate = Path(payload["gate"])
            while not gate.exists():
                await asyncio.sleep(0.02)
            await wait.for_(seconds=0.3)
            return (await leaf.trigger_and_wait({})).unwrap()
    """,
}


async def test_the_trace_tab_draws_the_recorded_spans_live(tui: Any) -> None:
    assert (await tui.harness.register(TRACED)).status == "READY"
    gate = tui.gate()
    handle = await Tasks(tui.harness.client).trigger("traced", {"gate": str(gate)})
    app = tui.app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_detail(tui, pilot, handle.id)
        await pilot.press("w")
        view = screen.query_one(TraceView)
        # While the run executes: the attempt (open) and the span that ended already.
        await tui.until(pilot, lambda: "prepare" in str(view.render()))
        live = str(view.render())
        assert "attempt 1 · executing" in live and "◆" in live  # the log line's mark
        gate.touch()
        await tui.until(
            pilot, lambda: screen.run is not None and screen.run.status is RunStatus.COMPLETED
        )
        await tui.until(pilot, lambda: "↳ leaf · completed" in str(view.render()))
        lines = str(view.render()).splitlines()
        labels = [line[:30].strip() for line in lines[1:]]
        assert labels[:2] == ["traced", "queued"]
        assert labels[2:] == [
            "attempt 1 · completed",
            "prepare",
            "wait.for_ · process",
            "trigger_and_wait · process",
            "trigger",
            "↳ leaf · completed",
        ]
        wait_line = lines[1 + labels.index("wait.for_ · process")]
        assert "░" in wait_line and "█" not in wait_line  # a wait is a hollow bar
