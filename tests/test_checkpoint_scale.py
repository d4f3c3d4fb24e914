"""CRIU at scale: restored processes do not linger, failed dumps are retried, plans hold.

Skipped, with the reason, wherever `ember doctor` would say checkpoints do not work.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Harness, eventually, running_daemon
from test_checkpoint import SUPPORT, TASKS
from test_state_modes import doctor

from ember import Call, Runs, Tasks
from ember._types import Health
from ember.daemon.procs.checkpoint.plan import (
    CALIBRATED_AFTER,
    RESTORE_MARGIN_S,
    SAFETY,
    RestorePlan,
    Timings,
    parallelism,
)
from ember.daemon.procs.checkpoint.restores import _namespace_children

criu_only = pytest.mark.skipif(not SUPPORT.ok, reason=f"no working CRIU: {SUPPORT.reason}")


def test_restores_ahead_start_early_enough_for_the_whole_queue() -> None:
    timings, dumps = Timings(0.1), Timings(0.3)
    plan = RestorePlan(parallel=2, timings=timings, before=dumps)
    for i in range(1000):
        plan.push(100.0, f"run{i}")
    # Nothing restored yet: a restore is planned to take what a dump takes (0.3 s).
    assert plan.each_s() == pytest.approx(0.3 * SAFETY)
    for _ in range(CALIBRATED_AFTER):
        timings.add(0.1)
    each = 0.1 * SAFETY
    # 1,000 due at once, two at a time: the first starts 500 restores early.
    assert plan.next_start() == pytest.approx(100.0 - 500 * each - RESTORE_MARGIN_S)
    for _ in range(998):
        plan.pop()
    assert plan.next_start() == pytest.approx(100.0 - each - RESTORE_MARGIN_S)
    # Slower restores measured: the plan starts earlier (the 90th percentile counts).
    for _ in range(20):
        timings.add(0.4)
    assert plan.next_start() == pytest.approx(100.0 - 0.4 * SAFETY - RESTORE_MARGIN_S)
    # Room for 100 restored ahead: the plan is for those 100, the rest wait for room.
    capped = RestorePlan(parallel=2, timings=timings, depth=100)
    for i in range(1000):
        capped.push(100.0, f"run{i}")
    assert capped.next_start() == pytest.approx(100.0 - 50 * 0.4 * SAFETY - RESTORE_MARGIN_S)


def test_a_queue_of_dumps_goes_at_the_median_pace_one_alone_at_the_90th_percentile() -> None:
    timings = Timings(0.1)
    for seconds in [0.1] * 8 + [1.0]:
        timings.add(seconds)
    assert timings.median() == 0.1
    assert timings.estimate() == 1.0


def test_a_dump_is_planned_only_if_its_restore_can_be_back_in_time() -> None:
    timings = Timings(0.1)
    for _ in range(CALIBRATED_AFTER):
        timings.add(0.1)
    each = 0.1 * SAFETY
    plan = RestorePlan(parallel=2, timings=timings, depth=100)
    # Alone: it fits while the deadline leaves room for its dump (0.5 s), one restore and
    # the margin.
    assert plan.fits(10.0, now=0.0, lead_s=0.5)
    assert not plan.fits(0.5 + RESTORE_MARGIN_S + each / 2 - 0.01, now=0.0, lead_s=0.5)
    # Restore slots: 40 images due by t=3 take 20 rounds of 0.125 s (2.5 s), more than the
    # 2.25 s left once a dump made now is done and the margin kept; by t=10 there is room.
    for i in range(40):
        plan.push(3.0, f"run{i}")
    assert not plan.fits(3.0, now=0.0, lead_s=0.5)
    assert plan.fits(10.0, now=0.0, lead_s=0.5)
    # Room: 100 due in the same second must be alive together; the 101st is not dumped, but
    # one a minute later is (the first hundred resumed by then).
    for i in range(60):
        plan.push(100.0, f"late{i}")
    assert plan.fits(100.0, now=0.0, lead_s=0.5)
    for i in range(40):
        plan.push(100.5, f"later{i}")
    assert not plan.fits(100.5, now=0.0, lead_s=0.5)
    assert not plan.fits(99.9, now=0.0, lead_s=0.5)  # (those due just after it count too)
    assert plan.fits(160.0, now=0.0, lead_s=0.5)
    # Processes restored ahead already hold room while their deadline is near, not later.
    soon = RestorePlan(parallel=2, timings=timings, depth=100)
    assert soon.fits(5.0, now=0.0, lead_s=0.5, alive=99)
    assert not soon.fits(5.0, now=0.0, lead_s=0.5, alive=100)
    assert soon.fits(60.0, now=0.0, lead_s=0.5, alive=100)  # (they are gone by then)
    # Dumps decided and not done yet count as images to come: a burst is decided whole,
    # before its first image exists.
    burst = RestorePlan(parallel=2, timings=timings, depth=3)
    assert burst.fits(50.0, now=0.0, lead_s=0.5, pending=[50.0, 50.2])
    assert not burst.fits(50.0, now=0.0, lead_s=0.5, pending=[50.0, 50.2, 50.9])
    assert burst.fits(50.0, now=0.0, lead_s=0.5, pending=[50.0, 50.2, 52.0])
    # ... and take restore slots: 40 due by t=3 cannot all be back, decided or made.
    assert not burst.fits(3.0, now=0.0, lead_s=0.5, pending=[2.0] * 40)


@pytest.mark.criu
@criu_only
async def test_restored_processes_are_not_kept_idle(state_dir: Path) -> None:
    async with running_daemon(
        state_dir, checkpoint="criu", wait_park_threshold_s=0.5, process_idle_s=300
    ) as h:
        assert (await h.register(TASKS)).status == "READY"
        handles = [await Tasks(h.client).trigger("remember", {"s": 2}) for _ in range(1)]
        for handle in handles:
            done = await h.wait(handle.id)
            assert any(s.description.startswith("restored its process") for s in done.snapshots)
        # Each restored process (the daemon's child, init of its PID namespace) exits with its
        # run instead of idling as a worker for process_idle_s.
        await eventually(lambda: not _namespace_children(exclude=set()), timeout_s=20)


# criu itself, but the next dumps fail while the arm file holds a count above zero, and each
# dump first sleeps as many seconds as {arm}.slow says: a fake that implements the real
# interface (the daemon runs it as it runs criu).
FLAKY_CRIU = """#!/bin/sh
if [ "$1" = dump ] && [ -s {arm}.slow ]; then
  sleep "$(cat {arm}.slow)"
fi
if [ "$1" = dump ] && [ -s {arm} ]; then
  left=$(cat {arm})
  if [ "$left" -gt 0 ]; then
    echo $((left - 1)) > {arm}
    echo "Error (flaky criu): a transient failure, $left left" >&2
    exit 1
  fi
fi
exec {real} "$@"
"""


@pytest.fixture
def flaky_criu() -> Iterator[tuple[Path, Path]]:
    """(the wrapper, its arm file), in a folder a root daemon trusts (root's, not /tmp)."""
    if not os.access("/run", os.W_OK):
        pytest.skip("no writable /run for a root-owned criu wrapper")
    folder = Path(tempfile.mkdtemp(dir="/run", prefix="ember-test-criu-"))
    try:
        arm, wrapper = folder / "arm", folder / "criu"
        assert SUPPORT.binary is not None
        wrapper.write_text(FLAKY_CRIU.format(arm=arm, real=SUPPORT.binary))
        wrapper.chmod(0o755)
        yield wrapper, arm
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _health(h: Harness) -> Health:
    return await h.client.request(Call("GET", "/healthz", Health))


@pytest.mark.criu
@criu_only
@pytest.mark.parametrize("failures", [1, 2])
async def test_a_failed_dump_is_retried_once_then_the_run_falls_back(
    state_dir: Path, flaky_criu: tuple[Path, Path], failures: int
) -> None:
    wrapper, arm = flaky_criu
    async with running_daemon(
        state_dir, checkpoint="criu", wait_park_threshold_s=0.5, criu_path=str(wrapper)
    ) as h:
        assert h.daemon.checkpoint_strategy == "criu"  # (its smoke test went through it)
        assert (await h.register(TASKS)).status == "READY"
        arm.write_text(str(failures))
        handle = await Tasks(h.client).trigger("remember", {"s": 3})
        done = await h.wait(handle.id)
        history = [s.description for s in done.snapshots]
        lines = (await Runs(h.client).logs(handle.id)).data
        assert done.output_as()["secret"] == float(lines[0].attrs["secret"])
        assert any("checkpoint failed (Error (flaky criu)" in d for d in history), history
        counts = (await _health(h)).checkpoint_counters
        if failures == 1:
            # Dumped on the retry, then restored with its memory.
            assert any(d.startswith("checkpointed:") for d in history), history
            assert any(d.startswith("restored its process") for d in history), history
            assert counts == {"dump_failures": 1, "dump_retries_ok": 1, "dumps": 1}
        else:
            assert any("failed again" in d and "held by park instead" in d for d in history)
            assert not any(d.startswith("checkpointed:") for d in history), history
            assert "resumed in its parked process" in history
            assert counts == {"dump_failures": 2, "fallbacks_park": 1}
            report = await asyncio.to_thread(doctor, state_dir, h.config.socket_path)
            assert "2 dumps failed, 0 of them worked when retried; fell back to park 1" in report


@pytest.mark.criu
@criu_only
async def test_past_max_parked_processes_a_run_whose_dumps_fail_replays(
    state_dir: Path, flaky_criu: tuple[Path, Path]
) -> None:
    wrapper, arm = flaky_criu
    async with running_daemon(
        state_dir,
        checkpoint="criu",
        wait_park_threshold_s=0.5,
        criu_path=str(wrapper),
        max_parked_processes=0,
    ) as h:
        assert (await h.register(TASKS)).status == "READY"
        arm.write_text("2")
        handle = await Tasks(h.client).trigger("remember", {"s": 1})
        done = await h.wait(handle.id)
        history = [s.description for s in done.snapshots]
        assert any("failed again" in d and "held by replay instead" in d for d in history)
        assert not any(d.startswith("checkpointed:") for d in history), history
        # Its process is gone: a new one re-executed the run from its journal, drawing a new
        # secret before the wait (which the journal answered) and returning that one.
        lines = (await Runs(h.client).logs(handle.id)).data
        secrets = [line.attrs["secret"] for line in lines if line.message == "before the wait"]
        assert len(secrets) == 2 and done.output_as()["secret"] == float(secrets[-1])
        counts = (await _health(h)).checkpoint_counters
        assert counts == {"dump_failures": 2, "fallbacks_replay": 1}, counts
        report = await asyncio.to_thread(doctor, state_dir, h.config.socket_path)
        assert "fell back to park 0, to replay 1" in report, report


@pytest.mark.criu
@criu_only
async def test_a_wait_over_before_its_dump_starts_is_not_dumped(
    state_dir: Path, flaky_criu: tuple[Path, Path]
) -> None:
    wrapper, arm = flaky_criu
    async with running_daemon(
        state_dir, checkpoint="criu", wait_park_threshold_s=0.5, criu_path=str(wrapper)
    ) as h:
        assert (await h.register(TASKS)).status == "READY"
        arm.with_suffix(".slow").write_text("5")
        # Every dump slot is taken for 5 s; the last run's 1 s wait ends before one frees.
        tasks = Tasks(h.client)
        handles = [await tasks.trigger("remember", {"s": 1}) for _ in range(parallelism() + 1)]
        runs = Runs(h.client)
        skipped = called_off = 0
        for handle in handles:
            done = await h.wait(handle.id)
            lines = (await runs.logs(handle.id)).data
            assert done.output_as()["secret"] == float(lines[0].attrs["secret"])
            history = [s.description for s in done.snapshots]
            if not any(d.startswith("checkpointed:") for d in history):
                skipped += 1
                # (woken, it reconnects as a restored process does, and says it never was one)
                assert (
                    "resumed in its process: the wait was over before its checkpoint began"
                    in history
                ), history
                assert "restored from its checkpoint" not in history, history
                if not any(d.startswith("checkpoint failed") for d in history):
                    # Its dump, queued for a slot, was called off as the wait ended: the run
                    # did not wait for a slot (5 s) to be told it needs no dump.
                    called_off += 1
                    assert done.finished_at is not None
                    assert (done.finished_at - done.created_at).total_seconds() < 4, history
                assert not any(d.startswith("restored its process") for d in history), history
        counts = (await _health(h)).checkpoint_counters
        assert skipped == counts["dumps_not_needed"] >= 1, counts
        assert called_off >= 1, counts
        assert counts["dumps"] + skipped == len(handles), counts


# A task that says whether its process was asked to get ready for a dump while it waited (the
# run process counts each Suspend it obeyed).
BURST_TASKS = {
    **TASKS,
    "tasks/burst.py": """
        import random
        from ember import logger, task, wait
        from ember.daemon.child import tracing

        @task(id="remember_readied")
        async def remember_readied(payload: dict) -> dict:
            secret = random.random()
            logger.info("before the wait", secret=secret)
            before = tracing.checkpoints()
            await wait.for_(seconds=payload["s"])
            return {"secret": secret, "readied": tracing.checkpoints() - before}
    """,
}


@pytest.mark.criu
@criu_only
async def test_a_burst_its_restores_cannot_bring_back_in_time_is_held_undumped(
    state_dir: Path,
) -> None:
    async with running_daemon(
        state_dir, checkpoint="criu", wait_park_threshold_s=0.5, max_restored_ahead=2
    ) as h:
        assert (await h.register(BURST_TASKS)).status == "READY"
        tasks, runs = Tasks(h.client), Runs(h.client)
        # Dumps measured first: the plan decides on measured times only.
        for _ in range(CALIBRATED_AFTER):
            await h.wait((await tasks.trigger("remember", {"s": 1})).id)
        before = (await _health(h)).checkpoint_counters
        # Six runs due within a second, with room for two processes restored ahead.
        burst = [await tasks.trigger("remember_readied", {"s": 6}) for _ in range(6)]
        declined = 0
        for handle in burst:
            done = await h.wait(handle.id, timeout_s=60)
            lines = (await runs.logs(handle.id)).data
            output = done.output_as()
            assert output["secret"] == float(lines[0].attrs["secret"]), "its own memory"
            history = [s.description for s in done.snapshots]
            if not any(d.startswith("checkpointed:") for d in history):
                declined += 1
                # Decided as it began to wait: its process was never asked to get ready.
                assert output["readied"] == 0, history
                assert (
                    "not checkpointed: its restore could not be back before its deadline;"
                    " held by park" in history
                ), history
        counts = (await _health(h)).checkpoint_counters
        assert 4 <= declined == counts["dumps_declined"] - before.get("dumps_declined", 0)
        assert counts["dumps"] - before["dumps"] + declined == len(burst), counts
