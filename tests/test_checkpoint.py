"""CRIU checkpoints with a real criu: waiting runs hold no process and resume from memory.

Skipped, with the reason, wherever `ember doctor` would say checkpoints do not work.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import Runs, RunStatus, Tasks
from ember.daemon import DaemonConfig
from ember.daemon._checkpoint import detect

with tempfile.TemporaryDirectory() as _state:
    SUPPORT = detect(DaemonConfig(state_dir=Path(_state)))
pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}"),
]

TASKS = {
    "tasks/__init__.py": "",
    "tasks/held.py": """
        import os, random
        from ember import logger, task, wait

        @task(id="remember")
        async def remember(payload: dict) -> dict:
            # Values only this process's memory holds: a replay would draw new ones.
            secret = random.random()
            numbers = [random.randrange(10**9) for _ in range(1000)]
            logger.info("before the wait", secret=secret)
            await wait.for_(seconds=payload["s"])
            return {"secret": secret, "checksum": sum(numbers), "count": len(numbers)}

        @task(id="leaf")
        async def leaf(payload: dict) -> int:
            return payload["n"] + 1

        @task(id="tree")
        async def tree(payload: dict) -> dict:
            token = random.random()
            result = await leaf.trigger_and_wait({"n": 41})
            return {"token": token, "leaf": result.unwrap()}
    """,
}


@pytest.fixture
async def criu(state_dir: Path) -> AsyncIterator[Harness]:
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=0.5) as h:
        assert h.daemon.checkpoint_strategy == "criu"
        info = await h.register(TASKS)
        assert info.status == "READY", info.error
        yield h


async def status_is(runs: Runs, run_id: str, status: RunStatus) -> bool:
    return (await runs.retrieve(run_id)).status is status


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def logged_secret(runs: Runs, run_id: str) -> float:
    lines = (await runs.logs(run_id)).data
    return float(lines[0].attrs["secret"])


async def test_a_checkpointed_run_resumes_with_its_memory(criu: Harness) -> None:
    runs = Runs(criu.client)
    handle = await Tasks(criu.client).trigger("remember", {"s": 2})
    await eventually(lambda: _dumped(criu, handle.id), timeout_s=20)
    run = await runs.retrieve(handle.id)
    assert run.status is RunStatus.WAITING
    assert run.attempts[0].pid is not None and not alive(run.attempts[0].pid)
    done = await criu.wait(handle.id)
    output = done.output_as()
    assert output["secret"] == await logged_secret(runs, handle.id)
    assert output["count"] == 1000
    assert not any((criu.config.state_dir / "checkpoints").iterdir()), "images are single-use"
    # Restored ahead of its deadline (the restore began before it), then resumed on time.
    held = next(s for s in done.snapshots if s.description.endswith("held by checkpoint"))
    restored = next(s for s in done.snapshots if s.description.startswith("restored its process"))
    restore_ms = float(restored.description.split()[-2])
    restore_began = restored.created_at - timedelta(milliseconds=restore_ms)
    assert restore_began < held.created_at + timedelta(seconds=2)
    assert "resumed in its parked process" in [s.description for s in done.snapshots]


def _dumped(h: Harness, run_id: str) -> bool:
    images = h.config.state_dir / "checkpoints" / run_id
    return (images / "meta.json").exists()


async def test_a_parent_awaits_its_child_with_checkpoints_on(criu: Harness) -> None:
    run = await criu.run("tree", {})
    assert run.output_as()["leaf"] == 42


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_waiting_30s_holds_no_process_and_survives_a_daemon_restart(state_dir: Path) -> None:
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=5) as h:
        await h.register(TASKS)
        runs = Runs(h.client)
        handle = await Tasks(h.client).trigger("remember", {"s": 30})
        await eventually(lambda: _dumped(h, handle.id), timeout_s=20)
        pid = (await runs.retrieve(handle.id)).attempts[0].pid
        assert pid is not None and not alive(pid)
        assert [p for p in h.daemon.supervisor.processes() if p.run_id == handle.id] == []
        secret = await logged_secret(runs, handle.id)
    # The daemon is stopped; the image on disk is all that holds the run.
    assert _dumped_in(state_dir, handle.id)
    async with running_daemon(state_dir, checkpoint="criu", wait_park_threshold_s=5) as h:
        run = await h.wait(handle.id, timeout_s=60)
        assert run.status is RunStatus.COMPLETED
        assert run.output_as()["secret"] == secret, "resumed from memory, not re-executed"
        waited = (run.finished_at - run.created_at).total_seconds()  # type: ignore[operator]
        assert waited >= 30


def _dumped_in(state: Path, run_id: str) -> bool:
    return (state / "checkpoints" / run_id / "meta.json").exists() and os.stat(
        state / "checkpoints"
    ).st_mode & 0o777 == 0o700
