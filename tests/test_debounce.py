"""Debounce on real runs: 50 triggers with one key collapse into one run, with the right payload."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import Clock, Harness, running_daemon

from ember import BadRequest, Runs, RunStatus, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/d.py": """
        from ember import task

        @task(id="digest")
        async def digest(payload: dict) -> dict:
            return payload
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


@pytest.mark.parametrize(("mode", "kept"), [("leading", 0), ("trailing", 49)])
async def test_50_triggers_collapse_into_one_run(h: Harness, mode: str, kept: int) -> None:
    tasks, runs = Tasks(h.client), Runs(h.client)
    debounce = {"key": f"user-1-{mode}", "delay": "1s", "mode": mode}
    handles = [
        await tasks.trigger("digest", {"i": i}, debounce=debounce, metadata={"i": i})
        for i in range(50)
    ]
    last_trigger = time.time()
    assert len({handle.id for handle in handles}) == 1
    assert not handles[0].is_cached and all(handle.is_cached for handle in handles[1:])
    run = await h.wait(handles[0].id)
    assert run.status is RunStatus.COMPLETED
    assert run.output_as(dict) == {"i": kept}
    assert run.metadata == {"i": kept}
    # Each trigger pushed the start back: the run began a delay after the last one.
    assert run.attempts[0].started_at.timestamp() >= last_trigger + 1.0 - 0.05
    listed = await runs.list(task="digest")
    assert [r.id for r in listed.data] == [run.id]
    # The run left DELAYED: the key starts a new run.
    again = await tasks.trigger("digest", {"i": 99}, debounce=debounce)
    assert again.id != run.id and not again.is_cached
    assert (await h.wait(again.id)).output_as(dict) == {"i": 99}


async def test_a_concurrent_burst_makes_one_run(h: Harness) -> None:
    tasks = Tasks(h.client)
    debounce = {"key": "burst", "delay": "0.5s", "mode": "trailing"}
    handles = await asyncio.gather(
        *(tasks.trigger("digest", {"i": i}, debounce=debounce) for i in range(50))
    )
    assert len({handle.id for handle in handles}) == 1
    run = await h.wait(handles[0].id)
    assert run.output_as(dict)["i"] in range(50)
    assert len((await Runs(h.client).list(task="digest")).data) == 1


async def test_max_delay_caps_the_pushes(state_dir: Path) -> None:
    # The daemon's clock moves on between the triggers: a delay of a minute, capped at 150 s,
    # without waiting for either.
    clock = Clock()
    async with running_daemon(state_dir, clock=clock, cancel_grace_s=1.0, process_idle_s=30.0) as h:
        assert (await h.register(TASKS)).status == "READY"
        tasks = Tasks(h.client)
        debounce = {"key": "capped", "delay": "60s", "max_delay": "150s"}
        first = await tasks.trigger("digest", {"i": 0}, debounce=debounce)
        created = (await Runs(h.client).retrieve(first.id)).created_at.timestamp()
        # Triggers 50 s apart push the start on each time, which would never end without
        # the cap; at 150 s the cap is reached and the run starts.
        for _ in range(3):
            clock.advance(50)
            pushed = await tasks.trigger("digest", {"i": 1}, debounce=debounce)
            assert pushed.id == first.id and pushed.is_cached
        run = await h.wait(first.id)
        started = run.attempts[0].started_at.timestamp()
        assert created + 150 <= started <= created + 150 + 30
        assert run.output_as(dict) == {"i": 0}
        # The run left DELAYED: the key makes a new run.
        after = await tasks.trigger("digest", {"i": 2}, debounce=debounce)
        assert after.id != first.id and not after.is_cached


async def test_bad_debounce_options_say_what_is_wrong(h: Harness) -> None:
    tasks = Tasks(h.client)
    with pytest.raises(BadRequest, match=r"options.debounce.delay: .*not a duration"):
        await tasks.trigger("digest", {}, debounce={"key": "k", "delay": "soon"})
    with pytest.raises(BadRequest, match="max_delay: must be at least the delay"):
        await tasks.trigger("digest", {}, debounce={"key": "k", "delay": "5s", "max_delay": "1s"})
    with pytest.raises(BadRequest, match="debounce is for single triggers"):
        await tasks.batch_trigger([("digest", {}, {"debounce": {"key": "k", "delay": 1}})])
