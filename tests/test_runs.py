"""Runs end to end: trigger, output, retries, failures, logs, payload types."""

from __future__ import annotations

import pytest
from conftest import Harness

from ember import BadRequest, Runs, RunStatus, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/basic.py": """
        import msgspec
        from ember import AbortTaskRunError, Context, Retry, logger, task

        class Order(msgspec.Struct):
            id: int
            amount_cents: int

        @task(id="echo")
        async def echo(payload: dict, ctx: Context) -> dict:
            logger.info("echoing", keys=sorted(payload))
            print("a printed line")
            return {"payload": payload, "attempt": ctx.attempt, "run": ctx.run_id}

        @task(id="charge")
        async def charge(order: Order) -> int:
            return order.amount_cents * 2

        @task(
            id="always-fails",
            retry=Retry(max_attempts=3, min_timeout_s=0.2, factor=2, randomize=False),
        )
        async def always_fails(payload: dict) -> None:
            raise ValueError(f"bad input {payload.get('n')}")

        @task(id="aborts")
        async def aborts(payload: dict) -> None:
            raise AbortTaskRunError("this cannot work: giving up")

        @task(id="blocking")
        def blocking(payload: dict) -> str:
            import threading
            return threading.current_thread().name

        @task(id="no-payload")
        async def no_payload() -> str:
            return "ok"

        @task(id="allocates")
        async def allocates(payload: dict) -> int:
            block = b"x" * payload["bytes"]  # written, so resident, and freed on return
            return len(block)
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


async def test_trigger_completes_with_output_and_history(h: Harness) -> None:
    run = await h.run("echo", {"b": 2, "a": 1})
    assert run.status is RunStatus.COMPLETED
    output = run.output_as()
    assert output == {"payload": {"b": 2, "a": 1}, "attempt": 1, "run": run.id}
    assert [s.status for s in run.snapshots] == ["RUN_CREATED", "QUEUED", "EXECUTING", "FINISHED"]
    assert len(run.attempts) == 1 and run.attempts[0].status == "COMPLETED"
    assert run.attempts[0].cpu_s is not None and run.attempts[0].peak_rss_bytes
    assert run.version is not None
    assert run.attempts[0].version == run.version


async def test_peak_rss_is_the_attempts_own(h: Harness) -> None:
    big = await h.run("allocates", {"bytes": 200 * 1024 * 1024})
    small = await h.run("allocates", {"bytes": 1})
    # Same process (idle processes are reused), so it could have inherited the mark.
    assert big.attempts[0].pid == small.attempts[0].pid
    big_peak, small_peak = big.attempts[0].peak_rss_bytes, small.attempts[0].peak_rss_bytes
    assert big_peak is not None and small_peak is not None
    # The block was gone when the attempt ended: only the high-water mark saw it.
    assert big_peak > 200 * 1024 * 1024
    # A later attempt in the same process does not inherit that mark.
    assert small_peak < 150 * 1024 * 1024


async def test_logs_and_prints_are_recorded_with_the_run(h: Harness) -> None:
    from ember import Runs

    run = await h.run("echo", {"x": 1})
    logs = (await Runs(h.client).logs(run.id)).data
    assert [(line.level, line.message) for line in logs] == [
        ("info", "echoing"),
        ("info", "a printed line"),
    ]
    assert logs[0].attrs == {"keys": ["x"]}


async def test_failure_retries_with_backoff_then_fails_with_stack(h: Harness) -> None:
    run = await h.run("always-fails", {"n": 7})
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error.name == "ValueError"
    assert run.error.message == "bad input 7"
    assert "raise ValueError" in run.error.stack
    assert [a.status for a in run.attempts] == ["FAILED", "FAILED", "FAILED"]
    gaps = [
        (later.started_at - earlier.finished_at).total_seconds()
        for earlier, later in zip(run.attempts, run.attempts[1:], strict=False)
        if earlier.finished_at is not None
    ]
    # min_timeout 0.2 s, factor 2, no jitter: 0.2 s then 0.4 s.
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps


async def test_abort_fails_at_once_without_retrying(h: Harness) -> None:
    run = await h.run("aborts", {})
    assert run.status is RunStatus.FAILED
    assert len(run.attempts) == 1
    assert run.error is not None and run.error.name == "AbortTaskRunError"


async def test_max_attempts_option_overrides_the_task(h: Harness) -> None:
    run = await h.run("always-fails", {}, max_attempts=1)
    assert run.status is RunStatus.FAILED and len(run.attempts) == 1


async def test_plain_function_runs_in_a_thread(h: Harness) -> None:
    run = await h.run("blocking", {})
    assert run.status is RunStatus.COMPLETED
    assert run.output_as(str) != "MainThread"


async def test_task_without_payload_parameter(h: Harness) -> None:
    run = await h.run("no-payload")
    assert run.output_as(str) == "ok"


async def test_typed_payload_is_validated_before_the_run_is_accepted(h: Harness) -> None:
    good = await h.run("charge", {"id": 1, "amount_cents": 250})
    assert good.output_as(int) == 500
    # Triggered by id, the daemon checks the payload against the task's schema: no run.
    with pytest.raises(BadRequest, match=r"\$\.amount_cents: expected integer, got string"):
        await Tasks(h.client).trigger("charge", {"id": 1, "amount_cents": "lots"})
    assert len((await Runs(h.client).list(task="charge")).data) == 1


async def test_batch_trigger_returns_handles_in_order(h: Harness) -> None:
    handles = await Tasks(h.client).batch_trigger([("echo", {"i": i}) for i in range(20)])
    runs = [await h.wait(handle.id) for handle in handles]
    assert [r.output_as()["payload"]["i"] for r in runs] == list(range(20))
    assert len({r.batch_id for r in runs}) == 1 and runs[0].batch_id is not None


async def test_large_payload_and_output_round_trip(h: Harness) -> None:
    blob = "x" * (700 * 1024)  # over the 512 KB inline limit: stored as a file
    run = await h.run("echo", {"blob": blob})
    assert run.payload and len(bytes(run.payload)) > 700 * 1024
    assert run.output_as()["payload"]["blob"] == blob
    assert any((h.config.state_dir / "blobs").rglob("*"))
