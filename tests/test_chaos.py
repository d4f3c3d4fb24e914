"""Chaos: runs with retries, children, waits and a queue limited to 3, through kill -9s.

The daemon and run processes are killed at random while the runs go on; then the invariants
are checked from an append-only ledger the tasks write (one ``O_APPEND`` line per event,
atomic below ``PIPE_BUF``) and from the state database: no run lost, none completed twice, no
two executions of one run at the same time, the queue's limit never exceeded, no process
left behind, and SQLite's integrity check passes. ``bench/`` has no longer version: the
``long`` parameter is it, a soak test outside the default run (``scripts/test -m soak``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, make_archive
from test_durability import DaemonProcess, children_of_state, wait_ready

from ember import Call, Client, ClientSettings, Runs, RunStatus, Tasks
from ember._types import VersionInfo
from ember.daemon.engine.core import MAX_INTERRUPTIONS

LIMIT = 3

TASKS = {
    "tasks/__init__.py": "",
    "tasks/chaos.py": f"""
        import asyncio
        import json
        import os
        import time
        from ember import Context, Queue, Retry, task, wait

        limited = Queue(name="limited", concurrency_limit={LIMIT})
        retry = Retry(max_attempts=20, min_timeout_s=0.1, max_timeout_s=0.5)

        def host_pid() -> int:
            # With CRIU each run process is PID 1 of its own namespace: the host's PID is the
            # first of NSpid's, and the one the test can kill.
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        return int(line.split()[1])
            return os.getpid()

        def note(payload: dict, ctx: Context, event: str) -> None:
            line = json.dumps({{"run": ctx.run_id, "attempt": ctx.attempt, "task": ctx.task_id,
                               "event": event, "t": time.time(), "pid": host_pid()}})
            fd = os.open(payload["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\\n").encode())
            finally:
                os.close(fd)

        @task(id="leaf", queue=limited, retry=retry)
        async def leaf(payload: dict, ctx: Context) -> int:
            note(payload, ctx, "start")
            for _ in range(payload["ticks"]):
                await asyncio.sleep(0.05)
                note(payload, ctx, "tick")
            if payload.get("fail") and ctx.attempt == 1:
                note(payload, ctx, "fail")
                raise RuntimeError("the first attempt fails")
            note(payload, ctx, "end")
            return payload["i"]

        @task(id="leaf-sync", queue=limited, retry=retry)
        def leaf_sync(payload: dict, ctx: Context) -> int:
            note(payload, ctx, "start")
            for _ in range(payload["ticks"]):
                time.sleep(0.05)
                note(payload, ctx, "tick")
            note(payload, ctx, "end")
            return payload["i"]

        @task(id="parent", retry=retry)
        async def parent(payload: dict, ctx: Context) -> int:
            note(payload, ctx, "start")
            child = dict(payload, ticks=4, fail=False)
            results = await leaf.batch_trigger_and_wait([dict(child, i=1), dict(child, i=2)])
            note(payload, ctx, "tick")
            await wait.for_(seconds=0.3)
            note(payload, ctx, "tick")
            single = await leaf_sync.trigger_and_wait(dict(child, i=3))
            note(payload, ctx, "end")
            return sum(r.unwrap() for r in results) + single.unwrap()
    """,
}


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def executions(ledger: list[dict[str, Any]]) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(run, attempt, pid) -> the first and last time that execution wrote a line."""
    spans: dict[tuple[str, int, int], tuple[float, float]] = {}
    for e in ledger:
        key = (e["run"], e["attempt"], e["pid"])
        first, last = spans.get(key, (e["t"], e["t"]))
        spans[key] = (min(first, e["t"]), max(last, e["t"]))
    return spans


def overlapping(spans: dict[tuple[str, int, int], tuple[float, float]]) -> list[str]:
    by_run: dict[str, list[tuple[float, float, int, int]]] = defaultdict(list)
    for (run, attempt, pid), (first, last) in spans.items():
        by_run[run].append((first, last, attempt, pid))
    found = []
    for run, runs in by_run.items():
        runs.sort()
        # Each execution against the latest end seen before it: any earlier one still going.
        end, a, p = runs[0][1], runs[0][2], runs[0][3]
        for start, last, b, q in runs[1:]:
            if start < end:
                found.append(
                    f"{run}: attempt {a} (pid {p}) ran until {end:.3f}, "
                    f"attempt {b} (pid {q}) started at {start:.3f}"
                )
            if last > end:
                end, a, p = last, b, q
    return found


def most_at_once(spans: dict[tuple[str, int, int], tuple[float, float]], runs: set[str]) -> int:
    edges = sorted(
        edge
        for (run, _, _), (first, last) in spans.items()
        if run in runs
        for edge in ((first, 1), (last, -1))
    )
    current = highest = 0
    for _, step in edges:
        current += step
        highest = max(highest, current)
    return highest


async def final(runs: Runs, run_id: str, deadline: float) -> Any:
    """The run once final, or as it stands at ``deadline`` (a loop time shared by all runs).

    A long poll answers at its own cap, so poll until then.
    """
    loop = asyncio.get_running_loop()
    while True:
        run = await runs.poll(run_id, timeout_s=max(0.1, min(30.0, deadline - loop.time())))
        if run.is_final or loop.time() >= deadline:
            return run


def diagnose(state: Path, stuck: list[str]) -> str:
    """What the store and the daemon's output say of runs that did not finish."""
    lines = []
    with sqlite3.connect(state / "ember.db") as conn:
        now = time.time()
        last_start, executing = conn.execute(
            "SELECT max(started_at), (SELECT count(*) FROM runs WHERE status = 'EXECUTING')"
            " FROM attempts"
        ).fetchone()
        lines.append(
            f"{len(stuck)} not completed; last attempt started {now - last_start:.1f}s ago;"
            f" {executing} EXECUTING"
        )
        for status, ready_in, n in conn.execute(
            "SELECT status, min(coalesce(ready_at, delay_until, 0)) - ?, count(*) FROM runs"
            " WHERE status != 'COMPLETED' GROUP BY status",
            (now,),
        ):
            lines.append(f"  {n} {status}, earliest ready in {ready_in:.1f}s")
        for run_id in stuck[:5]:
            row = conn.execute(
                "SELECT status, task_id, queue FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            attempts = conn.execute(
                "SELECT number, status FROM attempts WHERE run_id = ? ORDER BY number", (run_id,)
            ).fetchall()
            lines.append(f"{run_id}: {row} attempts {attempts}")
    out = (state / "daemon.out").read_text(errors="replace").splitlines()
    return "\n".join([*lines, "daemon output (last 40 lines):", *out[-40:]])


def crash_looped(run: Any) -> bool:
    """Failed by the crash-loop guard: SYSTEM_FAILURE after more than MAX_INTERRUPTIONS."""
    interrupted = sum(a.status == "INTERRUPTED" for a in run.attempts)
    return run.status == RunStatus.SYSTEM_FAILURE and interrupted > MAX_INTERRUPTIONS


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.split(") ", 1)[1].startswith("Z")


@pytest.mark.parametrize(
    ("chaos_s", "leaves", "parents"),
    [
        pytest.param(20.0, 45, 8, id="short", marks=pytest.mark.timeout(400)),
        pytest.param(
            180.0,
            300,
            40,
            id="long",
            marks=[pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(900)],
        ),
    ],
)
async def test_chaos(tmp_path: Path, chaos_s: float, leaves: int, parents: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = tmp_path / "ledger.jsonl"
    daemon = DaemonProcess(state)
    daemon.start()
    client = Client(ClientSettings(socket_path=daemon.socket))
    rng = random.Random(os.environ.get("EMBER_CHAOS_SEED", "10"))
    kills = {"daemon": 0, "run process": 0}
    try:
        await wait_ready(client)
        version = await client.request(
            Call("POST", "/api/v1/versions", VersionInfo, body=make_archive(TASKS), timeout_s=120)
        )
        assert version.status == "READY", version.error
        tasks = Tasks(client)
        accepted: list[tuple[str, int]] = []
        for i in range(leaves):
            task_id = "leaf-sync" if i % 3 == 0 else "leaf"
            payload = {
                "ledger": str(ledger),
                "ticks": rng.randint(2, 12),
                "i": i,
                "fail": i % 4 == 1,
            }
            accepted.append(((await tasks.trigger(task_id, payload)).id, i))
        for _ in range(parents):
            accepted.append(((await tasks.trigger("parent", {"ledger": str(ledger)})).id, 6))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + chaos_s
        while loop.time() < deadline:
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            if rng.random() < 0.25:
                daemon.kill9()
                kills["daemon"] += 1
                await client.aclose()
                daemon.start()
                await wait_ready(client)
                continue
            spans = executions(read_ledger(ledger))
            ended = {
                (e["run"], e["attempt"], e["pid"])
                for e in read_ledger(ledger)
                if e["event"] in ("end", "fail")
            }
            busy = [pid for key in spans if key not in ended and alive(pid := key[2])]
            if busy:
                os.kill(rng.choice(busy), signal.SIGKILL)
                kills["run process"] += 1

        runs = Runs(client)
        # One deadline for all: the runs finish in parallel, so it is the whole drain's bound.
        settle = loop.time() + 240.0
        results = [await final(runs, run_id, settle) for run_id, _ in accepted]
        # A run executing through more than MAX_INTERRUPTIONS daemon crashes is failed by the
        # crash-loop guard (it may be what kills the daemon): a final state, on purpose. Kills
        # every few seconds for minutes (the soak) reach it; every other run completes.
        guarded = {r.id for r in results if crash_looped(r)}
        stuck = [r.id for r in results if r.status != RunStatus.COMPLETED and r.id not in guarded]
        assert stuck == [], f"runs were lost or failed:\n{diagnose(state, stuck)}"
        assert [r.output_as(int) for r in results if r.id not in guarded] == [
            i for run_id, i in accepted if run_id not in guarded
        ]
    finally:
        await client.aclose()
        daemon.stop()
    # No process outlives the daemon that owned it.
    await eventually(lambda: not children_of_state(state), timeout_s=30)

    with sqlite3.connect(state / "ember.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        twice = conn.execute(
            "SELECT run_id FROM attempts WHERE status = 'COMPLETED'"
            " GROUP BY run_id HAVING count(*) > 1"
        ).fetchall()
        children = conn.execute(
            "SELECT parent_run_id, count(*) FROM runs WHERE parent_run_id IS NOT NULL"
            " GROUP BY parent_run_id"
        ).fetchall()
        limited = {r for (r,) in conn.execute("SELECT id FROM runs WHERE queue = 'limited'")}
    assert twice == [], "runs completed twice"
    completed_parents = len([1 for run_id, _ in accepted[leaves:] if run_id not in guarded])
    whole = [n for parent, n in children if parent not in guarded]
    assert sorted(whole) == [3] * completed_parents, "a child was triggered twice"
    assert all(n <= 3 for _, n in children), "a child was triggered twice"
    spans = executions(read_ledger(ledger))
    print(
        f"chaos: {len(accepted)} runs, {len(spans)} executions, kills {kills},"
        f" {len(guarded)} failed by the crash-loop guard"
    )
    assert kills["daemon"] and kills["run process"]
    assert overlapping(spans) == [], "two executions of one run overlapped"
    assert most_at_once(spans, limited) <= LIMIT, "the queue's concurrency limit was exceeded"
