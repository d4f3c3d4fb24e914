"""Holds: a run that waits, how its process is held meanwhile, and how it resumes.

A short wait keeps its process and slot. A long one releases the slot and is held by the
daemon's strategy: CRIU (the process is dumped to an image and gone), park (the process
stays, idle) or replay (the process exits; the run re-executes from its journal). When the
wait completes the run is queued again and resumes where it is held.
"""

from __future__ import annotations

import asyncio

from ember._errors import EmberError
from ember._types import RunStatus
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.dispatch import Dispatch
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.engine.waits import NonDeterministic, Waitpoints
from ember.daemon.model import ActiveRun, Hold, Snapshot, WaitRecord, Worker
from ember.daemon.procs.protocol import Evict, Resume, Wait
from ember.daemon.store import runs as store


class Holds(EnginePart):
    """Waits of executing runs: registered, held, completed, dropped.

    Args:
        ctx: the engine's shared state.
        lifecycle: where runs change state.
        dispatch: where a resumed run is queued again.
        waits: the waitpoints.
    """

    def __init__(
        self, ctx: EngineContext, lifecycle: Lifecycle, dispatch: Dispatch, waits: Waitpoints
    ) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.active = lifecycle.active
        self.dispatch = dispatch
        self.waits = waits

    async def on_wait(self, worker: Worker, run: ActiveRun, message: Wait) -> None:
        """A run waits: answer at once if the wait is over, else hold it."""
        try:
            record, result = await self.waits.register(
                run, message.seq, message.kind, message.resume_at, message.targets, message.task_ids
            )
        except NonDeterministic as exc:
            worker.send(
                Resume(run_id=run.id, seq=message.seq, error=str(exc), nondeterministic=True)
            )
            return
        except EmberError as exc:
            worker.send(Resume(run_id=run.id, seq=message.seq, error=str(exc)))
            return
        if run.worker is not worker or run.status is not RunStatus.EXECUTING:
            return  # canceled or timed out meanwhile
        if result is not None:
            worker.send(Resume(run_id=run.id, seq=message.seq, result=result))
            return
        existing = self.waits.pending.get(record.id)
        if existing is not None:
            record = existing  # a re-execution waits on the wait already armed
        else:
            self.waits.arm(record)
        run.wait = record
        now = self.clock()
        threshold = self.config.wait_park_threshold_s
        remaining = (record.resume_at or now) - now
        if record.kind != "DATETIME" or remaining < threshold:
            # Like Trigger.dev, a short wait keeps its process and its slot; a wait on runs or
            # a token may be short too, so it is suspended only if it lasts (its snapshot delay).
            if record.kind != "DATETIME":
                asyncio.get_running_loop().call_later(
                    threshold, self._suspend_if_waiting, run, worker, record
                )
            self.db.write(
                lambda conn: store.set_status(
                    conn,
                    run.id,
                    RunStatus.EXECUTING,
                    now,
                    Snapshot.EXECUTING_WITH_WAITPOINTS,
                    attempt=run.attempt,
                    description=f"{record.kind} wait {record.seq}",
                )
            )
            return
        self._suspend(run, worker, record, now)

    def _suspend_if_waiting(self, run: ActiveRun, worker: Worker, record: WaitRecord) -> None:
        if run.wait is record and run.worker is worker and run.status is RunStatus.EXECUTING:
            self._suspend(run, worker, record, self.clock())

    def _suspend(self, run: ActiveRun, worker: Worker, record: WaitRecord, now: float) -> None:
        """Release the run's slot and hold it by the daemon's strategy while it waits."""
        run.executing_s += now - run.attempt_started
        worker.run = None
        self.dispatch.release_slot(run)
        run.status = RunStatus.WAITING
        parked = self.ctx.supervisor.parked_count()
        # (a process in a container parks: CRIU cannot dump it apart from its zygote's mounts)
        criu = self.ctx.strategy == "criu" and not worker.contained
        if criu and self.ctx.checkpointer is not None:
            run.hold = Hold.CHECKPOINT
            worker.parked = run
            run.parked = worker
            self.ctx.spawn(self.ctx.checkpointer.checkpoint(run, worker))
        elif (self.ctx.strategy == "park" or worker.contained) and (
            parked < self.config.max_parked_processes
        ):
            run.hold = Hold.PARKED
            worker.parked = run
            run.parked = worker
        else:
            run.hold = Hold.EXITED
            worker.send(Evict(run_id=run.id))
            self.ctx.supervisor.retire(worker)
        hold = run.hold
        executing_s = run.executing_s
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.WAITING,
                now,
                Snapshot.SUSPENDED,
                attempt=run.attempt,
                description=f"{record.kind} wait {record.seq}, held by {hold}",
                hold=hold,
                executing_s=executing_s,
            )
        )
        self.lifecycle.publish(run)

    def wait_completed(self, record: WaitRecord, result: bytes) -> None:
        """A wait is over: resume its run (its result is already in the journal)."""
        run = self.active.get(record.run_id)
        if run is None or run.generation != record.generation:
            return
        if run.wait is record:
            run.wait = None
        worker = run.worker
        if run.status is RunStatus.EXECUTING and worker is not None:
            worker.send(Resume(run_id=run.id, seq=record.seq, result=result))
            return
        if run.status is not RunStatus.WAITING:
            return  # between attempts: the next execution reads the journal
        now = self.clock()
        run.resume = (record.seq, result)
        run.status = RunStatus.QUEUED
        self.db.write(
            lambda conn: store.set_status(
                conn,
                run.id,
                RunStatus.QUEUED,
                now,
                Snapshot.QUEUED,
                attempt=run.attempt,
                description=f"wait {record.seq} completed; resuming",
            )
        )
        self.lifecycle.publish(run)
        self.dispatch.enqueue(run, now)

    def on_worker_back(self, worker: Worker) -> None:
        """A process reconnected after a checkpoint: resume its run, or keep it parked."""
        run = worker.parked
        if run is None or run.id not in self.active:
            self.ctx.supervisor.retire(worker)
            return
        if run.status is RunStatus.DEQUEUED and run.resume is not None:
            worker.parked = None
            run.parked = None
            # (a restored process has no zygote; one woken before its dump started was never
            # checkpointed: its wait was over first)
            how = (
                "restored from its checkpoint"
                if worker.zygote is None
                else "resumed in its process: the wait was over before its checkpoint began"
            )
            self.lifecycle.resume_on(run, worker, how)
            return
        if run.status is RunStatus.DEQUEUED and run.wait is None:
            # Checkpointed mid-execution by a shutdown drain, it carries on where it stood; or
            # its wait completed before a daemon crash lost the result: the process asks for its
            # pending waits again on hello, and the journal answers them.
            worker.parked = None
            run.parked = None
            now = self.clock()
            self.lifecycle.bind(run, worker, now)
            how = "restored from its checkpoint, no wait pending"
            self.lifecycle.record_executing(run, now, how)
            self.lifecycle.publish(run)
            return
        # Restored ahead of its deadline, or its dump failed: parked until the wait completes.
        run.hold = Hold.PARKED
        run.parked = worker

    def drop_hold(self, run: ActiveRun) -> None:
        """A waiting run is canceled: stop its wait and free what holds it."""
        if run.wait is not None:
            self.waits.disarm(run.wait)
            run.wait = None
        if run.parked is not None:
            worker = run.parked
            run.parked = None
            worker.parked = None
            self.ctx.supervisor.terminate(worker, self.config.cancel_grace_s)
        if self.ctx.checkpointer is not None:
            self.ctx.checkpointer.discard(run)  # (restored ahead, its image is kept until resumed)
        run.hold = None

    def process_lost(self, worker: Worker) -> None:
        """A run process is gone: a run it held while waiting resumes another way."""
        parked = worker.parked
        if parked is not None and parked.parked is worker:
            # A waiting run lost its process: it resumes by replaying its journal instead.
            worker.parked = None
            parked.parked = None
            checkpointer = self.ctx.checkpointer
            if checkpointer is not None and checkpointer.lost(worker, parked=True):
                # Restored ahead of its deadline, then lost: its image, kept, restores it again.
                parked.hold = Hold.CHECKPOINT
                if parked.status is RunStatus.DEQUEUED:
                    self.ctx.spawn(checkpointer.restore(parked))
            elif parked.hold == Hold.PARKED:
                parked.hold = Hold.EXITED
                self.db.write(lambda conn: store.set_hold(conn, parked.id, Hold.EXITED))
        elif self.ctx.checkpointer is not None:
            self.ctx.checkpointer.lost(worker, parked=False)  # (its run resumed there: image goes)
