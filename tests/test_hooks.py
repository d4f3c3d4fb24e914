"""Lifecycle hooks, middleware, locals and errors that must not retry, with real runs.

Every hook logs ``hook:<what>`` with the run; the tests read the run's log lines back, so
each order and count below is what a real run process did.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import Run, Runs, RunStatus, Tasks

INIT = """
    from ember import logger, tasks

    def mark(what):
        def hook(params):
            logger.info("hook:" + what)
        return hook

    for name in ("on_start_attempt", "on_success", "on_failure", "on_complete", "catch_error"):
        getattr(tasks, name)(mark("global:" + name))

    @tasks.middleware("global")
    async def around(params):
        logger.info("hook:global:middleware:before")
        await params.next()
        logger.info("hook:global:middleware:after")
"""

HOOKED = """
    import asyncio
    from ember import (
        AbortTaskRunError, CatchErrorResult, Context, Retry, locals, logger, task, tasks, wait,
    )

    def mark(what):
        def hook(params):
            logger.info("hook:" + what)
        return hook

    async def task_middleware(params):
        logger.info("hook:task:middleware:before")
        await params.next()
        logger.info("hook:task:middleware:after")

    @task(
        id="hooked",
        middleware=[task_middleware],
        on_start_attempt=mark("task:on_start_attempt"),
        on_success=mark("task:on_success"),
        on_failure=mark("task:on_failure"),
        on_complete=mark("task:on_complete"),
    )
    async def hooked(payload: dict) -> str:
        logger.info("hook:run")
        return "ok"

    FAST = Retry(max_attempts=2, min_timeout_s=0.01, max_timeout_s=0.01, randomize=False)

    def catch(params):
        logger.info(f"hook:catch_error:{params.retry_delay_s is not None}")

    @task(id="always-fails", retry=FAST, on_failure=mark("task:on_failure"), catch_error=catch)
    async def always_fails(payload: dict, ctx: Context) -> None:
        logger.info(f"hook:run:{ctx.attempt}")
        raise RuntimeError("broken")

    @task(
        id="skips",
        retry=Retry(max_attempts=3, min_timeout_s=0.01, randomize=False),
        catch_error=lambda params: CatchErrorResult(skip_retrying=True),
        on_failure=mark("task:on_failure"),
    )
    async def skips(payload: dict) -> None:
        raise RuntimeError("not worth retrying")

    @task(
        id="retries-now",
        retry=Retry(max_attempts=2, min_timeout_s=30, randomize=False),
        catch_error=lambda params: CatchErrorResult(retry_delay_s=0),
    )
    async def retries_now(payload: dict, ctx: Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return ctx.attempt

    def refuse_first(params):
        if params.ctx.attempt == 1:
            raise RuntimeError("on_start_attempt refused")

    @task(id="start-fails", retry=FAST, on_start_attempt=refuse_first)
    async def start_fails(payload: dict, ctx: Context) -> int:
        return ctx.attempt

    def explode(params):
        raise ValueError("on_success exploded")

    @task(id="after-hook-fails", on_success=explode, on_complete=mark("task:on_complete"))
    async def after_hook_fails(payload: dict) -> str:
        return "fine"

    CONN = locals.create("conn", str)

    async def connect(params):
        logger.info(f"hook:local-before:{locals.get(CONN)}")
        locals.set(CONN, f"conn-{params.ctx.attempt}")
        await params.next()

    @task(id="uses-locals", retry=FAST, middleware=[connect])
    async def uses_locals(payload: dict, ctx: Context) -> str:
        conn = locals.get_or_throw(CONN)
        if ctx.attempt == 1:
            raise RuntimeError("retry with a new connection")
        return conn

    @task(id="aborts", retry=Retry(max_attempts=3, min_timeout_s=0.01))
    async def aborts(payload: dict) -> None:
        raise AbortTaskRunError("never retry this")

    @task(id="bad-trigger", retry=Retry(max_attempts=3, min_timeout_s=0.01))
    async def bad_trigger(payload: dict) -> None:
        # The daemon refuses it (400: hooked takes an object); no retry can change that.
        await tasks.trigger("hooked", ["not", "an", "object"])

    def on_cancel(params):
        conn = locals.get(CONN)  # what the middleware set for this attempt
        logger.info(f"hook:task:on_cancel:{params.grace_s > 0}:{params.run.done()}:{conn}")

    @task(
        id="cancellable",
        middleware=[connect],
        on_cancel=on_cancel,
        on_failure=mark("task:on_failure"),
    )
    async def cancellable(payload: dict) -> None:
        logger.info("hook:run")
        try:
            await asyncio.sleep(60)
        finally:
            logger.info("hook:run:cleanup")
"""

WAITS = """
    from ember import logger, task, wait

    def on_wait(params):
        logger.info(f"hook:on_wait:{params.wait.kind}:{params.wait.seq}")

    def on_resume(params):
        logger.info(f"hook:on_resume:{params.wait.kind}:{params.wait.seq}")

    @task(id="child")
    async def child(payload: dict) -> int:
        return 7

    @task(id="waits-twice", on_wait=on_wait, on_resume=on_resume)
    async def waits_twice(payload: dict) -> int:
        logger.info("hook:run")
        await wait.for_(seconds=payload["s"])
        result = await child.trigger_and_wait({})
        await wait.for_(seconds=payload["s"])
        return result.unwrap()
"""

RETRY_BLOCK = """
    from ember import BadRequest, Context, logger, retry, task

    @task(id="flaky-block")
    async def flaky_block(payload: dict, ctx: Context) -> dict:
        calls = []

        async def call(attempt: int) -> int:
            calls.append(attempt)
            if attempt < 3:
                raise ConnectionError("try again")
            return attempt

        result = await retry.on_throw(call, max_attempts=5, min_timeout_s=0.01, randomize=False)
        refused = []

        async def refuse() -> None:
            refused.append(1)
            raise BadRequest(400, "wrong for good")

        try:
            await retry.on_throw(refuse, max_attempts=5, min_timeout_s=0.01)
        except BadRequest:
            pass
        return {"result": result, "calls": calls, "refused": len(refused), "attempt": ctx.attempt}
"""

CPU = """
    import time
    from ember import heartbeats, task

    @task(id="cpu-loop")
    async def cpu_loop(payload: dict) -> int:
        deadline = time.monotonic() + payload["s"]
        turns = 0
        while time.monotonic() < deadline:
            sum(range(1000))  # CPU-bound work that never awaits by itself
            turns += 1
            if payload["yield"]:
                await heartbeats.yield_()
        return turns
"""

FILES = {
    "tasks/__init__.py": "",
    "tasks/init.py": INIT,
    "tasks/hooked.py": HOOKED,
    "tasks/waits.py": WAITS,
    "tasks/retry_block.py": RETRY_BLOCK,
    "tasks/cpu.py": CPU,
}


async def start(h: Harness) -> Harness:
    info = await h.register(FILES)
    assert info.status == "READY", info.error
    return h


@pytest.fixture
async def h(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(state_dir, cancel_grace_s=3.0, process_idle_s=30.0) as harness:
        yield await start(harness)


async def hooks_of(h: Harness, run: Run | str) -> list[str]:
    run_id = run if isinstance(run, str) else run.id
    page = await Runs(h.client).logs(run_id)
    return [line.message[5:] for line in page.data if line.message.startswith("hook:")]


async def test_hooks_and_middleware_run_in_trigger_dev_order(h: Harness) -> None:
    run = await h.run("hooked", {})
    assert run.status is RunStatus.COMPLETED, run.error
    assert await hooks_of(h, run) == [
        "global:middleware:before",
        "task:middleware:before",
        "global:on_start_attempt",
        "task:on_start_attempt",
        "run",
        "global:on_success",
        "task:on_success",
        "global:on_complete",
        "task:on_complete",
        "task:middleware:after",
        "global:middleware:after",
    ]


async def test_on_failure_fires_once_after_the_last_attempt(h: Harness) -> None:
    run = await h.run("always-fails", {})
    assert run.status is RunStatus.FAILED and len(run.attempts) == 2
    events = [e for e in await hooks_of(h, run) if "middleware" not in e]
    assert events == [
        "global:on_start_attempt",
        "run:1",
        "catch_error:True",  # a retry is coming: catch_error is told its delay
        "global:catch_error",  # the task's returned None: the global one decides next
        "global:on_start_attempt",
        "run:2",
        "catch_error:False",  # the last attempt: no retry to delay
        "global:catch_error",
        "global:on_failure",
        "task:on_failure",
        "global:on_complete",
    ]


async def test_catch_error_can_skip_retrying(h: Harness) -> None:
    run = await h.run("skips", {})
    assert run.status is RunStatus.FAILED and len(run.attempts) == 1
    events = await hooks_of(h, run)
    assert "task:on_failure" in events
    assert "global:catch_error" not in events  # the task's own hook had the first word


async def test_catch_error_can_choose_the_retry_delay(h: Harness) -> None:
    # The policy would wait 30 s before the retry; catch_error says now.
    run = await h.run("retries-now", {}, timeout_s=20)
    assert run.status is RunStatus.COMPLETED and run.output_as(int) == 2


async def test_an_error_in_on_start_attempt_fails_the_attempt(h: Harness) -> None:
    run = await h.run("start-fails", {})
    assert run.status is RunStatus.COMPLETED and run.output_as(int) == 2
    assert run.attempts[0].error is not None
    assert "on_start_attempt refused" in run.attempts[0].error.message


async def test_errors_in_after_hooks_are_logged_and_ignored(h: Harness) -> None:
    run = await h.run("after-hook-fails", {})
    assert run.status is RunStatus.COMPLETED and run.output_as(str) == "fine"
    page = await Runs(h.client).logs(run.id)
    errors = [line.message for line in page.data if line.level == "error"]
    assert any("on_success exploded" in m and "ignored" in m for m in errors), errors
    assert "task:on_complete" in await hooks_of(h, run)  # the hooks after it still ran


async def test_locals_live_for_one_attempt(h: Harness) -> None:
    run = await h.run("uses-locals", {})
    assert run.status is RunStatus.COMPLETED
    assert run.output_as(str) == "conn-2"
    # Each attempt started without the value the one before had set.
    assert [e for e in await hooks_of(h, run) if e.startswith("local")] == [
        "local-before:None",
        "local-before:None",
    ]


@pytest.mark.parametrize("task_id", ["aborts", "bad-trigger"])
async def test_errors_that_cannot_succeed_are_not_retried(h: Harness, task_id: str) -> None:
    run = await h.run(task_id, {})
    assert run.status is RunStatus.FAILED
    assert len(run.attempts) == 1, f"{task_id} was retried: {run.attempts}"
    if task_id == "bad-trigger":
        assert run.error is not None and run.error.name == "BadRequest"


async def test_retry_on_throw_retries_one_block(h: Harness) -> None:
    run = await h.run("flaky-block", {})
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output_as(dict) == {"result": 3, "calls": [1, 2, 3], "refused": 1, "attempt": 1}


async def test_on_cancel_fires_while_executing_and_on_failure_does_not(h: Harness) -> None:
    handle = await Tasks(h.client).trigger("cancellable", {})
    await eventually(lambda: _has_hook(h, handle.id, "run"))
    await Runs(h.client).cancel(handle.id)
    run = await h.wait(handle.id)
    assert run.status is RunStatus.CANCELED
    # on_cancel runs while the run function still runs (with time to spare), then the
    # run function is canceled and its cleanup runs; on_failure does not fire.
    await eventually(lambda: _has_hook(h, handle.id, "run:cleanup"))
    events = await hooks_of(h, handle.id)
    assert events[-2:] == ["task:on_cancel:True:False:conn-1", "run:cleanup"]
    assert "task:on_failure" not in events


async def _has_hook(h: Harness, run_id: str, event: str) -> bool:
    return event in await hooks_of(h, run_id)


EXPECTED_WAITS = [
    "on_wait:duration:1",
    "on_resume:duration:1",
    "on_wait:run:2",
    "on_resume:run:2",
    "on_wait:duration:3",
    "on_resume:duration:3",
]


@pytest.mark.parametrize("strategy", ["park", "replay"])
async def test_wait_hooks_fire_once_per_wait(state_dir: Path, strategy: str) -> None:
    # Waits of 1 s over a 0.5 s threshold: each is held by the strategy (replay: the
    # process exits and the run re-executes from its journal three times).
    async with running_daemon(
        state_dir, checkpoint=strategy, wait_park_threshold_s=0.5, cancel_grace_s=1.0
    ) as harness:
        h = await start(harness)
        run = await h.run("waits-twice", {"s": 1.0}, timeout_s=60)
        assert run.status is RunStatus.COMPLETED and run.output_as(int) == 7
        events = await hooks_of(h, run)
        assert [e for e in events if e.startswith("on_")] == EXPECTED_WAITS
        runs_of_function = events.count("run")
        # replay re-executes after each duration wait (the child ends before the run wait
        # is held), and the journal answers the waits already over without their hooks.
        assert runs_of_function == (3 if strategy == "replay" else 1)


def _criu_support() -> tuple[bool, str]:
    import tempfile

    from ember.daemon import DaemonConfig
    from ember.daemon.procs.checkpoint.support import detect

    with tempfile.TemporaryDirectory() as folder:
        support = detect(DaemonConfig(state_dir=Path(folder)))
    return support.ok, support.reason


@pytest.mark.criu
async def test_wait_hooks_fire_once_per_wait_under_criu(state_dir: Path) -> None:
    ok, reason = _criu_support()
    if not ok:
        pytest.skip(f"no working CRIU: {reason}")
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=0.5) as harness:
        assert harness.daemon.checkpoint_strategy == "criu"
        h = await start(harness)
        run = await h.run("waits-twice", {"s": 1.5}, timeout_s=90)
        assert run.status is RunStatus.COMPLETED, run.error
        events = await hooks_of(h, run)
        assert [e for e in events if e.startswith("on_")] == EXPECTED_WAITS
        assert events.count("run") == 1  # restored from memory, never re-executed


@pytest.mark.parametrize("yields", [True, False], ids=["yield_", "no-yield"])
async def test_heartbeats_yield_keeps_a_cpu_loop_alive(state_dir: Path, yields: bool) -> None:
    # A 10 s loop under a 4 s heartbeat timeout: without yield_ the daemon kills it as
    # stalled (that case shows the check can fail, and needs only the first 4-5 s).
    async with running_daemon(
        state_dir, heartbeat_interval_s=1.0, heartbeat_timeout_s=4.0, process_idle_s=30.0
    ) as harness:
        h = await start(harness)
        run = await h.run("cpu-loop", {"s": 10.0, "yield": yields}, timeout_s=90, max_attempts=1)
        if yields:
            assert run.status is RunStatus.COMPLETED, run.error
            assert run.output_as(int) > 0
        else:
            assert run.status is not RunStatus.COMPLETED


async def test_the_example_project_uses_hooks_and_middleware(harness: Harness) -> None:
    examples = Path(__file__).parent.parent / "examples"
    files = {
        str(path.relative_to(examples)): path.read_text()
        for path in (examples / "tasks").glob("*.py")
    }
    info = await harness.register(files)
    assert info.status == "READY", info.error
    run = await harness.run("place-order", {"id": 7, "cents": 1250}, timeout_s=60)
    assert run.status is RunStatus.COMPLETED, run.error
    messages = [line.message for line in (await Runs(harness.client).logs(run.id)).data]
    assert "waiting on a run" in messages and "waiting on a duration" in messages  # on_wait
    assert "attempt finished" in messages  # the global middleware in examples/tasks/init.py
    assert f"run {run.id} succeeded" in messages  # the global on_complete


async def test_locals_outside_a_run_say_where_they_work() -> None:
    from ember import OutsideRunError, heartbeats, locals

    key = locals.create("conn", str)
    with pytest.raises(OutsideRunError, match="only works inside a task run"):
        locals.set(key, "x")
    await heartbeats.yield_()  # harmless anywhere: it only gives the loop a turn
