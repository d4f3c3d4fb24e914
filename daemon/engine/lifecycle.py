"""The bottom of a run's lifecycle: its status, its snapshots, its process and its events.

Every other part of the engine changes a run through these: binding it to a process
(:meth:`Lifecycle.bind`), recording that it executes again, resuming it in a live process,
falling back to replay, finishing it, and publishing each change. A final state is written
until it commits (:meth:`Lifecycle.write_until_recorded`) and only then forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import msgspec

from ember._types import RunError, RunEvent, RunStatus
from ember.daemon.engine.alerts import Alerts
from ember.daemon.engine.batches import Batches
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.debounce import Debouncer
from ember.daemon.engine.waits import Waitpoints
from ember.daemon.model import ActiveRun, Hold, Snapshot, Worker
from ember.daemon.procs.protocol import Resume
from ember.daemon.store import columns
from ember.daemon.store import runs as store

log = logging.getLogger("ember.daemon")

# A write recording the end of an attempt is retried until it commits, this far apart.
WRITE_RETRY_MIN_S = 0.1
WRITE_RETRY_MAX_S = 5.0
_ALERT_STATUSES = frozenset(
    {RunStatus.FAILED, RunStatus.CRASHED, RunStatus.SYSTEM_FAILURE, RunStatus.TIMED_OUT}
)


class Lifecycle(EnginePart):
    """The active runs, and the only code that ends them.

    Args:
        ctx: the engine's shared state.
        waits: the waitpoints (a final run's waits are dropped).
        batches: the batches (a final run counts towards its batch).
        debounced: the debouncer (a final run is no longer a debounce target).
        alerts: the alert channels (``run.failed``).
    """

    def __init__(
        self,
        ctx: EngineContext,
        waits: Waitpoints,
        batches: Batches,
        debounced: Debouncer,
        alerts: Alerts,
    ) -> None:
        super().__init__(ctx)
        self.waits = waits
        self.batches = batches
        self.debounced = debounced
        self.alerts = alerts
        self.active: dict[str, ActiveRun] = {}
        # Long polls for a run's end (Engine.wait_final), answered when it is forgotten.
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def begin_close(self) -> None:
        """Answer the long polls now: the daemon is stopping."""
        self.ctx.closing = True
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self.waiters.clear()

    def bind(self, run: ActiveRun, worker: Worker, now: float) -> None:
        """From now on the run executes in this process (a start, a replay or a resume)."""
        run.hold = None
        run.resume = None
        run.status = RunStatus.EXECUTING
        run.worker = worker
        run.attempt_started = now
        worker.run = run
        worker.last_heartbeat = now

    def record_executing(self, run: ActiveRun, now: float, description: str) -> None:
        """Record that an attempt under way executes again (after a wait or a replay)."""
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.EXECUTING,
                now,
                Snapshot.EXECUTING,
                attempt=run.attempt,
                description=description,
                hold=None,
            )
        )

    def resume_on(self, run: ActiveRun, worker: Worker, how: str) -> None:
        """Continue a run in a live process (parked or restored); its slot is taken."""
        assert run.resume is not None
        seq, result = run.resume
        now = self.clock()
        self.bind(run, worker, now)
        self.record_executing(run, now, how)
        worker.send(Resume(run_id=run.id, seq=seq, result=result))
        self.publish(run)

    def note(self, run: ActiveRun, snapshot: Snapshot, description: str) -> None:
        """Record an execution snapshot that does not change the run's status."""
        now = self.clock()
        self.db.write(
            lambda conn: store.add_snapshot(conn, run.id, snapshot, now, run.attempt, description)
        )

    def replay_instead(self, run: ActiveRun) -> None:
        """A held process could not be resumed: the run re-executes from its journal."""
        run.hold = Hold.EXITED
        run.parked = None
        self.db.write(lambda conn: store.set_hold(conn, run.id, Hold.EXITED))

    def finish(
        self,
        run: ActiveRun,
        status: RunStatus,
        *,
        output: bytes | None = None,
        error: RunError | None = None,
        attempt_status: str | None = None,
        cpu_s: float | None = None,
        peak_rss_bytes: int | None = None,
    ) -> asyncio.Future[None]:
        now = self.clock()
        number = run.attempt
        previous = run.status
        run.status = status
        for handle in run.timers:
            handle.cancel()
        run.timers.clear()
        blobs = self.blobs
        alert = status in _ALERT_STATUSES and self.alerts.wants(run.env, "run.failed")
        alert_data = _failed_run(run, status, error) if alert else {}

        def write(conn: sqlite3.Connection) -> None:
            if attempt_status is not None and number:
                store.finish_attempt(
                    conn, run.id, number, attempt_status, now, error, cpu_s, peak_rss_bytes
                )
            if alert:
                self.alerts.record(conn, run.env, "run.failed", run.id, alert_data, now)
            store.finish_run(
                conn,
                blobs,
                run.id,
                status,
                now,
                output=output,
                error=error,
                attempt=number,
                description=f"from {previous.value}",
            )

        future = self.write_until_recorded(run, write, f"the end of {run.id}")
        future.add_done_callback(lambda _: self.forget(run, run.status, error))
        if self.ctx.traces.sinks:  # (the exporters get its spans once its end is recorded)
            future.add_done_callback(lambda _: self.ctx.traces.run_recorded(run.id))
        if alert:
            future.add_done_callback(lambda _: self.alerts.wake())
        return future

    def write_until_recorded(
        self, run: ActiveRun, write: Callable[[sqlite3.Connection], None], what: str
    ) -> asyncio.Future[None]:
        """Commit a write that must not be lost, retrying with backoff until it commits.

        The end of an attempt exists only in memory until it is written: dropping it (the
        disk is full, the file is locked) would leave the run EXECUTING in the table for
        good. The run stays in memory meanwhile, so it is neither lost nor started again.
        Such writes of one run commit in order (a cancel never lands before the retry it
        follows).
        """
        loop = asyncio.get_running_loop()
        recorded: asyncio.Future[None] = loop.create_future()
        before = run.recording
        run.recording = recorded
        delay_s = WRITE_RETRY_MIN_S

        def attempt() -> None:
            self.db.write(write).add_done_callback(settle)

        def settle(future: asyncio.Future[None]) -> None:
            nonlocal delay_s
            error = None if future.cancelled() else future.exception()
            if error is None:
                if not recorded.done():
                    recorded.set_result(None)
                return
            if self.ctx.closing:
                # Recovery reads the table, so the next start finds the attempt as it was
                # recorded and requeues it: still never lost.
                log.error("recording %s failed while stopping: %s", what, error)
                return
            log.error("recording %s failed (%s); retrying in %.1fs", what, error, delay_s)
            loop.call_later(delay_s, attempt)
            delay_s = min(WRITE_RETRY_MAX_S, delay_s * 2)

        if before is None or before.done():
            attempt()
        else:
            before.add_done_callback(lambda _: attempt())
        return recorded

    def forget(self, run: ActiveRun, status: RunStatus, error: RunError | None) -> None:
        self.active.pop(run.id, None)
        self.waits.on_run_final(run.id)
        self.debounced.forget(run)
        if run.batch_id is not None:
            self.batches.on_run_final(run.batch_id)
        self.publish(run, error=error, finished=True)
        for waiter in self.waiters.pop(run.id, ()):
            if not waiter.done():
                waiter.set_result(None)
        self.update_idle()

    def metadata_changed(self, changed: dict[str, dict[str, Any]]) -> None:
        """Runs' metadata was written (``api/metadata.py``): their cached copies follow."""
        for run_id, data in changed.items():
            run = self.active.get(run_id)
            if run is not None:
                run.metadata = data  # (what the next attempt's context carries)
                self.publish(run)

    def publish(
        self, run: ActiveRun, *, error: RunError | None = None, finished: bool = False
    ) -> None:
        if not self.events.has_subscribers(run.env):
            return
        now = self.clock()
        summary = columns.summary_of(run, now, error=error, finished=finished)
        self.events.publish(run.env, RunEvent(run=summary))

    def update_idle(self) -> None:
        if self.active:
            self._idle.clear()
        else:
            self._idle.set()

    async def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until no run is active (tests' deterministic drain, like arq's burst mode)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()


def _failed_run(run: ActiveRun, status: RunStatus, error: RunError | None) -> dict[str, Any]:
    """What a ``run.failed`` alert says about the run."""
    return {
        "run": {
            "id": run.id,
            "task_id": run.task_id,
            "status": status.value,
            "error": msgspec.to_builtins(error) if error is not None else None,
            "attempt_count": run.attempt,
            "version": run.version,
            "tags": run.tags,
            "created_at": store.ts(run.created_at).isoformat(),
        }
    }
