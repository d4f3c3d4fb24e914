"""Run metadata changed while runs execute, with real run processes: operations, the parent's
and the root's, 50 concurrent children adding up exactly, the 256 KB cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from conftest import Harness, ember_cli, eventually, running_daemon

from ember import Call, OutsideRunError, PayloadTooLarge, Runs, RunStatus, Tasks, metadata
from ember._metadata import MetadataResponse

TASKS = {
    "tasks/__init__.py": "",
    "tasks/meta.py": """
        import asyncio
        from pathlib import Path
        from ember import PayloadTooLarge, metadata, task

        @task(id="progress")
        async def progress(payload: dict) -> dict:
            metadata.set("stage", "download")
            metadata.increment("done", 3)
            metadata.decrement("done")
            metadata.append("files", "a.csv")
            metadata.append("files", "b.csv")
            metadata.remove("files", "a.csv")
            metadata.set("temp", 1)
            metadata.delete("temp")
            await metadata.flush()
            gate = Path(payload["gate"])
            while not gate.exists():
                await asyncio.sleep(0.02)
            metadata.set("stage", "done")
            try:
                metadata.set("huge", "x" * 300_000)
            except PayloadTooLarge as exc:
                refused = str(exc)
            return {"seen": metadata.current(), "refused": refused}

        @task(id="counter")
        async def counter(payload: dict) -> None:
            metadata.parent.increment("done")
            metadata.root.append("seen", payload["n"])
            await asyncio.sleep(0.05)  # (the children overlap)

        @task(id="fan")
        async def fan(payload: dict) -> int:
            metadata.replace({"done": 0, "seen": []})
            await metadata.flush()
            results = await counter.batch_trigger_and_wait([{"n": i} for i in range(payload["n"])])
            return sum(r.ok for r in results)
    """,
}


@pytest.fixture
async def h(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(state_dir, checkpoint="park") as harness:
        info = await harness.register(TASKS)
        assert info.status == "READY", info.error
        yield harness


async def test_operations_apply_while_the_run_executes_and_stay(h: Harness, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    runs = Runs(h.client)
    handle = await Tasks(h.client).trigger("progress", {"gate": str(gate)}, metadata={"user": 7})

    async def flushed() -> bool:
        return ((await runs.retrieve(handle.id)).metadata or {}).get("stage") == "download"

    await eventually(flushed)  # mid-run, after the explicit flush
    assert (await runs.retrieve(handle.id)).metadata == {
        "user": 7,
        "stage": "download",
        "done": 2,
        "files": ["b.csv"],
    }
    gate.touch()
    run = await h.wait(handle.id)
    assert run.status is RunStatus.COMPLETED, run.error
    expected = {"user": 7, "stage": "done", "done": 2, "files": ["b.csv"]}
    output = run.output_as()
    assert output["seen"] == expected  # the run's own view
    assert run.metadata == expected  # flushed at the attempt's end; the refused key is not
    assert "over the limit of 262144 (256 KB)" in output["refused"]
    shown = await asyncio.to_thread(ember_cli, h, "runs", "show", run.id)
    assert 'metadata {"user":7,"stage":"done","done":2,"files":["b.csv"]}' in shown.stdout


async def test_fifty_concurrent_children_add_up_exactly_on_their_parent(h: Harness) -> None:
    run = await h.run("fan", {"n": 50}, timeout_s=90)
    assert run.status is RunStatus.COMPLETED and run.output_as() == 50
    assert run.metadata is not None
    assert run.metadata["done"] == 50
    assert sorted(run.metadata["seen"]) == list(range(50))


async def test_the_daemon_refuses_metadata_over_256_kb_and_keeps_what_it_had(h: Harness) -> None:
    run = await h.run("counter", {"n": 1})  # (no parent: its parent operation is dropped)
    assert run.metadata == {"seen": [1]}
    body = msgspec.json.encode(
        {"operations": [{"type": "set", "key": "k", "value": "x" * 300_000}]}
    )
    call = Call("PUT", f"/api/v1/runs/{run.id}/metadata", MetadataResponse, body=body)
    with pytest.raises(PayloadTooLarge, match=r"metadata of run .* over the limit .*reference"):
        await h.client.request(call)
    assert (await Runs(h.client).retrieve(run.id)).metadata == {"seen": [1]}
    bad = msgspec.json.encode({"operations": [{"type": "increment", "key": "seen", "value": 1}]})
    from ember import BadRequest

    with pytest.raises(BadRequest, match="not a number"):
        await h.client.request(
            Call("PUT", f"/api/v1/runs/{run.id}/metadata", MetadataResponse, body=bad)
        )


def test_metadata_outside_a_run_says_where_it_works() -> None:
    with pytest.raises(OutsideRunError, match=r"metadata\.set\(\) works inside a run only"):
        metadata.set("k", 1)
