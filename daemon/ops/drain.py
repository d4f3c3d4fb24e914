"""SIGTERM without lost work: stop starting attempts, give executing runs a grace, then hold them.

What a stop does to a run executing when it comes (``systemctl restart``, an upgrade):

1. No attempt starts any more; the API keeps answering, and runs triggered meanwhile are
   committed and queued for the next start. Waiting runs stay suspended.
2. Executing runs get ``shutdown_grace_s`` to finish (systemd hears ``EXTEND_TIMEOUT_USEC``).
3. Those still executing then are checkpointed where they stand when CRIU works (the next
   daemon restores them and they carry on from that instruction, memory and all); the rest
   are interrupted: their attempt is recorded ``INTERRUPTED`` and the run queued again, to
   re-execute from its journal (completed waits and children are not redone) without using
   up a retry. Either way the table says so before the process is killed, so no run is left
   ``EXECUTING`` with no process.

A second SIGTERM or SIGINT skips what is left of the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember._types import RunError, RunStatus
from ember.daemon.model import Snapshot
from ember.daemon.ops.systemd import Notifier
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.engine.core import Engine
    from ember.daemon.model import ActiveRun, Worker
    from ember.daemon.procs.supervisor import Supervisor

log = logging.getLogger("ember.daemon")

# systemd is asked for this much beyond the grace: checkpoints and the stop itself.
STOP_MARGIN_S = 30.0
# How often systemd's stop timeout is pushed further while runs finish.
EXTEND_EVERY_S = 5.0
# How long a run process has to get ready for its checkpoint before it is interrupted.
CHECKPOINT_READY_S = 5.0

INTERRUPTED = RunError(
    name="DaemonStopping",
    message="the daemon stopped while this attempt was executing; it re-executes from its journal",
    code="TASK_RUN_INTERRUPTED",
)


@dataclass
class DrainReport:
    """What a drain did to the runs executing when it began.

    Attributes:
        finished: runs that ended within the grace.
        checkpointed: runs dumped with CRIU, to carry on after the restart.
        interrupted: runs queued again, to re-execute from their journal.
        elapsed_s: how long the drain took.
    """

    finished: list[str] = field(default_factory=list)
    checkpointed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"drained in {self.elapsed_s:.1f}s: {len(self.finished)} finished, "
            f"{len(self.checkpointed)} checkpointed, {len(self.interrupted)} interrupted"
        )


def executing(supervisor: Supervisor) -> dict[str, tuple[ActiveRun, Worker]]:
    """The runs executing in a process now, by id."""
    return {w.run.id: (w.run, w) for w in supervisor.busy_workers() if w.run is not None}


async def drain(
    engine: Engine,
    supervisor: Supervisor,
    notifier: Notifier,
    grace_s: float,
    force: asyncio.Event,
) -> DrainReport:
    """Drain the daemon (see the module's docstring); the caller stops it afterwards.

    Args:
        engine: stops starting attempts.
        supervisor: where the executing runs are.
        notifier: systemd, told STOPPING and how much longer to wait.
        grace_s: how long executing runs have to finish.
        force: set by a second signal: end the grace now.
    """
    started = time.monotonic()
    engine.draining = True
    report = DrainReport()
    at_start = executing(supervisor)
    notifier.stopping(_status(len(at_start)), grace_s + STOP_MARGIN_S)
    log.info(
        "stopping: %d runs executing get %.0fs to finish (SIGTERM again to stop at once)",
        len(at_start),
        grace_s,
    )
    deadline = started + grace_s
    extended = started
    while executing(supervisor) and not force.is_set():
        now = time.monotonic()
        if now >= deadline:
            break
        if now - extended >= EXTEND_EVERY_S:
            notifier.extend(deadline - now + STOP_MARGIN_S, _status(len(executing(supervisor))))
            extended = now
        # A poll, not an event per run: a tenth of a second is nothing against the grace.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(0.1, deadline - now)):
                await force.wait()
    left = executing(supervisor)
    report.finished = [run_id for run_id in at_start if run_id not in left]
    if left:
        await _hold(engine, supervisor, notifier, left, report)
    report.elapsed_s = time.monotonic() - started
    log.info("%s", report.summary())
    return report


async def _hold(
    engine: Engine,
    supervisor: Supervisor,
    notifier: Notifier,
    left: dict[str, tuple[ActiveRun, Worker]],
    report: DrainReport,
) -> None:
    """Checkpoint (CRIU) or interrupt the runs still executing, recording each first."""
    notifier.extend(STOP_MARGIN_S, f"holding {len(left)} runs for the restart")
    to_interrupt = list(left.values())
    checkpointer = engine.checkpointer
    if checkpointer is not None:
        # A run in a short wait (it keeps its process) re-executes instead: its wait may
        # complete before its image is restored, and the Resume would then never come.
        pairs = [(run, worker) for run, worker in left.values() if run.wait is None]
        to_interrupt = [(run, worker) for run, worker in left.values() if run.wait is not None]
        dumped = await asyncio.gather(
            *(checkpointer.checkpoint_executing(r, w, CHECKPOINT_READY_S) for r, w in pairs)
        )
        to_interrupt += [pair for pair, ok in zip(pairs, dumped, strict=True) if not ok]
        held = [run for (run, _), ok in zip(pairs, dumped, strict=True) if ok]
        await engine.db.write(lambda conn: _record_checkpointed(conn, held, engine.clock()))
        report.checkpointed = [run.id for run in held]
        for run in held:
            run.worker = None
    for run, worker in to_interrupt:
        # From here on nothing this process says is recorded: its run is settled.
        worker.run = None
        run.worker = None
        supervisor.kill(worker)
    interrupted = [run for run, _ in to_interrupt]
    await engine.db.write(lambda conn: _record_interrupted(conn, interrupted, engine.clock()))
    report.interrupted = [run.id for run in interrupted]


def _requeue(
    conn: sqlite3.Connection, run: ActiveRun, now: float, description: str, **columns: object
) -> None:
    # QUEUED in the table: the next start takes it up (restoring its image, if it has one).
    store.set_status(
        conn,
        run.id,
        RunStatus.QUEUED,
        now,
        Snapshot.QUEUED,
        attempt=run.attempt,
        description=description,
        ready_at=None,
        **columns,
    )


def _record_checkpointed(conn: sqlite3.Connection, runs: list[ActiveRun], now: float) -> None:
    for run in runs:
        # The attempt goes on after the restore: it stays open.
        description = "checkpointed mid-execution for a daemon restart"
        _requeue(conn, run, now, description, hold="checkpoint")


def _record_interrupted(conn: sqlite3.Connection, runs: list[ActiveRun], now: float) -> None:
    for run in runs:
        store.finish_attempt(conn, run.id, run.attempt, "INTERRUPTED", now, INTERRUPTED)
        # An interruption is not a failure: ``attempt - interruptions`` counts the retries.
        _requeue(
            conn,
            run,
            now,
            "interrupted by a daemon stop; re-executes from its journal",
            interruptions=run.interruptions + 1,
            hold=None,
        )


def _status(executing_now: int) -> str:
    return f"stopping: {executing_now} runs executing, no new attempts"
