"""Queue management as a user reaches it: the SDK's ``queues`` and ``ember queues``."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import Harness, eventually
from conftest import ember_cli as ember

from ember import NotFound, Queues, Runs, RunStatus, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/q.py": """
        from ember import Queue, task

        emails = Queue("emails", concurrency_limit=2)

        @task(id="send", queue=emails)
        async def send(payload: dict) -> int:
            return payload["i"]
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


async def test_sdk_pauses_resumes_and_overrides_a_queue(h: Harness) -> None:
    queues, tasks, runs = Queues(h.client), Tasks(h.client), Runs(h.client)
    assert "emails" in [q.name for q in await queues.list()]
    paused = await queues.pause("emails")
    assert paused.paused
    handle = await tasks.trigger("send", {"i": 7})
    run = await runs.retrieve(handle.id)
    assert run.status is RunStatus.QUEUED
    assert run.queued_reason is not None and "paused" in run.queued_reason
    assert (await queues.retrieve("emails")).queued == 1
    await queues.resume("emails")
    assert (await h.wait(handle.id)).output_as(int) == 7
    assert (await queues.override_concurrency_limit("emails", 5)).concurrency_limit == 5
    assert (await queues.reset_concurrency_limit("emails")).concurrency_limit == 2
    with pytest.raises(NotFound, match="queue 'nope' does not exist"):
        await queues.retrieve("nope")


async def test_cli_lists_pauses_resumes_and_limits(h: Harness) -> None:
    listed = await asyncio.to_thread(ember, h, "queues", "list")
    assert listed.returncode == 0, listed.stderr
    assert "emails" in listed.stdout and "running" in listed.stdout
    paused = await asyncio.to_thread(ember, h, "queues", "pause", "emails", "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["paused"] is True
    handle = await Tasks(h.client).trigger("send", {"i": 1})
    await asyncio.sleep(0)
    assert (await Runs(h.client).retrieve(handle.id)).status is RunStatus.QUEUED
    resumed = await asyncio.to_thread(ember, h, "queues", "resume", "emails")
    assert resumed.returncode == 0 and "emails  running" in resumed.stdout
    assert (await h.wait(handle.id)).output_as(int) == 1
    limited = await asyncio.to_thread(ember, h, "queues", "limit", "emails", "9", "--json")
    assert json.loads(limited.stdout)["concurrency_limit"] == 9
    reset = await asyncio.to_thread(ember, h, "queues", "limit", "emails", "reset", "--json")
    assert json.loads(reset.stdout)["concurrency_limit"] == 2
    bad = await asyncio.to_thread(ember, h, "queues", "limit", "emails", "lots")
    assert bad.returncode != 0 and "'lots' is not a limit" in bad.stderr
    missing = await asyncio.to_thread(ember, h, "queues", "pause", "nope")
    assert missing.returncode == 1 and "queue 'nope' does not exist" in missing.stderr

    async def drained() -> bool:
        return (await Queues(h.client).retrieve("emails")).queued == 0

    await eventually(drained)
