"""Queue rate limits on real runs: exact windows from attempt start times, across a restart."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from conftest import Clock, Harness, eventually, running_daemon

from ember import ConfigError, Queue, Queues, RateLimit, Runs, RunStatus, Tasks, task

# Scaled periods (seconds instead of a minute) keep the tests short; the semantics are the
# same: no window of one period holds more attempt starts than the limit.
TASKS = {
    "tasks/__init__.py": "",
    "tasks/limited.py": """
        from ember import Queue, RateLimit, task

        per_queue = Queue("per-queue", rate_limit=RateLimit(limit=100, period="2s"))
        per_minute = Queue("per-minute", rate_limit=RateLimit(limit=100, period="1m"))
        per_key = Queue("per-key", rate_limit=RateLimit(limit=5, period=1, per_key=True))
        slow = Queue("slow", rate_limit=RateLimit(limit=1, period="1h"))

        @task(id="rated", queue=per_queue)
        async def rated(payload: dict) -> int:
            return payload["i"]

        @task(id="minutely", queue=per_minute)
        async def minutely(payload: dict) -> int:
            return payload["i"]

        @task(id="keyed", queue=per_key)
        async def keyed(payload: dict) -> int:
            return payload["i"]

        @task(id="hourly", queue=slow)
        async def hourly(payload: dict) -> int:
            return payload["i"]
    """,
}


def attempt_starts(state_dir: Path, queue: str) -> dict[str | None, list[float]]:
    """Every attempt start of a queue's runs, by concurrency key, read from the SQLite file."""
    conn = sqlite3.connect(state_dir / "ember.db")
    try:
        rows = conn.execute(
            "SELECT r.concurrency_key, a.started_at FROM attempts a JOIN runs r"
            " ON r.id = a.run_id WHERE r.queue = ? ORDER BY a.started_at",
            (queue,),
        ).fetchall()
    finally:
        conn.close()
    out: dict[str | None, list[float]] = {}
    for key, started_at in rows:
        out.setdefault(key, []).append(started_at)
    return out


def assert_within_limit(starts: list[float], limit: int, period_s: float) -> None:
    """No window of ``period_s`` holds more than ``limit`` starts."""
    for i in range(limit, len(starts)):
        assert starts[i] - starts[i - limit] >= period_s, (
            f"starts {i - limit} and {i} are {starts[i] - starts[i - limit]:.3f}s apart: "
            f"{limit + 1} starts within {period_s}s"
        )


@pytest.mark.parametrize(
    ("task_id", "queue_name", "period_s"),
    [
        ("rated", "per-queue", 2.0),
        # The real thing, 100 a minute: over two minutes, so only with `-m soak`.
        pytest.param(
            "minutely", "per-minute", 60.0, marks=[pytest.mark.soak, pytest.mark.timeout(600)]
        ),
    ],
)
async def test_300_runs_on_a_100_per_period_limit_across_a_restart(
    state_dir: Path, task_id: str, queue_name: str, period_s: float
) -> None:
    async with running_daemon(state_dir, cancel_grace_s=1.0) as h:
        info = await h.register(TASKS)
        assert info.status == "READY", info.error
        tasks = Tasks(h.client)
        handles = await tasks.batch_trigger([(task_id, {"i": i}) for i in range(300)])
        ids = [r.id for r in handles]
        runs = Runs(h.client)
        # The first window lets 100 start; the rest wait QUEUED with the reason visible.
        await eventually(
            lambda: sum(map(len, attempt_starts(state_dir, queue_name).values())) >= 100
        )
        waiting = await runs.retrieve(ids[-1])
        assert waiting.status is RunStatus.QUEUED
        assert waiting.queued_reason is not None and "rate limit" in waiting.queued_reason
        queue = await Queues(h.client).retrieve(queue_name)
        assert queue.rate_limit == RateLimit(limit=100, period=period_s)
        assert queue.rate_limited_until is not None
    # A restart within the window: the new daemon counts the starts the old one made.
    async with running_daemon(state_dir, cancel_grace_s=1.0) as h:
        done = [await h.wait(run_id, period_s * 3 + 60) for run_id in ids]
        assert all(r.status is RunStatus.COMPLETED for r in done)
        assert [r.output_as(int) for r in done] == list(range(300))
    starts = attempt_starts(state_dir, queue_name)[None]
    assert len(starts) >= 300
    assert_within_limit(starts, 100, period_s)
    # It is a limit on speed, not a stall: the three windows follow one another.
    assert starts[-1] - starts[0] < period_s * 3 + 30


async def test_a_per_key_rate_limit_gives_each_concurrency_key_its_own_window(
    harness: Harness,
) -> None:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    tasks = Tasks(harness.client)
    handles = [
        await tasks.trigger("keyed", {"i": i}, concurrency_key=f"user-{i % 2}") for i in range(30)
    ]
    for handle in handles:
        assert (await harness.wait(handle.id, 60)).status is RunStatus.COMPLETED
    by_key = attempt_starts(harness.config.state_dir, "per-key")
    assert sorted(by_key) == ["user-0", "user-1"]
    for starts in by_key.values():
        assert len(starts) == 15
        assert_within_limit(starts, 5, 1.0)
    # Both keys start their first five at once: the windows are separate.
    together = sorted(s for starts in by_key.values() for s in starts)
    assert together[9] - together[0] < 1.0


def next_start_in_s(reason: str) -> float:
    """The seconds a queued reason says the next run may start in."""
    found = re.search(r"the next may start in ([0-9.]+)s", reason)
    assert found is not None, reason
    return float(found.group(1))


async def test_runs_over_the_limit_wait_queued_and_cancel_frees_nothing_twice(
    state_dir: Path,
) -> None:
    # The daemon's clock: the window and the "next may start in" message are in its time.
    clock = Clock()
    async with running_daemon(
        state_dir, clock=clock, cancel_grace_s=1.0, process_idle_s=30.0
    ) as harness:
        info = await harness.register(TASKS)
        assert info.status == "READY", info.error
        tasks, runs = Tasks(harness.client), Runs(harness.client)
        first = await tasks.trigger("hourly", {"i": 0})
        assert (await harness.wait(first.id)).output_as(int) == 0
        second = await tasks.trigger("hourly", {"i": 1})

        async def queued_with_reason() -> bool:
            run = await runs.retrieve(second.id)
            return run.queued_reason is not None

        await eventually(queued_with_reason)
        run = await runs.retrieve(second.id)
        assert run.status is RunStatus.QUEUED
        assert run.queued_reason is not None
        assert "1 starts per 3600s" in run.queued_reason
        assert 3500 < next_start_in_s(run.queued_reason) <= 3600
        # Half the window later by the daemon's clock, half of it is left.
        clock.advance(1800)
        run = await runs.retrieve(second.id)
        assert run.status is RunStatus.QUEUED and run.queued_reason is not None
        assert 1700 < next_start_in_s(run.queued_reason) <= 1800
        canceled = await runs.cancel(second.id)
        assert canceled.status is RunStatus.CANCELED


def test_a_rate_limit_is_checked_where_the_task_is_declared() -> None:
    with pytest.raises(ConfigError, match="limit must be a whole number"):

        @task(id="bad", queue=Queue("q", rate_limit=RateLimit(limit=0, period="1m")))
        async def bad(payload: None) -> None: ...

    with pytest.raises(ConfigError, match="period"):

        @task(id="bad2", queue=Queue("q", rate_limit=RateLimit(limit=1, period="soon")))
        async def bad2(payload: None) -> None: ...
