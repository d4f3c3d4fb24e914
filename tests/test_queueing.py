"""Queues and run control: concurrency limits, idempotency, delay, TTL, cancel, time limits."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Clock, Harness, eventually, running_daemon

from ember import Call, Conflict, Runs, RunStatus, Tasks
from ember._types import Health

TASKS = {
    "tasks/__init__.py": "",
    "tasks/slow.py": """
        import asyncio, os
        from ember import Queue, Retry, task

        limited = Queue("limited", concurrency_limit=3)

        @task(id="limited", queue=limited)
        async def limited_task(payload: dict) -> int:
            await asyncio.sleep(0.02)
            return payload["i"]

        @task(id="sleeper")
        async def sleeper(payload: dict) -> str:
            await asyncio.sleep(payload.get("s", 30))
            return "woke"

        @task(id="forever", max_duration_s=1, retry=Retry(max_attempts=3))
        async def forever(payload: dict) -> None:
            await asyncio.sleep(3600)

        @task(id="dies", retry=Retry(max_attempts=2, min_timeout_s=0.1))
        async def dies(payload: dict) -> None:
            os._exit(3)

        @task(id="quick")
        async def quick(payload: dict) -> int:
            return payload.get("i", 0)
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = peak = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


async def test_concurrency_limit_holds_under_200_concurrent_triggers(h: Harness) -> None:
    tasks = Tasks(h.client)
    handles = await asyncio.gather(*(tasks.trigger("limited", {"i": i}) for i in range(200)))
    runs = await asyncio.gather(*(h.wait(handle.id, 60) for handle in handles))
    assert sorted(r.output_as(int) for r in runs) == list(range(200))
    intervals = [
        (r.attempts[0].started_at.timestamp(), r.attempts[0].finished_at.timestamp())
        for r in runs
        if r.attempts[0].finished_at is not None
    ]
    assert len(intervals) == 200
    assert max_overlap(intervals) <= 3
    assert max_overlap(intervals) == 3, "the limit should also be used, not just respected"


async def test_concurrency_key_gives_each_key_its_own_limit(h: Harness) -> None:
    tasks = Tasks(h.client)
    handles = await asyncio.gather(
        *(tasks.trigger("limited", {"i": i}, concurrency_key=f"user-{i % 2}") for i in range(24))
    )
    runs = await asyncio.gather(*(h.wait(handle.id, 60) for handle in handles))
    for key in ("user-0", "user-1"):
        intervals = [
            (r.attempts[0].started_at.timestamp(), r.attempts[0].finished_at.timestamp())
            for r in runs
            if r.concurrency_key == key and r.attempts[0].finished_at is not None
        ]
        assert max_overlap(intervals) <= 3


async def test_idempotency_key_returns_the_same_run(h: Harness) -> None:
    tasks = Tasks(h.client)
    first = await tasks.trigger("quick", {"i": 1}, idempotency_key="order-1")
    again = await tasks.trigger("quick", {"i": 2}, idempotency_key="order-1")
    other = await tasks.trigger("quick", {"i": 3}, idempotency_key="order-2")
    assert again.id == first.id and again.is_cached and not first.is_cached
    assert other.id != first.id
    assert (await h.wait(first.id)).output_as(int) == 1


async def test_idempotency_key_expires_after_its_ttl(state_dir: Path) -> None:
    # The daemon's clock moves past the TTL: no sleeping for it to pass.
    clock = Clock()
    async with running_daemon(state_dir, clock=clock) as h:
        assert (await h.register(TASKS)).status == "READY"
        tasks = Tasks(h.client)
        first = await tasks.trigger("quick", {}, idempotency_key="k", idempotency_key_ttl="1h")
        held = await tasks.trigger("quick", {}, idempotency_key="k")
        assert held.id == first.id and held.is_cached
        clock.advance(3601)
        later = await tasks.trigger("quick", {}, idempotency_key="k")
        assert later.id != first.id and not later.is_cached


async def test_failed_run_frees_its_idempotency_key(h: Harness) -> None:
    tasks = Tasks(h.client)
    first = await tasks.trigger("dies", {}, idempotency_key="once", max_attempts=1)
    assert (await h.wait(first.id)).status is RunStatus.CRASHED
    retry = await tasks.trigger("quick", {}, idempotency_key="once")
    assert retry.id != first.id


async def test_delay_holds_the_run_then_starts_it(h: Harness) -> None:
    handle = await Tasks(h.client).trigger("quick", {"i": 5}, delay="0.5s")
    assert (await Runs(h.client).retrieve(handle.id)).status is RunStatus.DELAYED
    run = await h.wait(handle.id)
    assert run.output_as(int) == 5
    waited = (run.attempts[0].started_at - run.created_at).total_seconds()
    assert waited >= 0.49


async def test_reschedule_moves_a_delayed_run(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("quick", {}, delay="1h")
    await runs.reschedule(handle.id, timedelta(seconds=0.2))
    run = await h.wait(handle.id, 10)
    assert run.status is RunStatus.COMPLETED


async def test_ttl_expires_a_run_that_cannot_start(harness: Harness) -> None:
    await harness.register(TASKS)
    tasks = Tasks(harness.client)
    # Fill the three slots of the queue so that the next run cannot start in time.
    hold = [await tasks.trigger("sleeper", {"s": 30}, queue="limited") for _ in range(3)]
    await eventually(lambda: _all_executing(harness, [x.id for x in hold]))
    late = await tasks.trigger("quick", {}, queue="limited", ttl="0.3s")
    run = await harness.wait(late.id, 10)
    assert run.status is RunStatus.EXPIRED
    assert run.attempts == []
    for x in hold:
        await Runs(harness.client).cancel(x.id)


async def _all_executing(h: Harness, ids: list[str]) -> bool:
    runs = Runs(h.client)
    statuses = [(await runs.retrieve(i)).status for i in ids]
    return all(status is RunStatus.EXECUTING for status in statuses)


async def test_cancel_stops_an_executing_run(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("sleeper", {"s": 60})
    await eventually(lambda: _all_executing(h, [handle.id]))
    pid = (await runs.retrieve(handle.id)).attempts[0].pid
    canceled = await runs.cancel(handle.id)
    assert canceled.status is RunStatus.CANCELED
    assert canceled.attempts[0].status == "CANCELED"
    assert pid is not None
    await eventually(lambda: not _alive(pid), timeout_s=5)
    with pytest.raises(Conflict):
        await runs.cancel(handle.id)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


async def test_cancel_a_queued_run_never_executes_it(h: Harness) -> None:
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("quick", {}, delay="10s")
    await runs.cancel(handle.id)
    run = await runs.retrieve(handle.id)
    assert run.status is RunStatus.CANCELED and run.attempts == []


async def test_max_duration_ends_the_run_timed_out(h: Harness) -> None:
    started = time.monotonic()
    run = await h.run("forever", {}, timeout_s=20)
    assert run.status is RunStatus.TIMED_OUT
    assert len(run.attempts) == 1, "TIMED_OUT is final, as in Trigger.dev"
    assert run.error is not None and run.error.code == "MAX_DURATION_EXCEEDED"
    assert time.monotonic() - started < 10


async def test_a_dying_process_crashes_the_attempt_and_retries(h: Harness) -> None:
    run = await h.run("dies", {})
    assert run.status is RunStatus.CRASHED
    assert [a.status for a in run.attempts] == ["CRASHED", "CRASHED"]
    assert run.error is not None and "exited with status 3" in run.error.message


async def test_replay_runs_the_same_payload_again(h: Harness) -> None:
    first = await h.run("quick", {"i": 9}, tags=["a"])
    replay = await Runs(h.client).replay(first.id)
    run = await h.wait(replay.id)
    assert run.output_as(int) == 9 and run.replayed_from == first.id and run.tags == ["a"]


async def _active_runs(h: Harness) -> int:
    return (await h.client.request(Call("GET", "/healthz", Health))).active_runs


async def test_a_run_delayed_beyond_the_horizon_waits_in_the_table_alone(state_dir: Path) -> None:
    async with running_daemon(state_dir, delayed_in_memory_s=60.0) as h:
        await h.register(TASKS)
        tasks, runs = Tasks(h.client), Runs(h.client)
        later = await tasks.trigger("quick", {"i": 1}, delay="1h")
        dropped = await tasks.trigger("quick", {}, delay="1h")
        assert await _active_runs(h) == 0, "no object and no timer for a run due in an hour"
        assert (await runs.retrieve(later.id)).status is RunStatus.DELAYED
        assert (await runs.cancel(dropped.id)).status is RunStatus.CANCELED
    # After a restart it is still only in the table, and every action still reaches it.
    async with running_daemon(state_dir, delayed_in_memory_s=60.0) as h:
        runs = Runs(h.client)
        assert await _active_runs(h) == 0
        assert (await runs.retrieve(later.id)).status is RunStatus.DELAYED
        assert (await runs.retrieve(dropped.id)).status is RunStatus.CANCELED
        await runs.reschedule(later.id, timedelta(seconds=0.2))
        run = await h.wait(later.id, 10)
        assert run.status is RunStatus.COMPLETED
        assert run.output_as(int) == 1


async def test_a_dormant_run_is_brought_in_as_its_start_nears(state_dir: Path) -> None:
    async with running_daemon(state_dir, delayed_in_memory_s=1.0) as h:
        await h.register(TASKS)
        runs = Runs(h.client)
        handle = await Tasks(h.client).trigger("quick", {"i": 7}, delay="3s")
        assert await _active_runs(h) == 0
        # Only reads that leave it where it is (retrieve, not a long poll) until it is done.
        await eventually(lambda: _final(runs, handle.id), timeout_s=10, interval_s=0.1)
        run = await runs.retrieve(handle.id)
        assert run.status is RunStatus.COMPLETED
        waited = (run.attempts[0].started_at - run.created_at).total_seconds()
        assert 2.99 <= waited < 5.0


async def _final(runs: Runs, run_id: str) -> bool:
    return (await runs.retrieve(run_id)).is_final
