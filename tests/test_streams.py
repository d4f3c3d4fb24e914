"""Run streams with real run processes: 10,000 chunks complete and in order, live and after."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import BadRequest, OutsideRunError, Streams, Tasks, streams

TASKS = {
    "tasks/__init__.py": "",
    "tasks/talk.py": """
        import asyncio
        from pathlib import Path
        from ember import streams, task

        async def tokens(n):
            for i in range(n):
                yield {"i": i, "text": f"token {i}"}
                if i % 500 == 0:
                    await asyncio.sleep(0)

        @task(id="talker")
        async def talker(payload: dict) -> int:
            streams.append("progress", "started")
            gate = Path(payload["gate"])
            while not gate.exists():
                await asyncio.sleep(0.02)
            piped = await streams.pipe("tokens", tokens(payload["n"]))
            streams.append("progress", "done")
            return len(piped)
    """,
}


@pytest.fixture
async def h(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(state_dir) as harness:
        assert (await harness.register(TASKS)).status == "READY"
        yield harness


async def test_ten_thousand_chunks_arrive_complete_and_in_order(h: Harness, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    reader = Streams(h.client)
    handle = await Tasks(h.client).trigger("talker", {"gate": str(gate), "n": 10_000})
    # A live subscriber sees the chunk sent before the gate while the run still executes.
    await eventually(lambda: _chunks(reader, handle.id, "progress", ["started"]))
    live: list[object] = []

    async def follow() -> None:
        async for chunk in reader.subscribe(handle.id, "tokens"):
            live.append(chunk)

    follower = asyncio.create_task(follow())
    gate.touch()
    run = await h.wait(handle.id, timeout_s=60)
    assert run.output_as(int) == 10_000
    await asyncio.wait_for(follower, 30)  # ends by itself: the run is final, all came
    expected = [{"i": i, "text": f"token {i}"} for i in range(10_000)]
    assert live == expected
    assert await reader.read(handle.id, "tokens") == expected  # readable after the run
    assert await reader.read(handle.id, "progress") == ["started", "done"]


async def _chunks(reader: Streams, run_id: str, name: str, want: list[object]) -> bool:
    return await reader.read(run_id, name) == want


async def test_stream_names_are_checked_and_appends_need_a_run(h: Harness) -> None:
    handle = await Tasks(h.client).trigger("talker", {"gate": "/nonexistent", "n": 0})
    with pytest.raises(BadRequest, match=r"stream name 'bad\*name'"):
        await Streams(h.client).read(handle.id, "bad*name")
    with pytest.raises(OutsideRunError, match=r"streams\.append\(\) works inside a run only"):
        streams.append("tokens", "x")
