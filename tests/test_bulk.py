"""Bulk actions on real runs: the daemon cancels or replays exactly what a filter matches."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Clock, Harness, running_daemon

from ember import BadRequest, NotFound, Queues, Runs, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/b.py": """
        from ember import task

        @task(id="mail")
        async def mail(payload: int) -> str:
            return f"sent {payload}"

        @task(id="other")
        async def other(payload: int) -> int:
            return payload * 2
    """,
}


def statuses(state_dir: Path) -> dict[tuple[str, str], int]:
    """Run counts by (task, status), read from the SQLite file."""
    conn = sqlite3.connect(state_dir / "ember.db")
    try:
        rows = conn.execute(
            "SELECT task_id, status, COUNT(*) FROM runs GROUP BY task_id, status"
        ).fetchall()
    finally:
        conn.close()
    return {(t, s): n for t, s, n in rows}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


@pytest.mark.timeout(600)
async def test_bulk_cancel_by_filter_over_10000_queued_runs(h: Harness) -> None:
    queues, tasks, runs = Queues(h.client), Tasks(h.client), Runs(h.client)
    await queues.pause("task/mail")
    await queues.pause("task/other")
    # 10,000 queued runs: 6,000 tagged "doomed" of two tasks, and 4,000 that must stay.
    items = [
        ("mail" if i % 3 else "other", i, {"tags": ["doomed" if i % 5 < 3 else "keep"]})
        for i in range(10_000)
    ]
    await tasks.batch_trigger(items)
    doomed = sum(1 for i in range(10_000) if i % 5 < 3)
    started = time.monotonic()
    action = await runs.bulk.cancel(filter={"status": ["QUEUED"], "tag": ["doomed"]})
    assert action.total == doomed and action.status == "RUNNING"
    # Triggered after the action began: outside its filter, never canceled.
    late = await tasks.trigger("mail", -1, tags=["doomed"])
    done = await runs.bulk.poll(action.id, timeout_s=300)
    took_s = time.monotonic() - started
    assert done.status == "COMPLETED" and done.finished_at is not None
    assert (done.processed, done.succeeded, done.failed) == (doomed, doomed, 0)
    counts = statuses(h.config.state_dir)
    canceled = counts.get(("mail", "CANCELED"), 0) + counts.get(("other", "CANCELED"), 0)
    queued = counts.get(("mail", "QUEUED"), 0) + counts.get(("other", "QUEUED"), 0)
    assert canceled == doomed
    assert queued == 10_000 - doomed + 1
    page = await runs.list(tag="doomed", status="QUEUED")
    assert [r.id for r in page.data] == [late.id]
    assert [a.id for a in await runs.bulk.list()] == [action.id]
    print(f"\nbulk cancel of {doomed:,} of 10,000 queued runs: {took_s:.1f}s")


async def test_bulk_replay_by_ids_and_bad_requests(h: Harness) -> None:
    runs = Runs(h.client)
    first = await h.run("mail", 1)
    second = await h.run("other", 2)
    action = await runs.bulk.replay(run_ids=[first.id, second.id, "run_missing"])
    done = await runs.bulk.poll(action.id, timeout_s=60)
    assert (done.total, done.succeeded, done.failed) == (3, 2, 1)
    replays = [r for r in (await runs.list(limit=10)).data if r.replayed_from is not None]
    assert sorted(r.replayed_from or "" for r in replays) == sorted([first.id, second.id])
    with pytest.raises(BadRequest, match="either filter"):
        await runs.bulk.cancel()
    with pytest.raises(BadRequest, match="either filter"):
        await runs.bulk.cancel(filter={"task": ["mail"]}, run_ids=[first.id])
    with pytest.raises(NotFound, match="bulk action bulk_nope does not exist"):
        await runs.bulk.retrieve("bulk_nope")


async def test_a_running_bulk_action_resumes_after_a_restart(state_dir: Path) -> None:
    async with running_daemon(state_dir) as h:
        await h.register(TASKS)
        await Queues(h.client).pause("task/mail")
        await Tasks(h.client).batch_trigger([("mail", i) for i in range(3000)])
        action = await Runs(h.client).bulk.cancel(filter={"task": ["mail"]})
    # Stopped mid-way (or not): the next daemon finishes the action from its cursor.
    async with running_daemon(state_dir) as h:
        done = await Runs(h.client).bulk.poll(action.id, timeout_s=120)
        assert done.status == "COMPLETED"
        assert statuses(state_dir) == {("mail", "CANCELED"): 3000}
        assert done.processed >= 3000


async def test_abort_stops_a_bulk_action_after_its_chunk(h: Harness) -> None:
    await Queues(h.client).pause("task/mail")
    await Tasks(h.client).batch_trigger([("mail", i) for i in range(5000)])
    runs = Runs(h.client)
    action = await runs.bulk.cancel(filter={"task": ["mail"]})
    # 500 runs a chunk: the first chunk is still under way when the abort arrives.
    stopped = await runs.bulk.abort(action.id)
    assert stopped.status == "ABORTED" and stopped.finished_at is not None
    assert 0 < stopped.processed < 5000
    canceled = statuses(h.config.state_dir).get(("mail", "CANCELED"), 0)
    assert canceled == stopped.succeeded


async def test_a_bulk_filter_is_bounded_by_the_daemons_clock(state_dir: Path) -> None:
    # A daemon whose clock is a day ahead of the host's: runs are created in its time, so the
    # filter's bound (``created_before``, "now" when the action starts) must be too.
    clock = Clock()
    clock.advance(86400)
    async with running_daemon(state_dir, clock=clock) as h:
        assert (await h.register(TASKS)).status == "READY"
        await Queues(h.client).pause("task/mail")
        await Tasks(h.client).batch_trigger([("mail", i) for i in range(3)])
        runs = Runs(h.client)
        action = await runs.bulk.cancel(filter={"task": ["mail"]})
        assert action.filter is not None and action.filter.created_before is not None
        assert 0 <= clock() - action.filter.created_before.timestamp() < 60
        assert 0 <= clock() - action.created_at.timestamp() < 60
        done = await runs.bulk.poll(action.id, timeout_s=60)
        assert (done.status, done.total, done.succeeded) == ("COMPLETED", 3, 3)
        assert done.finished_at is not None and done.finished_at >= done.created_at
        assert statuses(state_dir) == {("mail", "CANCELED"): 3}
