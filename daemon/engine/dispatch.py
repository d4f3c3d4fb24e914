"""Dispatch: runs waiting to start, and their start on a run process.

A run is admitted to where it waits (the queue, a delay or TTL timer, the list of runs
whose task no version has yet); DELAYED runs due beyond a horizon stay in the table alone
until it nears. The pump takes queued runs in lane order while the daemon has room, and
gives each a process of its version (an idle one, or one spawned for it), resuming a held
run in its parked or restored process where it has one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections import deque

import msgspec

from ember._errors import EmberError
from ember._runtime import Context
from ember._types import RetryOptions, RunError, RunStatus
from ember.daemon.engine import machines
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.debounce import Debouncer
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.engine.registry import Registry
from ember.daemon.engine.waits import Waitpoints
from ember.daemon.model import ActiveRun, Hold, Snapshot, Worker
from ember.daemon.procs.protocol import Execute
from ember.daemon.store import runs as store
from ember.daemon.store.traces import execute_traceparent

log = logging.getLogger("ember.daemon")

_json = msgspec.json.Encoder()
# The statuses of a run that has not started: it waits in the queue, a timer or the list.
QUEUE_WAITING = (RunStatus.QUEUED, RunStatus.DELAYED, RunStatus.PENDING_VERSION)


class Dispatch(EnginePart):
    """The queue's pump, the timers of runs not yet started, and placement on processes.

    Args:
        ctx: the engine's shared state.
        lifecycle: where runs change state.
        registry: the versions runs are placed on.
        waits: the waitpoints (a re-execution reads its journal).
        debounced: the debouncer (a delay that elapses ends a debounce window).
    """

    def __init__(
        self,
        ctx: EngineContext,
        lifecycle: Lifecycle,
        registry: Registry,
        waits: Waitpoints,
        debounced: Debouncer,
    ) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.active = lifecycle.active
        self.registry = registry
        self.waits = waits
        self.debounced = debounced
        # Runs holding a slot (dequeued or executing): at most max_concurrent_runs.
        self.busy = 0
        # Runs holding a slot that wait for a process, per (env, version, machine preset).
        self._awaiting: dict[tuple[str, str, str], deque[ActiveRun]] = {}
        self._pending_version: dict[str, ActiveRun] = {}
        self._pump_scheduled = False
        self._rate_wake: asyncio.TimerHandle | None = None
        self._rate_wake_at = math.inf

    def admit(self, run: ActiveRun, now: float) -> None:
        """Put a recovered or new run where it belongs: queue, timer or pending list."""
        loop = asyncio.get_running_loop()
        if run.expires_at is not None and run.attempt == 0:
            run.timers.append(loop.call_later(max(0.0, run.expires_at - now), self._expire, run))
        if run.status is RunStatus.DELAYED:
            when = run.delay_until or now
            run.timers.append(loop.call_later(max(0.0, when - now), self._undelay, run))
        elif run.status is RunStatus.PENDING_VERSION:
            self._pending_version[run.id] = run
        elif run.status is RunStatus.QUEUED:
            if run.ready_at is not None and run.ready_at > now:
                run.timers.append(
                    loop.call_later(run.ready_at - now, self.enqueue, run, run.ready_at)
                )
            else:
                self.enqueue(run, run.ready_at or run.created_at)

    def enqueue(self, run: ActiveRun, queued_at: float) -> None:
        if run.status is not RunStatus.QUEUED:
            return
        self.queue.push(run, queued_at)
        self.schedule_pump()

    def delay_moved(self, run: ActiveRun) -> None:
        """A DELAYED run's start moved: re-arm its timers (not yet admitted: nothing to do)."""
        if self.active.get(run.id) is run and run.status is RunStatus.DELAYED:
            self.leave_waiting(run)
            self.admit(run, self.clock())

    def _undelay(self, run: ActiveRun) -> None:
        if run.status is not RunStatus.DELAYED:
            return
        self.debounced.forget(run)
        now = self.clock()
        run.status = RunStatus.QUEUED
        self.db.write(
            lambda conn: store.set_status(
                conn, run.id, RunStatus.QUEUED, now, Snapshot.QUEUED, description="delay elapsed"
            )
        ).add_done_callback(lambda _: self.lifecycle.publish(run))
        self.enqueue(run, run.delay_until or now)

    def _expire(self, run: ActiveRun) -> None:
        if run.status not in QUEUE_WAITING or run.attempt != 0:
            return
        self.leave_waiting(run)
        self.lifecycle.finish(
            run,
            RunStatus.EXPIRED,
            error=RunError(
                name="RunExpired",
                message="the run did not start before its TTL elapsed",
                code="TTL_EXPIRED",
            ),
        )

    def leave_waiting(self, run: ActiveRun) -> None:
        """Take a run that has not started out of the queue, timers and pending list."""
        if run.status is RunStatus.QUEUED:
            self.queue.discard(run)
        self._pending_version.pop(run.id, None)
        for handle in run.timers:
            handle.cancel()
        run.timers.clear()

    async def retry_pending_version(self, env: str) -> None:
        now = self.clock()
        ready = []
        for run in list(self._pending_version.values()):
            if run.env != env:
                continue
            version = run.pinned_version or self.registry.current.get(env)
            record = self.registry.versions.get((env, version)) if version else None
            task = record.tasks.get(run.task_id) if record else None
            if task is None:
                continue
            del self._pending_version[run.id]
            run.status = RunStatus.QUEUED
            if run.queue == f"task/{run.task_id}":
                run.queue = task.queue
            if run.max_attempts == RetryOptions().max_attempts:
                run.max_attempts = task.retry.max_attempts
            run.retry = task.retry
            ready.append(run)
        if not ready:
            return

        def write(conn: sqlite3.Connection) -> None:
            for run in ready:
                store.set_status(
                    conn,
                    run.id,
                    RunStatus.QUEUED,
                    now,
                    Snapshot.QUEUED,
                    description="a version with this task is available",
                    queue=run.queue,
                    retry=_json.encode(run.retry),
                    max_attempts=run.max_attempts,
                )

        await self.db.write(write)
        for run in ready:
            self.lifecycle.publish(run)
            self.enqueue(run, now)

    def schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Start queued runs while there is room, taking lanes in turn."""
        self._pump_scheduled = False
        if self.ctx.draining:
            return  # the runs stay queued, in the table too, for the next start
        now = self.clock()
        while self.busy < self.config.max_concurrent_runs:
            run = self.queue.pop(now)
            if run is None:
                break
            version = self.registry.target_version(run)
            record = self.registry.versions.get((run.env, version)) if version else None
            if record is None or run.task_id not in record.tasks:
                self.queue.release(run)
                self._to_pending_version(run)
                continue
            run.version = version
            run.status = RunStatus.DEQUEUED
            self.busy += 1
            assert version is not None
            if run.hold == Hold.PARKED and run.parked is not None:
                # (a process still reconnecting resumes it as it says hello)
                self.resume_parked_or_replay(run)
                continue
            if run.hold == Hold.CHECKPOINT and self.ctx.checkpointer is not None:
                self.ctx.spawn(self.ctx.checkpointer.restore(run))
                continue
            self.place(run)
        if self.queue.wake_at < self._rate_wake_at:
            self._arm_rate_wake(now)
        self.lifecycle.update_idle()

    def _arm_rate_wake(self, now: float) -> None:
        """Look at rate-limited lanes again when the first of their windows frees a place."""
        if self._rate_wake is not None:
            self._rate_wake.cancel()
        self._rate_wake_at = self.queue.wake_at
        self._rate_wake = asyncio.get_running_loop().call_later(
            max(0.0, self._rate_wake_at - now), self._on_rate_wake
        )

    def _on_rate_wake(self) -> None:
        self._rate_wake = None
        self._rate_wake_at = math.inf
        self.queue.unblock()
        self.schedule_pump()

    def place(self, run: ActiveRun) -> None:
        """Give a DEQUEUED run (its slot taken) a process of its version: idle, or new."""
        assert run.version is not None
        record = self.registry.versions[(run.env, run.version)]
        machine = machines.resolve(run, record.tasks.get(run.task_id))
        worker = self.ctx.supervisor.take_idle(run.env, run.version, machine)
        if worker is not None:
            self.start(run, worker)
            return
        self._awaiting.setdefault((run.env, run.version, machine), deque()).append(run)
        self.ctx.supervisor.spawn(run.env, run.version, record.code_dir, machine)

    def _to_pending_version(self, run: ActiveRun) -> None:
        now = self.clock()
        run.status = RunStatus.PENDING_VERSION
        self._pending_version[run.id] = run
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.PENDING_VERSION,
                now,
                Snapshot.QUEUED,
                description=f"version {self.registry.target_version(run)} does not have this task",
            )
        )
        self.lifecycle.publish(run)

    def on_worker_ready(self, worker: Worker) -> None:
        """A run process is connected and free: give it the next run waiting for one."""
        waiting = self._awaiting.get(worker.pool)
        while waiting:
            run = waiting.popleft()
            if run.status is RunStatus.DEQUEUED:
                self.start(run, worker)
                return
        self.ctx.supervisor.make_idle(worker)
        self.rebalance()

    def awaiting_count(self, key: tuple[str, str, str]) -> int:
        """Runs of a version and preset that hold a slot and wait for a run process."""
        waiting = self._awaiting.get(key)
        if not waiting:
            return 0
        while waiting and waiting[0].status is not RunStatus.DEQUEUED:
            waiting.popleft()
        return sum(1 for run in waiting if run.status is RunStatus.DEQUEUED)

    def take_awaiting(self, env: str, version: str) -> deque[ActiveRun]:
        """Take the runs waiting for a process of a version (its zygote could not start)."""
        waiting: deque[ActiveRun] = deque()
        for key in [k for k in self._awaiting if k[:2] == (env, version)]:
            waiting += self._awaiting.pop(key)
        return waiting

    def rebalance(self) -> None:
        """Runs of some version wait for a process: start what the cap allows."""
        for (env, version, machine), waiting in list(self._awaiting.items()):
            if waiting:
                code_dir = self.registry.versions[(env, version)].code_dir
                self.ctx.supervisor.spawn(env, version, code_dir, machine)

    def start(self, run: ActiveRun, worker: Worker, journal: bytes | None = None) -> None:
        if self.ctx.draining:
            # Dequeued before the drain began: the table still says QUEUED, so the next
            # start runs it; this process just idles until the daemon stops.
            self.ctx.supervisor.make_idle(worker)
            return
        # The first execution of a run has no journal; any later one may (replay, retry).
        needs_journal = journal is None and (run.attempt > 0 or run.hold is not None)
        if run.payload is None or needs_journal:
            self.ctx.spawn(self._load_and_start(run, worker, needs_journal))
            return
        now = self.clock()
        continuation = run.hold is not None
        # A replay after a wait: the run process fires on_resume when it reaches that wait.
        resumed_seq = run.resume[0] if continuation and run.resume is not None else 0
        if not continuation:
            run.attempt += 1
            run.executing_s = 0.0
        run.started_at = run.started_at or now
        self.lifecycle.bind(run, worker, now)
        if continuation:
            self.lifecycle.record_executing(run, now, "replaying from the journal in a new process")
        else:
            self.queue.started(run, now)  # the same instant the attempt row records
            self.db.write(lambda conn: store.start_attempt(conn, run, now, worker.pid))
        self.ctx.supervisor.prepare_successor(worker)
        context = Context(
            run_id=run.id,
            task_id=run.task_id,
            attempt=run.attempt,
            version=run.version or "",
            env=run.env,
            tags=run.tags,
            created_at=store.ts(run.created_at),
            parent_run_id=run.parent_run_id,
            root_run_id=run.root_run_id,
            batch_id=run.batch_id,
            replayed_from=run.replayed_from,
            metadata=run.metadata,
        )
        worker.send(
            Execute(
                run_id=run.id,
                attempt=run.attempt,
                task_id=run.task_id,
                payload=run.payload,
                context=_json.encode(context),
                generation=run.generation,
                journal=journal or b"[]",
                last_attempt=run.attempt - run.interruptions >= run.max_attempts,
                retry_delay_s=run.retry.delay_s(run.attempt - run.interruptions),
                resumed_seq=resumed_seq,
                traceparent=execute_traceparent(run) if self.config.tracing else "",
            )
        )
        self.lifecycle.publish(run)

    async def _load_and_start(self, run: ActiveRun, worker: Worker, needs_journal: bool) -> None:
        journal = None
        try:
            if run.payload is None:
                run.payload = await self.db.read(
                    lambda conn: store.get_payload(conn, self.blobs, run.id)
                )
            journal = await self.waits.journal(run) if needs_journal else b"[]"
        except Exception as exc:  # the row or blob vanished: nothing to execute
            log.exception("cannot load the payload of %s", run.id)
            self.busy -= 1
            self.queue.release(run)
            self.ctx.supervisor.make_idle(worker)
            self.lifecycle.finish(run, RunStatus.SYSTEM_FAILURE, error=_system_error(exc))
            return
        if run.status is RunStatus.DEQUEUED:
            self.start(run, worker, journal)
        else:
            self.ctx.supervisor.make_idle(worker)

    def release_slot(self, run: ActiveRun) -> None:
        self.busy -= 1
        self.queue.release(run)
        run.worker = None
        self.schedule_pump()

    def _resume_parked(self, run: ActiveRun) -> None:
        worker = run.parked
        assert worker is not None
        run.parked = None
        worker.parked = None
        self.lifecycle.resume_on(run, worker, "resumed in its parked process")

    def resume_parked_or_replay(self, run: ActiveRun) -> None:
        """Resume a run whose dump failed: in its parked process, else by replay."""
        worker = run.parked
        if worker is not None and not worker.gone:
            if worker.transport is not None:
                self._resume_parked(run)
            # else: it is reconnecting; on_worker_back resumes it
            return
        self.lifecycle.replay_instead(run)
        self.place(run)


def _system_error(exc: BaseException) -> RunError:
    message = str(exc) if isinstance(exc, EmberError) else f"{type(exc).__name__}: {exc}"
    return RunError(name="SystemFailure", message=message, code="SYSTEM_FAILURE")
