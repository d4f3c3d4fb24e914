"""Attempts: what run processes report (logs, heartbeats, waits, results) and how each ends.

A result finishes the run; a failure retries it with backoff while its policy allows (the
retry is queued only once the failed attempt is recorded); a process that exits or falls
silent crashes its attempt; the sweeper stops attempts past their max duration.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from typing import Any

import msgspec

from ember._types import LogEvent, LogLine, RunError, RunStatus
from ember.daemon.engine import machines
from ember.daemon.engine.admission import TRIGGER_REQUEST_TTL_S
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.dispatch import Dispatch
from ember.daemon.engine.dormant import DormantRuns
from ember.daemon.engine.holds import Holds
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.model import ActiveRun, Snapshot, Worker
from ember.daemon.procs.protocol import Done, Heartbeat, Log, Spans, Wait
from ember.daemon.store import idempotency as idempotency_store
from ember.daemon.store import logs as logs_store
from ember.daemon.store import runs as store

_dict_decoder = msgspec.json.Decoder(dict[str, Any])


class Attempts(EnginePart):
    """The frames of run processes, and the end of each attempt.

    Args:
        ctx: the engine's shared state.
        lifecycle: where runs change state.
        dispatch: the slots and the queue (a retry is queued again).
        dormant: the horizon the sweeper moves.
        holds: where a wait goes.
    """

    def __init__(
        self,
        ctx: EngineContext,
        lifecycle: Lifecycle,
        dispatch: Dispatch,
        dormant: DormantRuns,
        holds: Holds,
    ) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.dispatch = dispatch
        self.dormant = dormant
        self.holds = holds
        self._log_buffer: list[tuple[Any, ...]] = []

    def on_worker_message(
        self, worker: Worker, message: Log | Spans | Heartbeat | Wait | Done
    ) -> None:
        """Handle a frame from a run process."""
        run = worker.run
        if run is not None and self.ctx.checkpointer is not None:
            self.ctx.checkpointer.reported(worker)  # its run resumed here: its image can go
        if isinstance(message, Spans):
            self.ctx.traces.ingest(message)  # (also a late batch: the spans are the run's anyway)
            return
        if isinstance(message, Log):
            logged = run if run is not None else worker.canceled
            if logged is not None and logged.id == message.run_id:
                self._buffer_log(logged.env, message)
            return
        if run is None or run.id != message.run_id:
            return  # a late frame of an attempt already settled (canceled, timed out)
        if isinstance(message, Heartbeat):
            worker.last_heartbeat = self.clock()
            return
        if message.attempt != run.attempt:
            return
        if isinstance(message, Wait):
            self.ctx.spawn(self.holds.on_wait(worker, run, message))
            return
        self._attempt_done(worker, run, message)

    def _buffer_log(self, env: str, message: Log) -> None:
        if self.events.has_subscribers(env):
            attrs = _dict_decoder.decode(message.attrs) if message.attrs else {}
            line = LogLine(
                ts=store.ts(message.ts),
                level=message.level,
                message=message.message,
                attempt=message.attempt,
                attrs=attrs,
            )
            self.events.publish(env, LogEvent(run_id=message.run_id, line=line))
        if not self._log_buffer:
            asyncio.get_running_loop().call_soon(self.flush_logs)
        self._log_buffer.append(
            (
                message.run_id,
                message.attempt,
                message.ts,
                message.level,
                message.message,
                message.attrs or None,
            )
        )

    def flush_logs(self) -> None:
        rows, self._log_buffer = self._log_buffer, []
        if rows:
            self.db.write(lambda conn: logs_store.insert_logs(conn, rows))

    def _attempt_done(self, worker: Worker, run: ActiveRun, done: Done) -> None:
        worker.run = None
        worker.runs_done += 1
        self.dispatch.release_slot(run)
        self.ctx.supervisor.release(worker)
        if done.ok and done.output is not None and len(done.output) > self.config.max_output_bytes:
            done = Done(
                run_id=done.run_id,
                attempt=done.attempt,
                ok=False,
                retry=False,
                cpu_s=done.cpu_s,
                peak_rss_bytes=done.peak_rss_bytes,
                error=RunError(
                    name="OutputTooLarge",
                    message=f"the output is {len(done.output)} bytes, over the limit of "
                    f"{self.config.max_output_bytes}: return a reference to stored data instead",
                    code="TASK_OUTPUT_TOO_LARGE",
                ),
            )
        if done.ok:
            self.lifecycle.finish(
                run,
                RunStatus.COMPLETED,
                output=done.output or b"null",
                attempt_status="COMPLETED",
                cpu_s=done.cpu_s,
                peak_rss_bytes=done.peak_rss_bytes,
            )
            return
        error = done.error or RunError(name="Error", message="the attempt failed")
        self._attempt_failed(
            run,
            error,
            RunStatus.FAILED,
            done.retry,
            done.cpu_s,
            done.peak_rss_bytes,
            delay_s=done.retry_delay_s,
        )

    def _attempt_failed(
        self,
        run: ActiveRun,
        error: RunError,
        final_status: RunStatus,
        retryable: bool,
        cpu_s: float | None = None,
        peak_rss_bytes: int | None = None,
        delay_s: float | None = None,
    ) -> None:
        """Retry the run with backoff if its policy allows, else finish it.

        ``delay_s`` overrides the policy's delay (a task's ``catch_error`` chose it).
        """
        attempt_status = "CRASHED" if final_status is RunStatus.CRASHED else "FAILED"
        used = run.attempt - run.interruptions
        if not retryable or used >= run.max_attempts:
            self.lifecycle.finish(
                run,
                final_status,
                error=error,
                attempt_status=attempt_status,
                cpu_s=cpu_s,
                peak_rss_bytes=peak_rss_bytes,
            )
            return
        now = self.clock()
        delay = run.retry.delay_s(used) if delay_s is None else delay_s
        run.status = RunStatus.QUEUED
        run.ready_at = ready_at = now + delay
        number = run.attempt
        if final_status is RunStatus.FAILED:
            # An attempt that raised starts a new journal: its retry waits afresh.
            run.generation += 1
        generation = run.generation
        larger = machines.after_failure(run, error)
        on = f" on {larger}, out of memory" if larger else ""

        def write(conn: sqlite3.Connection) -> None:
            store.finish_attempt(
                conn, run.id, number, attempt_status, now, error, cpu_s, peak_rss_bytes
            )
            store.set_status(
                conn,
                run.id,
                RunStatus.QUEUED,
                now,
                Snapshot.QUEUED,
                attempt=number,
                description=f"retrying in {delay:.1f}s{on}",
                ready_at=run.ready_at,
                generation=generation,
                hold=None,
                machine=run.machine,
            )

        def requeue(_: asyncio.Future[None]) -> None:
            # Queued only once recorded: a later attempt's writes must not precede this one.
            self.lifecycle.publish(run, error=error)
            if run.status is not RunStatus.QUEUED:
                return  # canceled meanwhile
            wait_s = max(0.0, ready_at - self.clock())
            run.timers.append(
                asyncio.get_running_loop().call_later(wait_s, self.dispatch.enqueue, run, ready_at)
            )

        what = f"the failed attempt {number} of {run.id}"
        self.lifecycle.write_until_recorded(run, write, what).add_done_callback(requeue)

    def on_worker_gone(self, worker: Worker, reason: str) -> None:
        """A run process exited or its channel closed: its attempt, if any, crashed."""
        self.holds.process_lost(worker)
        run = worker.run
        worker.run = None
        if run is None or run.worker is not worker:
            return
        self.dispatch.release_slot(run)
        if worker.timed_out:
            self.lifecycle.finish(
                run,
                RunStatus.TIMED_OUT,
                error=RunError(
                    name="MaxDurationExceeded",
                    message=f"the attempt ran longer than max_duration_s={run.max_duration_s}",
                    code="MAX_DURATION_EXCEEDED",
                ),
                attempt_status="TIMED_OUT",
            )
            return
        code = "TASK_RUN_STALLED_EXECUTING" if worker.stalled else "TASK_PROCESS_EXITED"
        error = RunError(name="TaskRunCrashed", message=f"the run process {reason}", code=code)
        if worker.oom_killed:
            error = machines.oom_error(worker, reason)
        self._attempt_failed(run, error, RunStatus.CRASHED, True, *worker.usage)

    def on_spawn_failed(self, env: str, version: str, reason: str) -> None:
        """The version's zygote could not start: runs waiting for it fail as system failures."""
        if self.ctx.closing or self.ctx.draining:
            # The daemon stopped it: the runs were only dequeued in memory and stay QUEUED in
            # the table for the next start (a restart must not fail them).
            return
        waiting = self.dispatch.take_awaiting(env, version)
        error = RunError(name="WorkerStartFailed", message=reason, code="COULD_NOT_START_WORKER")
        for run in waiting:
            if run.status is RunStatus.DEQUEUED:
                self.dispatch.release_slot(run)
                self.lifecycle.finish(run, RunStatus.SYSTEM_FAILURE, error=error)

    async def sweep(self) -> None:
        """Once a second: stop overdue and silent attempts, and bring in nearing DELAYED runs."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            self.dormant.load_delayed(now)
            ticks += 1
            if ticks % 60 == 0:
                prune = functools.partial(
                    idempotency_store.prune_trigger_requests, before=now - TRIGGER_REQUEST_TTL_S
                )
                self.db.write(prune)
            for worker in self.ctx.supervisor.busy_workers():
                run = worker.run
                if run is None:
                    continue
                if (
                    run.max_duration_s is not None
                    and run.executing_s + now - run.attempt_started > run.max_duration_s
                ):
                    worker.timed_out = True
                    self.ctx.supervisor.kill(worker)
                elif now - worker.last_heartbeat > self.config.heartbeat_timeout_s:
                    worker.stalled = True
                    self.ctx.supervisor.kill(worker)
