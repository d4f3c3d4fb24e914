"""Batch records on real runs: one record per batch, counts, chunks, idempotency, completion."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from conftest import Clock, Harness, eventually, running_daemon

from ember import Batch, Batches, BatchInfo, Conflict, NotFound, Queues, Runs, RunStatus, Tasks
from ember._batch import CHUNK_ITEMS
from ember._client import Call
from ember._types import BatchEvent, BatchItem, BatchItemsRequest, BatchItemsResponse

TASKS = {
    "tasks/__init__.py": "",
    "tasks/b.py": """
        from ember import task

        @task(id="echo")
        async def echo(payload: int) -> int:
            return payload

        @task(id="neg")
        async def neg(payload: int) -> int:
            return -payload

        @task(id="boom", retry=None)
        async def boom(payload: int) -> int:
            raise ValueError("no")

        @task(id="fan-out")
        async def fan_out(payload: int) -> dict:
            results = await echo.batch_trigger_and_wait(list(range(payload)))
            outputs = [r.unwrap() for r in results]
            return {"n": len(outputs), "in_order": outputs == list(range(payload))}
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    return harness


@pytest.mark.timeout(600)
async def test_25000_item_batch_is_one_record_and_waits_return_in_order(h: Harness) -> None:
    started = time.monotonic()
    parent = await h.run("fan-out", 25_000, timeout_s=600)
    took_s = time.monotonic() - started
    assert parent.status is RunStatus.COMPLETED, parent.error
    assert parent.output_as(dict) == {"n": 25_000, "in_order": True}
    runs = Runs(h.client)
    first = (await runs.list(parent=parent.id, limit=1)).data[0]
    assert first.batch_id is not None
    info = await Batches(h.client).retrieve(first.batch_id)
    assert info.run_count == 25_000 and info.received == 25_000
    assert info.counts == {"COMPLETED": 25_000}
    assert info.status == "COMPLETED" and info.finished_at is not None
    seen = 0
    cursor = None
    while True:
        page = await runs.list(batch=info.id, limit=1000, cursor=cursor)
        seen += len(page.data)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == 25_000
    print(f"\n25,000-item batch_trigger_and_wait: {took_s:.1f}s")


async def test_a_batch_across_tasks_counts_and_completes_with_an_event(h: Harness) -> None:
    events: list[BatchInfo] = []

    async def listen() -> None:
        async for event in h.client.events():
            if isinstance(event, BatchEvent):
                events.append(event.batch)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # subscribed before the batch completes
    try:
        batches = Batches(h.client)
        made = await batches.trigger([("echo", 1), ("neg", 2), ("boom", 3)])
        assert [r.task_id for r in made] == ["echo", "neg", "boom"]
        info = await made.wait(timeout_s=60)
        assert info.counts == {"COMPLETED": 2, "FAILED": 1}
        assert info.run_count == 3
        await eventually(lambda: len(events) == 1)
        assert events[0].id == made.id and events[0].status == "COMPLETED"
        listed = await Runs(h.client).list(batch=made.id)
        assert sorted(r.id for r in listed.data) == sorted(r.id for r in made)
    finally:
        listener.cancel()


async def test_big_batches_stream_in_chunks_and_their_key_returns_the_same_batch(
    h: Harness,
) -> None:
    count = CHUNK_ITEMS * 2 + 500
    first = await Tasks(h.client).batch_trigger([("echo", i) for i in range(count)])
    assert len(first) == count
    info = await first.wait(timeout_s=120)
    assert info.counts == {"COMPLETED": count}
    outputs = [(await Runs(h.client).retrieve(r.id)).output_as(int) for r in first[-3:]]
    assert outputs == [count - 3, count - 2, count - 1]

    batches = Batches(h.client)
    keyed = await batches.trigger([("echo", i) for i in range(1500)], idempotency_key="nightly")
    again = await batches.trigger([("echo", i) for i in range(1500)], idempotency_key="nightly")
    assert again.id == keyed.id and again.is_cached and not keyed.is_cached
    assert [r.id for r in again] == [r.id for r in keyed]
    done = await again.wait(timeout_s=60)
    assert done.counts == {"COMPLETED": 1500}


async def test_chunks_arrive_in_order_and_a_resent_chunk_makes_no_new_runs(h: Harness) -> None:
    batches = Batches(h.client)
    created = await h.client.request(
        Call("POST", "/api/v2/batches", BatchInfo, body=b'{"run_count": 4}')
    )
    assert created.status == "PENDING"

    def chunk(start: int, payloads: list[int]) -> Call[BatchItemsResponse]:
        items = [BatchItem(task="echo", payload=msgspec.Raw(b"%d" % p)) for p in payloads]
        body = msgspec.json.encode(BatchItemsRequest(start_index=start, items=items))
        return Call("POST", f"/api/v2/batches/{created.id}/items", BatchItemsResponse, body=body)

    with pytest.raises(Conflict, match="send the chunk starting at 0"):
        await h.client.request(chunk(2, [2, 3]))
    one = await h.client.request(chunk(0, [0, 1]))
    assert one.status == "PENDING" and one.received == 2
    resent = await h.client.request(chunk(0, [0, 1]))
    assert [r.id for r in resent.runs] == [r.id for r in one.runs]
    assert all(r.is_cached for r in resent.runs)
    with pytest.raises(Conflict, match="holds 4 items"):
        await h.client.request(chunk(2, [2, 3, 4]))
    last = await h.client.request(chunk(2, [2, 3]))
    assert last.status == "PROCESSING" and last.received == 4

    async def completed() -> bool:
        return (await batches.retrieve(created.id)).status == "COMPLETED"

    await eventually(completed)
    assert (await batches.retrieve(created.id)).counts == {"COMPLETED": 4}
    with pytest.raises(NotFound, match="batch nope does not exist"):
        await batches.retrieve("nope")


async def test_an_open_batch_completes_after_a_restart(state_dir: Path) -> None:
    async with running_daemon(state_dir) as h:
        await h.register(TASKS)
        # Paused: the runs stay QUEUED, so the batch is still open when the daemon stops.
        await Queues(h.client).pause("task/echo")
        made = await Batches(h.client).trigger([("echo", i) for i in range(20)])
        assert (await made.retrieve()).status == "PROCESSING"
    async with running_daemon(state_dir) as h:
        await Queues(h.client).resume("task/echo")
        info = await Batch(made.id, [], h.client).wait(timeout_s=60)
        assert info.counts == {"COMPLETED": 20}


async def test_a_batch_key_expires_after_its_ttl_by_the_daemons_clock(state_dir: Path) -> None:
    # The daemon's clock moves past the key's TTL: no sleeping for it to pass.
    clock = Clock()
    async with running_daemon(state_dir, clock=clock) as h:
        assert (await h.register(TASKS)).status == "READY"
        batches = Batches(h.client)
        items = [("echo", i) for i in range(3)]
        first = await batches.trigger(items, idempotency_key="hourly", idempotency_key_ttl="1h")
        info = await first.wait(timeout_s=60)
        # Its times are the daemon's: created and finished a moment ago by its clock.
        assert info.finished_at is not None
        assert 0 <= clock() - info.created_at.timestamp() < 60
        assert info.created_at <= info.finished_at
        clock.advance(1800)
        held = await batches.trigger(items, idempotency_key="hourly")
        assert held.id == first.id and held.is_cached
        clock.advance(1801)
        later = await batches.trigger(items, idempotency_key="hourly")
        assert later.id != first.id and not later.is_cached
        assert (await later.wait(timeout_s=60)).counts == {"COMPLETED": 3}
