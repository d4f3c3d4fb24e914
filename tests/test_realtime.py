"""Realtime subscriptions against real daemons: every change of a run in order, metadata and
output included, across a daemon restart; runs by tag and by batch; bad filters."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon
from daemon_proc import DaemonProc, first_life, wait_answering

from ember import BadRequest, Call, Client, ClientSettings, Runs, RunUpdate, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/live.py": """
        import asyncio
        from pathlib import Path
        from ember import metadata, task

        @task(id="gated")
        async def gated(payload: dict) -> str:
            metadata.set("stage", "waiting")
            await metadata.flush()
            gate = Path(payload["gate"])
            while not gate.exists():
                await asyncio.sleep(0.02)
            return "through"

        @task(id="quick")
        async def quick(payload: dict) -> int:
            return payload["n"]
    """,
}


@pytest.fixture
async def h(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(state_dir, checkpoint="park") as harness:
        assert (await harness.register(TASKS)).status == "READY"
        yield harness


async def _collect(updates: AsyncIterator[RunUpdate], into: list[RunUpdate]) -> None:
    async for update in updates:
        into.append(update)


async def test_a_subscriber_sees_every_change_in_order_with_metadata_and_output(
    h: Harness, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("gated", {"gate": str(gate)})
    seen: list[RunUpdate] = []
    follower = asyncio.create_task(_collect(runs.subscribe(handle.id), seen))
    await eventually(lambda: any(u.run.metadata == {"stage": "waiting"} for u in seen))
    gate.touch()
    await asyncio.wait_for(follower, 30)  # it ends by itself after the final update
    run = await runs.retrieve(handle.id)
    changes = [u for u in seen if u.snapshot != "METADATA"]
    assert [u.snapshot for u in changes] == [s.status for s in run.snapshots]
    ids = [int(u.event_id) for u in changes]
    assert ids == sorted(set(ids))
    assert seen[-1].snapshot == "FINISHED" and seen[-1].run.output_as(str) == "through"
    assert any(u.snapshot == "METADATA" and u.run.metadata for u in seen)


async def test_runs_of_a_tag_and_of_a_batch_are_followed(h: Harness) -> None:
    runs = Runs(h.client)
    tagged: list[RunUpdate] = []
    follower = asyncio.create_task(_collect(runs.subscribe_to_tag("nightly"), tagged))
    first = await Tasks(h.client).trigger("quick", {"n": 1}, tags=["nightly"])
    await Tasks(h.client).trigger("quick", {"n": 2}, tags=["other"])
    second = await Tasks(h.client).trigger("quick", {"n": 3}, tags=["nightly"])
    await eventually(lambda: sum(u.snapshot == "FINISHED" for u in tagged) == 2)
    follower.cancel()
    assert {u.run.id for u in tagged} == {first.id, second.id}
    batch = await Tasks(h.client).batch_trigger([("quick", {"n": i}) for i in range(3)])
    done: list[RunUpdate] = []
    follower = asyncio.create_task(_collect(runs.subscribe_to_batch(batch.id), done))
    await eventually(lambda: sum(u.snapshot == "FINISHED" for u in done) == 3)
    follower.cancel()
    assert sorted(u.run.output_as(int) for u in done if u.snapshot == "FINISHED") == [0, 1, 2]


async def test_a_subscription_names_what_it_needs(h: Harness) -> None:
    with pytest.raises(BadRequest, match="exactly one of run_id, tag or batch_id"):
        await h.client.request(
            Call("GET", "/api/v1/realtime/runs?tag=a&batch_id=b", dict)  # type: ignore[arg-type]
        )


async def test_a_subscription_resumes_without_a_gap_across_a_daemon_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    gate = tmp_path / "gate"
    daemon, client = await first_life(state, (), TASKS)
    second: DaemonProc | None = None
    try:
        handle = await Tasks(client).trigger("gated", {"gate": str(gate)})
        watcher = Client(ClientSettings(socket_path=daemon.socket))
        seen: list[RunUpdate] = []
        follower = asyncio.create_task(_collect(Runs(watcher).subscribe(handle.id), seen))
        await eventually(lambda: any(u.snapshot == "EXECUTING" for u in seen))
        daemon.signal(signal.SIGKILL)  # the run is interrupted, and resumes on the next daemon
        await asyncio.to_thread(daemon.wait_exit)
        second = DaemonProc(state)
        second.start()
        await wait_answering(client)
        gate.touch()
        await asyncio.wait_for(follower, 60)
        run = await Runs(client).retrieve(handle.id)
        changes = [u.snapshot for u in seen if u.snapshot != "METADATA"]
        assert changes == [s.status for s in run.snapshots]  # all of them, once, in order
        assert changes.count("EXECUTING") >= 2  # (before and after the restart)
        assert seen[-1].run.output_as(str) == "through"
        await watcher.aclose()
    finally:
        await client.aclose()
        daemon.stop()
        if second is not None:
            second.stop()
