"""SIGTERM drains: runs finish within the grace, or are held for the restart; none is lost.

Real ``ember daemon`` processes, real run processes, the real SQLite file read between the
two lives. Each run writes what it does into a ledger file, so "no step done twice" is read
from what happened, not from what the daemon says.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import eventually
from daemon_proc import DaemonProc, first_life, wait_answering

from ember import Client, ClientSettings, Run, Runs, RunStatus, Tasks, Wait

TASKS = {
    "tasks/__init__.py": "",
    "tasks/work.py": """
        import asyncio
        import json
        import os
        import pathlib
        import random
        from ember import Context, Retry, task, wait

        def note(payload: dict, ctx: Context, event: str, **extra) -> None:
            line = json.dumps({"run": ctx.run_id, "attempt": ctx.attempt, "event": event, **extra})
            fd = os.open(payload["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\\n").encode())
            finally:
                os.close(fd)

        async def until(gate: str) -> None:
            while not pathlib.Path(gate).exists():
                await asyncio.sleep(0.05)

        @task(id="child", retry=Retry(max_attempts=1))
        async def child(payload: dict, ctx: Context) -> int:
            note(payload, ctx, "child")
            return payload["i"]

        # max_attempts=1: if an interruption used up a retry, the run would fail.
        @task(id="steps", retry=Retry(max_attempts=1))
        async def steps(payload: dict, ctx: Context) -> int:
            note(payload, ctx, "start")
            got = (await child.trigger_and_wait(payload)).unwrap()
            note(payload, ctx, "after-child")
            await until(payload["gate"])
            note(payload, ctx, "end")
            return got * 10

        @task(id="memory", retry=Retry(max_attempts=1))
        async def memory(payload: dict, ctx: Context) -> dict:
            # Only the process's memory holds this: a re-execution would draw another.
            secret = random.getrandbits(64)
            note(payload, ctx, "start", secret=secret)
            ticks = 0
            while not pathlib.Path(payload["gate"]).exists():
                await asyncio.sleep(0.05)
                ticks += 1
            note(payload, ctx, "end", secret=secret)
            return {"secret": secret, "ticks": ticks}

        @task(id="napper", retry=Retry(max_attempts=1))
        async def napper(payload: dict, ctx: Context) -> str:
            note(payload, ctx, "start")
            await wait.for_(seconds=3)  # short: the run keeps its process and its slot
            note(payload, ctx, "end")
            return "rested"

        @task(id="gate")
        async def gate(payload: dict) -> str:
            token = await wait.create_token(timeout="1h", idempotency_key=payload["key"])
            await wait.for_token(token)
            return "opened"
    """,
}


def ledger(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_rows(state: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Read the state's SQLite file directly (the daemon is down)."""
    conn = sqlite3.connect(f"file:{state / 'ember.db'}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def executing_in_table(state: Path) -> list[str]:
    """Runs the table calls EXECUTING (or DEQUEUED): with the daemon gone, none may be."""
    sql = "SELECT id, status FROM runs WHERE status IN ('EXECUTING', 'DEQUEUED')"
    rows = table_rows(state, sql)
    return [f"{r[0]} {r[1]}" for r in rows]


async def after_restart(state: Path, flags: tuple[str, ...], run_id: str, gate: Path) -> Run:
    """Start the daemon again, open the gate, and return the run once it is final."""
    second = DaemonProc(state, *flags)
    second.start()
    client = Client(ClientSettings(socket_path=second.socket))
    try:
        await wait_answering(client)
        await asyncio.to_thread(gate.touch)
        return await Runs(client).poll(run_id, timeout_s=120)
    finally:
        await client.aclose()
        second.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["park", "replay"])
async def test_sigterm_finishes_or_requeues_every_run_and_redoes_no_step(
    tmp_path: Path, strategy: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    book = tmp_path / "ledger"
    fast_gate, slow_gate = tmp_path / "fast-gate", tmp_path / "slow-gate"
    flags = ("--checkpoint", strategy, "--shutdown-grace-s", "3")
    first, client = await first_life(state, flags, TASKS)
    tasks, runs = Tasks(client), Runs(client)
    base = {"ledger": str(book)}
    fast = [
        (await tasks.trigger("steps", {**base, "i": i, "gate": str(fast_gate)})).id
        for i in range(2)
    ]
    slow = [
        (await tasks.trigger("steps", {**base, "i": i, "gate": str(slow_gate)})).id
        for i in range(2, 4)
    ]
    waiting = (await tasks.trigger("gate", {"key": "drain-gate"})).id

    def past_child() -> bool:
        done = {e["run"] for e in ledger(book) if e["event"] == "after-child"}
        return set(fast + slow) <= done

    await eventually(past_child, timeout_s=90)

    async def is_waiting() -> bool:
        return (await runs.retrieve(waiting)).status is RunStatus.WAITING

    await eventually(is_waiting, timeout_s=60)

    sent = time.monotonic()
    first.signal(signal.SIGTERM)
    # The API keeps answering during the drain: a run triggered now is committed, not started.
    late = (await tasks.trigger("steps", {**base, "i": 9, "gate": str(fast_gate)})).id
    fast_gate.touch()  # the fast runs finish within the grace; the slow ones cannot
    assert first.wait_exit() == 0
    exit_s = time.monotonic() - sent
    await client.aclose()
    assert executing_in_table(state) == []
    assert exit_s >= 3, "the slow runs had the whole grace"
    assert not [e for e in ledger(book) if e["run"] == late], "nothing starts during a drain"

    second = DaemonProc(state, *flags)
    second.start()
    client = Client(ClientSettings(socket_path=second.socket))
    try:
        await wait_answering(client)
        runs = Runs(client)
        slow_gate.touch()
        page = await Wait(client).list_tokens(status="WAITING")
        token = page.data[0]
        await Wait(client).complete_token(token.id, {"ok": True})
        results = {rid: await runs.poll(rid, timeout_s=120) for rid in [*fast, *slow, late]}
        assert {r.status for r in results.values()} == {RunStatus.COMPLETED}, results
        assert (await runs.poll(waiting, timeout_s=60)).status is RunStatus.COMPLETED
    finally:
        await client.aclose()
        second.stop()
    events = ledger(book)
    for rid in fast:
        # Finished within the grace: one attempt, started once.
        assert [a.status for a in results[rid].attempts] == ["COMPLETED"]
        assert [e["event"] for e in events if e["run"] == rid] == ["start", "after-child", "end"]
    for rid in slow:
        assert [a.status for a in results[rid].attempts] == ["INTERRUPTED", "COMPLETED"]
        body = [e["event"] for e in events if e["run"] == rid]
        # Re-executed from the top, but its child came back from the journal.
        assert body == ["start", "after-child", "start", "after-child", "end"], body
    children = [e for e in events if e["event"] == "child"]
    assert len(children) == len({e["run"] for e in children}) == 5  # 4 parents + late: once each
    assert results[late].output_as(int) == 90


async def test_second_sigterm_stops_at_once_and_leaves_nothing_executing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    book = tmp_path / "ledger"
    first, client = await first_life(
        state,
        (
            "--shutdown-grace-s",
            "600",
        ),
        TASKS,
    )
    gate = tmp_path / "gate"
    run_id = (
        await Tasks(client).trigger("steps", {"ledger": str(book), "i": 1, "gate": str(gate)})
    ).id
    await eventually(lambda: any(e["event"] == "after-child" for e in ledger(book)), timeout_s=90)
    await client.aclose()
    first.signal(signal.SIGTERM)
    await eventually(lambda: "get 600s to finish" in first.output(), timeout_s=30)
    first.signal(signal.SIGTERM)
    assert first.wait_exit(timeout_s=30) == 0
    assert executing_in_table(state) == []
    assert "1 interrupted" in first.output()

    run = await after_restart(state, (), run_id, gate)
    assert run.status is RunStatus.COMPLETED
    assert [a.status for a in run.attempts] == ["INTERRUPTED", "COMPLETED"]


SLOW_IMPORT = {
    "tasks/__init__.py": "",
    "tasks/slow.py": """
        import asyncio
        import pathlib
        import time
        from ember import task

        time.sleep(2)  # a heavy import: a new zygote takes a while to be ready

        @task(id="gated")
        async def gated(payload: dict) -> str:
            pathlib.Path(payload["started"]).touch()
            while not pathlib.Path(payload["gate"]).exists():
                await asyncio.sleep(0.05)
            return "done"
    """,
}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_stop_while_runs_wait_for_a_new_process_fails_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    started, gate = tmp_path / "started", tmp_path / "gate"
    flags = ("--shutdown-grace-s", "0")
    first, client = await first_life(state, flags, SLOW_IMPORT)
    payload = {"started": str(started), "gate": str(gate)}
    run_id = (await Tasks(client).trigger("gated", payload)).id
    await eventually(started.exists, timeout_s=60)
    await client.aclose()
    first.stop()
    assert table_rows(state, "SELECT status FROM runs WHERE id = ?", run_id) == [("QUEUED",)]
    # The next daemon dequeues the run at once, then waits seconds for its zygote: a stop
    # now must leave the run queued, not fail it because the zygote was stopped.
    second = DaemonProc(state, *flags)
    second.start()
    client = Client(ClientSettings(socket_path=second.socket))
    await wait_answering(client)
    await client.aclose()
    second.stop()
    assert "0 finished, 0 checkpointed, 0 interrupted" in second.output()
    assert table_rows(state, "SELECT status FROM runs WHERE id = ?", run_id) == [("QUEUED",)]
    run = await after_restart(state, flags, run_id, gate)
    assert run.status is RunStatus.COMPLETED, run.error
