"""CRIU checkpoints with a real criu: waiting runs hold no process and resume from memory.

Skipped, with the reason, wherever `ember doctor` would say checkpoints do not work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon

from ember import Runs, RunStatus, Tasks
from ember.daemon import DaemonConfig
from ember.daemon.procs.checkpoint.restores import _namespace_children
from ember.daemon.procs.checkpoint.support import CACHE_FILE, detect

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

        @task(id="holds_file")
        async def holds_file(payload: dict) -> dict:
            # Open read-only: criu refuses to restore it once its size changed.
            held = open(payload["path"])
            secret = random.random()
            logger.info("before the wait", secret=secret)
            await wait.for_(seconds=payload["s"])
            held.close()
            return {"secret": secret}

        @task(id="heavy")
        async def heavy(payload: dict) -> dict:
            # Pages written, so they are in the image: its restore takes a while.
            ballast = b"x" * (payload["mb"] << 20)
            secret = random.random()
            logger.info("before the wait", secret=secret)
            await wait.for_(seconds=payload["s"])
            return {"secret": secret, "mb": len(ballast) >> 20}

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


async def test_an_image_is_kept_until_its_resumed_run_reports_back(criu: Harness) -> None:
    handle = await Tasks(criu.client).trigger("remember", {"s": 3})
    images = criu.config.state_dir / "checkpoints" / handle.id
    # Restored ahead of its deadline, the process is back and parked: the image stays, so a
    # daemon that dies before the deadline restores it again instead of replaying.
    await eventually(lambda: (images / "restored").exists(), timeout_s=20)
    assert (images / "meta.json").exists() and (images / "packed").is_dir()
    done = await criu.wait(handle.id)
    assert done.output_as()["secret"] == await logged_secret(Runs(criu.client), handle.id)
    assert not images.exists(), "deleted once the resumed run reported back"


async def test_an_image_from_another_machine_is_refused_and_the_run_replays(
    criu: Harness,
) -> None:
    runs = Runs(criu.client)
    handle = await Tasks(criu.client).trigger("remember", {"s": 3})
    await eventually(lambda: _dumped(criu, handle.id), timeout_s=20)
    manifest_file = criu.config.state_dir / "checkpoints" / handle.id / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["criu"] == SUPPORT.version and manifest["interpreter"] in manifest["files"]
    assert all(len(build_id) >= 32 for build_id in manifest["files"].values())
    manifest["kernel"] = "2.6.32-elsewhere"
    manifest_file.write_text(json.dumps(manifest))
    done = await criu.wait(handle.id)
    assert done.status is RunStatus.COMPLETED
    descriptions = [s.description for s in done.snapshots]
    assert any(
        "not restored: its image does not fit this machine: it was dumped on kernel "
        "2.6.32-elsewhere" in d
        for d in descriptions
    ), descriptions
    assert done.output_as()["secret"] != await logged_secret(runs, handle.id), "it replayed"


def namespace_zombies() -> list[int]:
    """This process's children (the daemon is in-process) that are zombie namespace inits."""
    found = []
    for task_dir in Path("/proc/self/task").iterdir():
        for pid in (task_dir / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/status").read_text()
                state = next(x for x in status.splitlines() if x.startswith("State:"))
                nspid = next(x for x in status.splitlines() if x.startswith("NSpid:"))
                if "Z" in state and len(nspid.split()) > 2:
                    found.append(int(pid))
    return found


async def test_a_failed_restore_is_reaped_and_the_run_replays(
    criu: Harness, tmp_path: Path
) -> None:
    held = tmp_path / "held.txt"
    held.write_text("before")
    runs = Runs(criu.client)
    handle = await Tasks(criu.client).trigger("holds_file", {"path": str(held), "s": 2})
    await eventually(lambda: _dumped(criu, handle.id), timeout_s=20)
    held.write_text("changed size")  # criu's restore fails on it, half-way through
    done = await criu.wait(handle.id)
    assert done.status is RunStatus.COMPLETED
    assert any("not restored" in s.description for s in done.snapshots)
    assert done.output_as()["secret"] != await logged_secret(runs, handle.id), "it replayed"
    assert namespace_zombies() == []


async def test_a_restore_that_times_out_kills_what_it_restored(state_dir: Path) -> None:
    # 150 MB restores in far more than 50 ms: criu is cut off half-way, every time.
    async with running_daemon(
        state_dir, checkpoint="criu", wait_park_threshold_s=0.5, criu_restore_timeout_s=0.05
    ) as h:
        assert (await h.register(TASKS)).status == "READY"
        runs = Runs(h.client)
        handle = await Tasks(h.client).trigger("heavy", {"mb": 150, "s": 1})
        await eventually(lambda: _dumped(h, handle.id), timeout_s=60)
        done = await h.wait(handle.id, timeout_s=90)
        assert done.status is RunStatus.COMPLETED
        assert any("took longer than 0.05 s" in s.description for s in done.snapshots)
        assert done.output_as()["secret"] != await logged_secret(runs, handle.id), "it replayed"
        # Nothing of the cut-off restore lives on: no namespace of a restore, no zombie, no
        # cgroup yard criu had mounted under the images when it was killed.
        assert _namespace_children(exclude=set()) == []
        assert namespace_zombies() == []
        mounts = Path("/proc/self/mountinfo").read_text()  # noqa: ASYNC240 - procfs, instant
        assert str(state_dir) not in mounts


def test_a_planted_cache_cannot_choose_the_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program of the planter's choice; it leaves a mark if anything runs it.
    evil = tmp_path / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\necho 'Version: 9.9'\n")
    evil.chmod(0o755)
    planted = tmp_path / "tmp"
    planted.mkdir()
    monkeypatch.setenv("TMPDIR", str(planted))
    monkeypatch.setattr(tempfile, "tempdir", None)
    real = shutil.which("criu") or ""
    verdict = {"ok": True, "reason": "planted", "binary": str(evil), "version": SUPPORT.version}
    old_key = f"{real}|{SUPPORT.version}|{os.uname().release}|{sys.version.split()[0]}|0.1.0"
    (planted / "ember-criu-check.json").write_text(json.dumps({"key": old_key, "support": verdict}))
    state = tmp_path / "state"
    first = detect(DaemonConfig(state_dir=state))
    assert first.ok and first.binary == os.path.realpath(real)
    cache = state / CACHE_FILE
    assert os.stat(cache).st_mode & 0o777 == 0o600
    # Even the state directory's own cache only says whether the test passed.
    cached = json.loads(cache.read_text())
    cached["support"]["binary"] = str(evil)
    cache.write_text(json.dumps(cached))
    again = detect(DaemonConfig(state_dir=state))
    assert again.ok and again.binary == os.path.realpath(real)
    assert not (tmp_path / "ran").exists()


def test_a_binary_others_can_replace_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "criu"
    shutil.copy(shutil.which("criu") or "", copy)
    copy.chmod(0o775)
    support = detect(DaemonConfig(state_dir=tmp_path / "state", criu_path=str(copy)))
    assert not support.ok
    assert support.reason.startswith(f"refusing {copy}:") and "writable by group or others" in (
        support.reason
    )
