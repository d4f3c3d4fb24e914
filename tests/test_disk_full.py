"""A full disk: the end of an attempt that cannot be written is retried, never dropped."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import eventually, make_archive, running_daemon

from ember import InsufficientStorage, Runs, RunStatus, Tasks

TASKS = {
    "tasks/__init__.py": "",
    "tasks/gated.py": """
        import asyncio
        import pathlib
        from ember import Context, task

        @task(id="gated")
        async def gated(payload: dict, ctx: Context) -> int:
            # Silent on purpose: its output file is on the full disk too.
            while not pathlib.Path(payload["gate"]).exists():
                await asyncio.sleep(0.02)
            if payload.get("fail_first") and ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            return ctx.attempt
    """,
}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of our own, so that filling it fills no one else's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("durability", ["normal", "fsync"])
async def test_end_of_attempt_written_once_the_disk_has_room(
    small_disk: Path, tmp_path: Path, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = small_disk / "state"
    state.mkdir()
    gate = tmp_path / "gate"
    # min_free_bytes=0: this test fills the disk on purpose, past the 507 guard (test_ops).
    async with running_daemon(
        state, durability=durability, cancel_grace_s=1.0, min_free_bytes=0
    ) as h:
        await h.register(TASKS)
        tasks, runs = Tasks(h.client), Runs(h.client)
        done = await tasks.trigger("gated", {"gate": str(gate)})
        retried = await tasks.trigger("gated", {"gate": str(gate), "fail_first": True})

        async def executing() -> bool:
            found = [await runs.retrieve(r.id) for r in (done, retried)]
            return all(r.status is RunStatus.EXECUTING for r in found)

        await eventually(executing)
        filler = fill(small_disk)
        with caplog.at_level(logging.ERROR, logger="ember.daemon"):
            gate.touch()
            engine = h.daemon.engine

            def retrying(run_id: str) -> bool:
                return (
                    sum(
                        run_id in r.getMessage() and "retrying" in r.getMessage()
                        for r in caplog.records
                    )
                    >= 2
                )

            # Both ends failed to commit at least twice and are still held in memory.
            await eventually(lambda: retrying(done.id) and retrying(retried.id))
            assert engine.active[done.id].status is RunStatus.COMPLETED
            assert engine.active[retried.id].status is RunStatus.QUEUED
            assert (await runs.retrieve(done.id)).status is RunStatus.EXECUTING
            filler.unlink()
            first = await h.wait(done.id)
            second = await h.wait(retried.id)
        assert first.status is RunStatus.COMPLETED and first.output_as(int) == 1
        assert [a.status for a in first.attempts] == ["COMPLETED"]
        # The failed attempt was recorded, then the run requeued and its retry completed.
        assert second.status is RunStatus.COMPLETED and second.output_as(int) == 2
        assert [a.status for a in second.attempts] == ["FAILED", "COMPLETED"]
        assert done.id not in engine.active and retried.id not in engine.active


async def refused_trigger(tasks: Tasks, payload: dict[str, str]) -> InsufficientStorage:
    """Trigger until the daemon says its disk is full (SQLite's free pages take a few rows)."""
    for _ in range(200):
        try:
            await tasks.trigger("gated", payload)
        except InsufficientStorage as exc:
            return exc
    raise AssertionError("200 triggers on a full disk were all accepted")


async def test_a_full_disk_answers_507_and_leaves_no_partial_blob(small_disk: Path) -> None:
    state = small_disk / "state"
    state.mkdir()
    async with running_daemon(state, min_free_bytes=0) as h:  # the write itself fails
        await h.register(TASKS)
        tasks = Tasks(h.client)
        filler = fill(small_disk)
        try:
            # Over 512 KB, the payload goes to a blob file first; under, into SQLite.
            for payload in ({"gate": "x" * 600_000}, {"gate": "small"}):
                refused = await refused_trigger(tasks, payload)
                assert refused.status == 507
                assert f"the disk is full: free space under {state}" in refused.detail
            archive = make_archive({"tasks/__init__.py": "", "tasks/big.py": "x = 1\n" * 9000})
            transport = httpx.AsyncHTTPTransport(uds=str(h.config.api_socket))
            async with httpx.AsyncClient(transport=transport, base_url="http://ember") as http:
                response = await http.post("/api/v1/versions", content=archive)
            assert response.status_code == 507, response.text
            assert "the disk is full" in response.json()["error"]
        finally:
            filler.unlink()
        blobs = state / "blobs"
        assert [p.name for p in blobs.rglob("*.tmp")] == [] if blobs.exists() else True
        assert [p.name for p in (state / "code").iterdir() if p.name.endswith(".tmp")] == []
        # With room again, the same trigger is accepted.
        await tasks.trigger("gated", {"gate": "x" * 600_000})
