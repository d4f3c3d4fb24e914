"""The engine: its parts along a run's lifecycle, built and wired here.

Every state change is written through the group-commit writer before anyone outside the
daemon can see it: a trigger is answered after its run is committed, a run's output is
served after its completion is committed. The in-memory state (active runs, lanes, timers)
is a cache that :meth:`Engine.recover` rebuilds from the table after any stop, ``kill -9``
included.

The parts, bottom up (docs/architecture.md draws them): :mod:`.lifecycle` (a run's status,
process, snapshots and events), :mod:`.registry` (versions and queue settings),
:mod:`.dispatch` (the queue, timers and placement on processes), :mod:`.dormant` (DELAYED
runs kept in the table alone), :mod:`.holds` (waits), :mod:`.attempts` (what processes
report, and each attempt's end), :mod:`.actions` (cancel, reschedule, read) and
:mod:`.admission` (triggers). This façade builds them on one :class:`EngineContext`, recovers
them, and is what the daemon, the supervisor, the checkpointer and the API talk to.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ember._types import (
    BatchItem,
    RunError,
    RunStatus,
    TriggerOptions,
    TriggerResponse,
    VersionInfo,
)
from ember.daemon.config import DaemonConfig
from ember.daemon.engine.actions import Actions
from ember.daemon.engine.admission import Admission
from ember.daemon.engine.alerts import Alerts
from ember.daemon.engine.attempts import Attempts
from ember.daemon.engine.batches import Batches
from ember.daemon.engine.bulk import BulkActions
from ember.daemon.engine.callbacks import TokenCallbacks
from ember.daemon.engine.context import EngineContext
from ember.daemon.engine.debounce import Debouncer
from ember.daemon.engine.dispatch import Dispatch
from ember.daemon.engine.dormant import DormantRuns
from ember.daemon.engine.events import EventHub
from ember.daemon.engine.holds import Holds
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.engine.registry import Registry
from ember.daemon.engine.waits import Waitpoints
from ember.daemon.model import ActiveRun, Hold, Snapshot
from ember.daemon.store import runs as store
from ember.daemon.store.db import Database

if TYPE_CHECKING:
    from ember.daemon.procs.checkpoint.checkpointer import Checkpointer
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.diskguard import DiskGuard

# A daemon restart interrupts attempts through no fault of the task: they do not use up the
# retry budget, but a run interrupted this often is failed so that it cannot loop forever.
MAX_INTERRUPTIONS = 5


class Engine:
    """Owns every run that is not final.

    Args:
        config: the daemon's configuration.
        db: the state database.
        events: where run changes are published.
        clock: wall-clock seconds for every timestamp and timer (the daemon's clock).
    """

    # (declared for the debouncer's late-bound calls, made before they are built)
    dispatch: Dispatch
    dormant: DormantRuns

    def __init__(
        self,
        config: DaemonConfig,
        db: Database,
        events: EventHub,
        clock: Callable[[], float] = time.time,
    ) -> None:
        ctx = self.ctx = EngineContext(config, db, events, clock)
        self.config = config
        self.clock = clock
        self.db = db
        self.events = events
        self.blobs = ctx.blobs
        self.queue = ctx.queue
        self.traces = ctx.traces
        # The helpers beside the lifecycle see the engine through Protocols of their own.
        self.waits = Waitpoints(self)
        self.batches = Batches(self)
        self.bulk = BulkActions(self)
        self.callbacks = TokenCallbacks(config)
        self.alerts = Alerts(self)
        # (late-bound: the debouncer is below the parts that bring dormant runs in)
        self.debounced = Debouncer(
            db,
            self.blobs,
            lambda run_id: self.dormant.held(run_id),
            lambda run: self.dispatch.delay_moved(run),
        )
        self.lifecycle = Lifecycle(ctx, self.waits, self.batches, self.debounced, self.alerts)
        self.registry = Registry(ctx, self.alerts)
        self.dispatch = Dispatch(ctx, self.lifecycle, self.registry, self.waits, self.debounced)
        self.dormant = DormantRuns(ctx, self.lifecycle, self.dispatch)
        self.holds = Holds(ctx, self.lifecycle, self.dispatch, self.waits)
        self.attempts = Attempts(ctx, self.lifecycle, self.dispatch, self.dormant, self.holds)
        self.actions = Actions(ctx, self.lifecycle, self.dispatch, self.dormant, self.holds)
        self.admission = Admission(
            ctx,
            self.lifecycle,
            self.registry,
            self.dispatch,
            self.dormant,
            self.actions,
            self.batches,
            self.debounced,
        )
        self.active = self.lifecycle.active
        self.versions = self.registry.versions
        self.current = self.registry.current
        self._sweeper: asyncio.Task[None] | None = None

        # What the supervisor, the checkpointer, the waitpoints and the API call, answered
        # by the part that owns it.
        self.trigger = self.admission.trigger
        self.trigger_batch_chunk = self.admission.trigger_batch_chunk
        self.cancel = self.actions.cancel
        self.reschedule = self.actions.reschedule
        self.reset_idempotency_key = self.actions.reset_idempotency_key
        self.get_run = self.actions.get_run
        self.wait_final = self.actions.wait_final
        self.next_version_id = self.registry.next_version_id
        self.version_list = self.registry.version_list
        self.rate_limit = self.registry.rate_limit
        self.place = self.dispatch.place
        self.on_worker_ready = self.dispatch.on_worker_ready
        self.awaiting_count = self.dispatch.awaiting_count
        self.rebalance = self.dispatch.rebalance
        self.resume_parked_or_replay = self.dispatch.resume_parked_or_replay
        self.on_worker_message = self.attempts.on_worker_message
        self.on_worker_gone = self.attempts.on_worker_gone
        self.on_spawn_failed = self.attempts.on_spawn_failed
        self.wait_completed = self.holds.wait_completed
        self.on_worker_back = self.holds.on_worker_back
        self.note = self.lifecycle.note
        self.resume_on = self.lifecycle.resume_on
        self.replay_instead = self.lifecycle.replay_instead
        self.begin_close = self.lifecycle.begin_close
        self.run_until_idle = self.lifecycle.run_until_idle
        self.metadata_changed = self.lifecycle.metadata_changed

    # -- the daemon's wiring, kept in the shared context --------------------------------

    @property
    def supervisor(self) -> Supervisor:
        """The run processes' supervisor (set by the daemon once both are built)."""
        return self.ctx.supervisor

    @supervisor.setter
    def supervisor(self, supervisor: Supervisor) -> None:
        self.ctx.supervisor = supervisor

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The CRIU checkpointer, when a smoke test passed."""
        return self.ctx.checkpointer

    @checkpointer.setter
    def checkpointer(self, checkpointer: Checkpointer | None) -> None:
        self.ctx.checkpointer = checkpointer

    @property
    def strategy(self) -> str:
        """How long waits are held: ``criu``, ``park`` or ``replay``."""
        return self.ctx.strategy

    @strategy.setter
    def strategy(self, strategy: str) -> None:
        self.ctx.strategy = strategy

    @property
    def disk_guard(self) -> DiskGuard | None:
        """Refuses new runs while the disk is nearly full."""
        return self.ctx.disk_guard

    @disk_guard.setter
    def disk_guard(self, guard: DiskGuard | None) -> None:
        self.ctx.disk_guard = guard

    @property
    def draining(self) -> bool:
        """True once a SIGTERM drain began: no attempt starts from then on."""
        return self.ctx.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.ctx.draining = draining

    @property
    def closing(self) -> bool:
        """True once the daemon has begun to stop."""
        return self.ctx.closing

    # -- start and stop -----------------------------------------------------------------

    async def recover(self) -> int:
        """Rebuild versions, queues and timers from the table; returns the active run count.

        Attempts that were executing when the daemon stopped have no process any more: each
        is recorded as interrupted and its run queued again at once.
        """
        self.registry.load()
        now = self.clock()
        interrupted: list[ActiveRun] = []
        self.dormant.horizon = horizon = now + self.config.delayed_in_memory_s
        for run in self.db.read_now(lambda conn: store.load_active(conn, horizon)):
            self.active[run.id] = run
            if run.hold == Hold.PARKED:
                run.hold = Hold.EXITED  # its process died with the previous daemon
            if run.status in (RunStatus.EXECUTING, RunStatus.DEQUEUED):
                interrupted.append(run)
            elif run.status is not RunStatus.WAITING:
                self.dispatch.admit(run, now)
        if self.ctx.checkpointer is not None:
            imaged = {r.id for r in self.active.values() if r.hold == Hold.CHECKPOINT}
            self.ctx.checkpointer.prune(imaged)
        if interrupted:
            await self._requeue_interrupted(interrupted, now)
        for record, result in await self.waits.recover():
            waiting = self.active.get(record.run_id)
            if waiting is None or waiting.generation != record.generation:
                continue
            if waiting.status is RunStatus.WAITING:
                waiting.wait = record
            if result is not None:
                self.ctx.spawn(self.waits.complete(record, result))
            else:
                self.waits.arm(record)
                if waiting.hold == Hold.CHECKPOINT and self.ctx.checkpointer is not None:
                    self.ctx.checkpointer.restore_ahead(waiting)
        self.batches.recover()
        self.bulk.recover()
        self.alerts.recover()
        self._sweeper = asyncio.get_running_loop().create_task(self.attempts.sweep())
        self.lifecycle.update_idle()
        return len(self.active)

    async def _requeue_interrupted(self, runs: list[ActiveRun], now: float) -> None:
        error = RunError(
            name="DaemonRestarted",
            message="the daemon stopped while this attempt was executing",
            code="TASK_RUN_INTERRUPTED",
        )
        failed = [r for r in runs if r.interruptions + 1 > MAX_INTERRUPTIONS]
        again = [r for r in runs if r.interruptions + 1 <= MAX_INTERRUPTIONS]

        def write(conn: sqlite3.Connection) -> None:
            for run in runs:
                if run.attempt:
                    store.finish_attempt(conn, run.id, run.attempt, "INTERRUPTED", now, error)
            for run in again:
                store.set_status(
                    conn,
                    run.id,
                    RunStatus.QUEUED,
                    now,
                    Snapshot.QUEUED,
                    attempt=run.attempt,
                    description="requeued after a daemon restart",
                    interruptions=run.interruptions + 1,
                    ready_at=None,
                )
            for run in failed:
                store.finish_run(
                    conn,
                    self.blobs,
                    run.id,
                    RunStatus.SYSTEM_FAILURE,
                    now,
                    error=error,
                    attempt=run.attempt,
                    description=f"interrupted {MAX_INTERRUPTIONS} times",
                )

        await self.db.write(write)
        for run in again:
            run.interruptions += 1
            run.status = RunStatus.QUEUED
            run.ready_at = None
            run.hold = None
            self.dispatch.admit(run, now)
        for run in failed:
            self.lifecycle.forget(run, RunStatus.SYSTEM_FAILURE, error)

    async def close(self) -> None:
        """Stop timers; queued and executing runs stay in the table for the next start."""
        await self.bulk.close()
        await self.alerts.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.ctx.checkpointer is not None:
            await self.ctx.checkpointer.close()
        for run in self.active.values():
            for handle in run.timers:
                handle.cancel()
        self.attempts.flush_logs()

    # -- what spans parts ---------------------------------------------------------------

    async def add_version(self, info: VersionInfo, code_dir: str, promote: bool) -> VersionInfo:
        """Record a registered version and, when ``promote``, make it current.

        Runs waiting for a version with their task start once it is current.
        """
        added = await self.registry.add_version(info, code_dir, promote)
        if added.is_current:
            await self.dispatch.retry_pending_version(info.env)
        return added

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version the current one of its environment."""
        promoted = await self.registry.promote(env, version_id)
        await self.dispatch.retry_pending_version(env)
        return promoted

    async def pause_queue(self, env: str, name: str, paused: bool) -> None:
        """Stop (or resume) starting runs of a queue; executing runs carry on.

        Raises:
            NotFound: no such queue.
        """
        await self.registry.pause_queue(env, name, paused)
        self.dispatch.schedule_pump()

    async def override_queue_limit(
        self, env: str, name: str, limit: int | None, reset: bool
    ) -> None:
        """Override a queue's concurrency limit (None: unlimited), or go back to the code's.

        Raises:
            NotFound: no such queue.
            BadRequest: the limit is below 1.
        """
        await self.registry.override_queue_limit(env, name, limit, reset)
        self.dispatch.schedule_pump()

    async def replay(
        self,
        env: str,
        run_id: str,
        version: str | None,
        *,
        payload: bytes | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TriggerResponse:
        """Trigger a new run with the payload, tags and metadata of another, or new ones.

        A new payload is checked against the task's schema like any trigger's.

        Raises:
            NotFound: no such run.
            BadRequest: the new payload does not match the task's schema.
        """
        run = await self.actions.get_run(run_id)
        options = TriggerOptions(
            tags=run.tags if tags is None else tags,
            metadata=run.metadata if metadata is None else metadata,
            version=version,
            concurrency_key=run.concurrency_key,
        )
        raw = run.payload if payload is None else msgspec.Raw(payload)
        item = BatchItem(task=run.task_id, payload=raw, options=options)
        _, responses = await self.admission.trigger(run.env, [item])
        response = responses[0]
        await self.db.write(lambda conn: store.set_replayed_from(conn, response.id, run_id))
        replayed = self.active.get(response.id)
        if replayed is not None:
            replayed.replayed_from = run_id
        return response

    def stats(self) -> dict[str, int]:
        """Counts for health and the dashboard."""
        waiting = sum(1 for run in self.active.values() if run.status is RunStatus.WAITING)
        return {
            "active": len(self.active),
            "executing": self.dispatch.busy,
            "queued": self.queue.size,
            "waiting": waiting,
        }
