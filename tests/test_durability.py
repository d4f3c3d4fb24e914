"""The durability contract: a daemon killed with -9 mid-work loses no accepted run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import eventually, make_archive

from ember import (
    Call,
    Client,
    ClientSettings,
    DaemonUnavailable,
    EmberError,
    Runs,
    RunStatus,
    Tasks,
)
from ember._types import VersionInfo

TASKS = {
    "tasks/__init__.py": "",
    "tasks/work.py": """
        import asyncio
        from ember import task

        @task(id="work")
        async def work(payload: dict) -> int:
            await asyncio.sleep(0.03)
            return payload["i"] * 2
    """,
}


class DaemonProcess:
    """``ember daemon`` as a real child process."""

    def __init__(self, state: Path, durability: str = "normal") -> None:
        self.state = state
        self.durability = durability
        self.socket = state / "api.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.state / "daemon.out", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.cli",
                "daemon",
                "--state-dir",
                str(self.state),
                "--socket",
                str(self.socket),
                "--max-concurrent-runs",
                "8",
                "--durability",
                self.durability,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(params=["normal", "fsync"])
def daemon_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon under each durability: commits on its loop (normal) or on a thread (fsync)."""
    state = tmp_path / "state"
    state.mkdir()
    daemon = DaemonProcess(state, request.param)
    yield daemon
    daemon.stop()


async def wait_ready(client: Client) -> None:
    async def ready() -> bool:
        try:
            await client.request(Call("GET", "/healthz", dict[str, object]))
        except DaemonUnavailable:
            return False
        return True

    await eventually(ready, timeout_s=30)


def children_of_state(state: Path) -> list[int]:
    """Processes (zygotes, run processes) whose command line or cwd refers to this state dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.split(") ", 1)[1].startswith("Z"):
            continue
        if str(state) in cmdline or cwd.startswith(str(state)):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_kill_9_with_500_runs_in_flight_loses_none(daemon_process: DaemonProcess) -> None:
    daemon_process.start()
    client = Client(ClientSettings(socket_path=daemon_process.socket))
    await wait_ready(client)
    archive = make_archive(TASKS)
    version = await client.request(
        Call("POST", "/api/v1/versions", VersionInfo, body=archive, timeout_s=120)
    )
    assert version.status == "READY", version.error

    accepted: list[tuple[str, int]] = []
    tasks = Tasks(client)

    async def trigger(i: int) -> None:
        try:
            handle = await tasks.trigger("work", {"i": i})
        except EmberError:
            return  # refused or cut off by the kill: not accepted, so not owed
        accepted.append((handle.id, i))

    async def trigger_all() -> None:
        for start in range(0, 500, 25):
            await asyncio.gather(*(trigger(i) for i in range(start, start + 25)))

    triggering = asyncio.create_task(trigger_all())
    runs = Runs(client)

    async def midway() -> bool:
        # Some runs executing (on a loaded machine the first may start after the 300th is
        # accepted), so the kill catches them mid-attempt.
        executing = await runs.list(status=RunStatus.EXECUTING, limit=1)
        return len(accepted) >= 300 and bool(executing.data)

    await eventually(midway, timeout_s=60)
    daemon_process.kill9()
    await triggering
    await client.aclose()
    # Run processes and zygotes notice the daemon is gone and exit on their own.
    await eventually(lambda: not children_of_state(daemon_process.state), timeout_s=15)

    daemon_process.start()
    client = Client(ClientSettings(socket_path=daemon_process.socket))
    await wait_ready(client)
    runs = Runs(client)
    results = await asyncio.gather(*(runs.poll(run_id, timeout_s=120) for run_id, _ in accepted))
    assert len(accepted) >= 300
    assert [r.status for r in results] == [RunStatus.COMPLETED] * len(accepted)
    assert [r.output_as(int) for r in results] == [i * 2 for _, i in accepted]
    interrupted = [r for r in results if any(a.status == "INTERRUPTED" for a in r.attempts)]
    assert interrupted, "runs were executing at the kill: their attempts must show it"
    assert all(r.attempts[-1].status == "COMPLETED" for r in interrupted)
    await client.aclose()
