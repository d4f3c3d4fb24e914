"""The run-process lifecycle: one attempt of a run executes at a time, and nothing outlives it.

Tasks write an append-only ledger (host PIDs: /proc is the host's, also inside a PID
namespace), so the invariants are checked from what really happened, not from what the
daemon recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from conftest import Harness, eventually, make_archive, running_daemon
from test_durability import DaemonProcess, children_of_state, wait_ready

from ember import Call, Client, ClientSettings, Runs, RunStatus, Tasks
from ember._types import VersionInfo
from ember.daemon.child.lifeline import ProcessIdentity
from ember.daemon.procs.protocol import MAX_LOG_LINE_BYTES
from ember.daemon.procs.supervisor.exits import _descendants

TASKS = {
    "tasks/__init__.py": "",
    "tasks/life.py": """
        import asyncio, os, subprocess, time
        from ember import Context, Retry, logger, task, wait

        def host_pid() -> int:
            return int(os.readlink("/proc/self"))

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().rsplit(") ", 1)[1][0] != "Z"
            except OSError:
                return False

        def record(ledger: str, line: str) -> None:
            with open(ledger, "a") as out:
                out.write(line + "\\n")

        @task(id="effect", retry=Retry(max_attempts=3, min_timeout_s=0.1, randomize=False))
        def effect(payload: dict, ctx: Context) -> list[int]:
            # Earlier attempts whose process is still alive as this one starts: must be none.
            with open(payload["ledger"], "a+") as ledger:
                ledger.seek(0)
                starts = [line.split() for line in ledger if line.startswith("start")]
            overlapping = [int(pid) for _, _, pid in starts if alive(int(pid))]
            record(payload["ledger"], f"start {ctx.attempt} {host_pid()}")
            time.sleep(8 if ctx.attempt == 1 else 0.1)
            record(payload["ledger"], f"effect {ctx.attempt} {host_pid()}")
            return overlapping

        def spawn(count: int) -> list[int]:
            # Start count sleeping processes; return their host PIDs.
            for i in range(count):
                # A third start their own session, a third double-fork (their parent exits):
                # neither a process group nor the parent link holds those.
                if i % 3 == 0:
                    subprocess.Popen(["sleep", "300"], start_new_session=True)
                elif i % 3 == 1:
                    subprocess.run(["sh", "-c", "sleep 300 >/dev/null &"], check=True)
                else:
                    subprocess.Popen(["sleep", "300"])
            # This process's children as the host names them (the orphans came here too).
            pids = []
            for thread in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{thread}/children") as children:
                    pids.extend(int(pid) for pid in children.read().split())
            return pids

        @task(id="forker")
        def forker(payload: dict) -> list[int]:
            return spawn(payload["count"])

        @task(id="parked_forker")
        async def parked_forker(payload: dict) -> None:
            pids = spawn(payload["count"])
            record(payload["ledger"], " ".join(map(str, pids)))
            await wait.for_(seconds=120)

        @task(id="stuck_forker")
        def stuck_forker(payload: dict) -> None:
            record(payload["ledger"], " ".join(map(str, spawn(payload["count"]))))
            time.sleep(300)  # until the daemon kills it: past its max_duration_s

        @task(id="chatty")
        def chatty(payload: dict) -> int:
            for i in range(payload["lines"]):
                if i % 2:
                    print(f"line {i}")
                else:
                    logger.info(f"line {i}", i=i)
            return payload["lines"]

        @task(id="huge_line")
        def huge_line(payload: dict) -> int:
            logger.info("x" * payload["bytes"])
            print("y" * payload["printed"])  # (also written to the zygote's log file)
            return 1
    """,
}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ledger_lines(ledger: Path) -> list[list[str]]:
    return [line.split() for line in ledger.read_text().splitlines()] if ledger.exists() else []


def started(ledger: Path, attempt: int) -> int | None:
    """The host PID of the attempt's process, once it has started."""
    for line in ledger_lines(ledger):
        if line[:2] == ["start", str(attempt)]:
            return int(line[2])
    return None


@pytest.fixture(params=["plain", "pidns"])
async def life(request: pytest.FixtureRequest, state_dir: Path) -> AsyncIterator[Harness]:
    """A daemon whose run processes are the zygote's children, or PID 1 of a namespace each.

    The namespace is what checkpoints use; it needs only root, not CRIU.
    """
    if request.param == "pidns" and os.geteuid() != 0:
        pytest.skip("a PID namespace per run process needs root")
    async with running_daemon(state_dir, cancel_grace_s=1.0) as h:
        h.daemon.supervisor.pidns = request.param == "pidns"
        info = await h.register(TASKS)
        assert info.status == "READY", info.error
        yield h


@pytest.mark.timeout(60)
async def test_killing_the_run_process_parent_ends_its_attempt(
    life: Harness, tmp_path: Path
) -> None:
    # The parent is the namespace's parent with a PID namespace, else the zygote itself.
    ledger = tmp_path / "ledger"
    handle = await Tasks(life.client).trigger("effect", {"ledger": str(ledger)})
    await eventually(lambda: started(ledger, 1) is not None)
    first = started(ledger, 1)
    assert first is not None
    os.kill(psutil.Process(first).ppid(), signal.SIGKILL)
    run = await life.wait(handle.id, timeout_s=30)
    assert run.status is RunStatus.COMPLETED
    assert run.output_as(list[int]) == [], "attempt 2 started while attempt 1 still ran"
    assert [a.status for a in run.attempts] == ["CRASHED", "COMPLETED"]
    assert not alive(first)
    effects = [line for line in ledger_lines(ledger) if line[0] == "effect"]
    assert effects == [["effect", "2", str(started(ledger, 2))]]


async def register_over_api(client: Client) -> None:
    version = await client.request(
        Call("POST", "/api/v1/versions", VersionInfo, body=make_archive(TASKS), timeout_s=120)
    )
    assert version.status == "READY", version.error


@pytest.mark.timeout(90)
async def test_a_daemon_killed_mid_run_leaves_no_attempt_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    daemon = DaemonProcess(state)
    daemon.start()
    client = Client(ClientSettings(socket_path=daemon.socket))
    try:
        await wait_ready(client)
        await register_over_api(client)
        ledger = tmp_path / "ledger"
        handle = await Tasks(client).trigger("effect", {"ledger": str(ledger)})
        await eventually(lambda: started(ledger, 1) is not None)
        first = started(ledger, 1)
        assert first is not None
        daemon.kill9()
        await client.aclose()
        # The `def` task sleeps on in its thread: the process's watchdog ends it anyway.
        await eventually(lambda: not alive(first), timeout_s=10)
        daemon.start()
        await wait_ready(client)
        run = await Runs(client).poll(handle.id, timeout_s=30)
        assert run.status is RunStatus.COMPLETED
        assert run.output_as(list[int]) == []
        effects = [line for line in ledger_lines(ledger) if line[0] == "effect"]
        assert effects == [["effect", "2", str(started(ledger, 2))]]
    finally:
        await client.aclose()
        daemon.stop()


@pytest.mark.timeout(60)
async def test_what_a_task_forks_is_gone_when_its_attempt_ends(life: Harness) -> None:
    run = await life.run("forker", {"count": 200}, timeout_s=45)
    assert run.status is RunStatus.COMPLETED, run.error
    pids = run.output_as(list[int])
    assert len(pids) == 200
    # Killed and reaped before the attempt reported its end: no waiting needed.
    assert [pid for pid in pids if alive(pid)] == []


def test_a_process_tree_is_found_below_its_root() -> None:
    # What the daemon kills with a run process: its tree, read from each thread's children
    # list (two levels here, one process in a session of its own), as psutil walks it.
    root = subprocess.Popen(
        ["sh", "-c", 'sh -c "sleep 30 & setsid sleep 30 & wait" & sleep 30 & wait'],
        start_new_session=True,
    )
    try:

        def tree() -> set[int]:
            return {p.pid for p in psutil.Process(root.pid).children(recursive=True)}

        deadline = time.monotonic() + 10
        while len(tree()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree()) == 4
        assert sorted(_descendants(root.pid)) == sorted(tree())
        assert _descendants(2**22 + 1) == []  # (no such process)
    finally:
        below = _descendants(root.pid)  # (before the kill: orphans leave the tree)
        os.killpg(root.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        root.wait()


@pytest.mark.timeout(60)
async def test_what_a_process_the_daemon_kills_had_forked_dies_with_it(
    life: Harness, tmp_path: Path
) -> None:
    # The daemon kills the run process over its max_duration_s, from outside: everything the
    # task started goes with it (own sessions and double forks included), found by the tree.
    ledger = tmp_path / "ledger"
    handle = await Tasks(life.client).trigger(
        "stuck_forker",
        {"ledger": str(ledger), "count": 30},
        max_duration_s=2.0,
        max_attempts=1,
    )
    # (The file exists from the task's open, before its line is written.)
    await eventually(lambda: ledger.exists() and ledger.read_text().endswith("\n"), timeout_s=20)
    pids = [int(pid) for pid in ledger.read_text().split()]
    assert len(pids) == 30 and all(alive(pid) for pid in pids)
    run = await life.wait(handle.id)
    assert run.status is RunStatus.TIMED_OUT, run.error
    await eventually(lambda: not any(alive(pid) for pid in pids), timeout_s=10)


@pytest.mark.timeout(90)
async def test_what_a_parked_run_forked_dies_with_its_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    daemon = DaemonProcess(state)
    daemon.start()
    client = Client(ClientSettings(socket_path=daemon.socket))
    try:
        await wait_ready(client)
        await register_over_api(client)
        ledger = tmp_path / "ledger"
        handle = await Tasks(client).trigger("parked_forker", {"ledger": str(ledger), "count": 30})
        runs = Runs(client)

        async def waiting() -> bool:
            return (await runs.retrieve(handle.id)).status is RunStatus.WAITING

        await eventually(waiting)
        pids = [int(pid) for pid in ledger.read_text().split()]
        assert len(pids) == 30 and all(alive(pid) for pid in pids)
        daemon.kill9()
        await eventually(lambda: not any(alive(pid) for pid in pids), timeout_s=10)
        await eventually(lambda: not children_of_state(state), timeout_s=10)
    finally:
        await client.aclose()
        daemon.stop()


@pytest.mark.timeout(90)
async def test_def_tasks_logging_10000_lines_all_complete(harness: Harness) -> None:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    runs = await asyncio.gather(
        *(harness.run("chatty", {"lines": 10_000}, timeout_s=80) for _ in range(4))
    )
    assert [r.status for r in runs] == [RunStatus.COMPLETED] * 4, [r.error for r in runs]
    for run in runs:
        lines = (await Runs(harness.client).logs(run.id)).data
        assert [line.message for line in lines] == [f"line {i}" for i in range(10_000)]


@pytest.mark.timeout(90)
async def test_an_oversized_log_line_is_cut_not_fatal(harness: Harness) -> None:
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    size, printed = 100 * 1024 * 1024, 5 * 1024 * 1024
    run = await harness.run("huge_line", {"bytes": size, "printed": printed}, timeout_s=80)
    assert run.status is RunStatus.COMPLETED, run.error
    lines = (await Runs(harness.client).logs(run.id)).data
    assert len(lines) == 2
    for line, char, original in zip(lines, "xy", (size, printed), strict=True):
        head, marker = line.message.split("…")
        assert set(head) == {char} and len(line.message.encode()) <= MAX_LOG_LINE_BYTES
        assert marker == f" [truncated {original - len(head)} bytes]"


# A run process parked for a checkpoint, reduced to its wait: the real function, in a real
# process, with a real process standing in for its daemon.
_WAITER = textwrap.dedent(
    """
    import asyncio, signal, sys
    from ember.daemon.child.lifeline import ProcessIdentity
    from ember.daemon.child.host import await_wake

    async def main() -> int:
        loop = asyncio.get_running_loop()
        woke = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, lambda: woke.done() or woke.set_result(None))
        daemon = ProcessIdentity.decode(sys.argv[1])
        print("waiting", flush=True)
        ok = await await_wake(woke, daemon, timeout_s=float(sys.argv[2]), check_s=0.1)
        return 0 if ok else 3

    sys.exit(asyncio.run(main()))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event", ["daemon killed", "woken", "too late"])
def test_a_parked_process_waits_for_its_wake_up_only_so_long(event: str) -> None:
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = ProcessIdentity.of(stand_in.pid)
        assert identity is not None
        timeout_s = "1" if event == "too late" else "600"
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER, identity.encode(), timeout_s],
            stdout=subprocess.PIPE,
        )
        assert waiter.stdout is not None
        with waiter.stdout:
            assert waiter.stdout.readline() == b"waiting\n"
        if event == "daemon killed":
            stand_in.kill()
            stand_in.wait()
        elif event == "woken":
            waiter.send_signal(signal.SIGUSR1)
        # Exits by itself: 0 when woken, 3 when it gave up.
        assert waiter.wait(timeout=20) == (0 if event == "woken" else 3)
    finally:
        stand_in.kill()
        stand_in.wait()
