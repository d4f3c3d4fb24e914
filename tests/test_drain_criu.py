"""SIGTERM with CRIU: a run still computing after the grace is checkpointed where it stands and
carries on after the restart, with its memory; its body does not start again.

Skipped, with the reason, wherever `ember doctor` would say checkpoints do not work
(test_checkpoint's detection, made once).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from conftest import eventually
from daemon_proc import first_life
from test_checkpoint import SUPPORT
from test_drain import TASKS, after_restart, executing_in_table, ledger, table_rows

from ember import RunStatus, Tasks

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_run_mid_computation_resumes_with_its_memory_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    book, gate = tmp_path / "ledger", tmp_path / "gate"
    flags = ("--checkpoint", "criu", "--shutdown-grace-s", "1")
    first, client = await first_life(state, flags, TASKS)
    run_id = (await Tasks(client).trigger("memory", {"ledger": str(book), "gate": str(gate)})).id
    await eventually(lambda: any(e["run"] == run_id for e in ledger(book)), timeout_s=90)
    await client.aclose()
    sent = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    exit_s = time.monotonic() - sent
    assert "1 checkpointed" in first.output(), first.output()
    assert executing_in_table(state) == []
    rows = table_rows(state, "SELECT status, hold FROM runs WHERE id = ?", run_id)
    assert rows == [("QUEUED", "checkpoint")]
    run = await after_restart(state, flags, run_id, gate)
    assert run.status is RunStatus.COMPLETED, run.error
    events = [e for e in ledger(book) if e["run"] == run_id]
    # One start: the body carried on from where it stood, with the secret it drew then.
    assert [e["event"] for e in events] == ["start", "end"], events
    output = run.output_as(dict)
    assert output["secret"] == events[0]["secret"]
    assert output["ticks"] > 0
    assert [a.status for a in run.attempts] == ["COMPLETED"]
    print(f"SIGTERM to exit with one run checkpointed: {exit_s:.2f}s")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_run_in_a_short_wait_is_interrupted_not_dumped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    book = tmp_path / "ledger"
    flags = ("--checkpoint", "criu", "--shutdown-grace-s", "0")
    first, client = await first_life(state, flags, TASKS)
    run_id = (await Tasks(client).trigger("napper", {"ledger": str(book)})).id
    await eventually(lambda: any(e["run"] == run_id for e in ledger(book)), timeout_s=90)
    await asyncio.sleep(0.5)  # (its wait is registered)
    await client.aclose()
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    assert "0 checkpointed, 1 interrupted" in first.output(), first.output()
    run = await after_restart(state, flags, run_id, tmp_path / "unused-gate")
    assert run.status is RunStatus.COMPLETED, run.error
    assert [a.status for a in run.attempts] == ["INTERRUPTED", "COMPLETED"]
