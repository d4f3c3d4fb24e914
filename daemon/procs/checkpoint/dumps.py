"""Dumping a run's process: it parks, criu dumps it, its pages are packed; else it stays parked.

The run process closes every socket and parks on SIGUSR1 (``Suspend``); criu dumps it with
``--tcp-close`` into a 0700 folder (which kills it) and the daemon frees everything it held.
When a dump fails, CRIU leaves the process running: it is tried once more, then the process is
woken and simply stays parked (or, past ``max_parked_processes``, the run replays instead). A
process is held the same way, never dumped, when the restore plan could not bring its image
back before its deadline: decided before the process is even asked to get ready (a burst of
1,000 waits otherwise had every process collect its garbage and close its sockets, then 900
of them reconnect), and again when a slot is free; a dump still queued for a slot when the
wait ends is called off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ember._types import RunStatus
from ember.daemon.model import Hold, Snapshot
from ember.daemon.procs.checkpoint.context import CheckpointContext, CheckpointPart
from ember.daemon.procs.checkpoint.criu import DUMP_TIMEOUT_S, dump_args
from ember.daemon.procs.checkpoint.images import write_private
from ember.daemon.procs.checkpoint.manifest import MANIFEST_FILE, record
from ember.daemon.procs.checkpoint.plan import CALIBRATED_AFTER, SAFETY
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Worker

log = logging.getLogger("ember.daemon")

READY_TIMEOUT_S = 20.0
# What _run answers when the run's wait is over, or its image could not be back in time.
NOT_NEEDED = "no dump needed: its wait is over, or its restore could not be in time"
# A failed dump is tried again after this (its cause may pass: a process fd not there yet).
DUMP_RETRY_DELAY_S = 0.2


class Dumps(CheckpointPart):
    """The checkpoints being taken, as many dumps at a time as there are cores.

    Args:
        ctx: what the checkpointer's parts share.
    """

    def __init__(self, ctx: CheckpointContext) -> None:
        super().__init__(ctx)
        self._times = ctx.dump_times
        self._counters = ctx.counters
        self._max_parked = ctx.config.max_parked_processes
        self._parallel = ctx.dump_parallel
        self._slots = asyncio.Semaphore(self._parallel)
        # Whether an image due at a deadline, made so long from now, could be restored in time
        # (the restore plan's; set by the checkpointer).
        self.restorable: Callable[[float, float, Sequence[float]], bool] = (
            lambda deadline, lead_s, pending: True
        )
        # Runs whose dump was decided and is not done yet: run id → its wait's deadline.
        self._accepted: dict[str, float] = {}
        # The dumps under way, by run id: each resolves to whether it succeeded.
        self._pending: dict[str, asyncio.Future[bool]] = {}
        # Dumps waiting for a slot, by run id: resolving one calls it off.
        self._queued: dict[str, asyncio.Future[None]] = {}

    def pending(self, run_id: str) -> asyncio.Future[bool] | None:
        """The run's dump under way, if there is one (a restore waits for it to end)."""
        return self._pending.get(run_id)

    def call_off(self, run_id: str) -> None:
        """The run's wait is over: its dump, if it still waits for a slot, does not run."""
        queued = self._queued.get(run_id)
        if queued is not None and not queued.done():
            queued.set_result(None)

    async def _run(
        self, args: list[str], images: Path, log_name: str, run: ActiveRun | None = None
    ) -> tuple[str | None, float]:
        """Run criu in a slot; return (None on success else the reason, milliseconds taken).

        With ``run``, nothing runs if its wait is over before a slot is free (its dump is
        called off), or if the restore plan could not bring its image back before the
        deadline: when a burst's dumps take longer than its waits, dumping a process only to
        restore it late cost a dump and a restore for nothing, and the run resumed late.
        """
        if run is not None and not await self._slot_for(run):
            return NOT_NEEDED, 0.0
        if run is None:
            await self._slots.acquire()
        try:
            if run is not None and not self._worth_dumping(run):
                return NOT_NEEDED, 0.0
            error, elapsed_ms = await self._criu.run(args, images, log_name, DUMP_TIMEOUT_S)
        finally:
            self._slots.release()
        if error is None:
            self._times.add(elapsed_ms / 1000)
        return error, elapsed_ms

    async def _slot_for(self, run: ActiveRun) -> bool:
        """Take a dump slot for ``run``; False (none taken) if its dump is called off first."""
        if run.status is not RunStatus.WAITING:
            return False  # (over while the process got ready: called off before it queued)
        called_off: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued[run.id] = called_off
        slot = asyncio.ensure_future(self._slots.acquire())
        try:
            await asyncio.wait((slot, called_off), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # (the daemon stops)
            if slot.done() and not slot.cancelled():
                self._slots.release()
            raise
        finally:
            self._queued.pop(run.id, None)
            if not slot.done():
                slot.cancel()  # (a semaphore hands a slot it gave a canceled waiter on)
        got = slot.done() and not slot.cancelled()
        if got and called_off.done():
            self._slots.release()
            return False
        return got

    def _worth_dumping(self, run: ActiveRun, queued: int = 0) -> bool:
        """The run still waits, and its image could be restored before its deadline, made
        after ``queued`` dumps ahead of it, besides the images the other decided dumps make."""
        if run.status is not RunStatus.WAITING:
            return False
        wait = run.wait
        if wait is None or wait.resume_at is None or self._times.measured < CALIBRATED_AFTER:
            return True  # (a token or a child: no deadline; or no measured times to plan on)
        # (a queue ahead goes at the median's pace: its 90th percentile made a burst of 1,000
        # decline half its dumps that turned out to fit; the check when a slot is free holds)
        lead_s = queued / self._parallel * self._times.median() + self._times.estimate() * SAFETY
        others = [d for other, d in self._accepted.items() if other != run.id]
        return self.restorable(wait.resume_at, lead_s, others)

    async def checkpoint(self, run: ActiveRun, worker: Worker) -> bool:
        """Suspend the run's process and dump it; True if it was, else it is held by park or
        replay (undumped when its image could not be restored in time, before it is asked to
        get ready)."""
        if not self._worth_dumping(run, queued=len(self._accepted)):
            if run.status is RunStatus.WAITING:
                self._counters["dumps_declined"] += 1
                self._hold_undumped(run, worker, suspended=False)
            else:
                self._counters["dumps_not_needed"] += 1
                self._keep_parked(run)  # (its wait is over: the process, never told, resumes)
            return False
        if run.wait is not None and run.wait.resume_at is not None:
            self._accepted[run.id] = run.wait.resume_at
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[run.id] = done
        ok = False
        try:
            if not await self._suspend(run, worker, READY_TIMEOUT_S):
                log.warning("run %s did not get ready for its checkpoint; it stays parked", run.id)
                self._keep_parked(run)
                return False
            try:
                ok = await self._dump(run, worker)
            except Exception:
                # Whatever broke, the process still holds the run: it must not be left in limbo.
                log.exception("checkpoint of run %s failed; it stays parked", run.id)
                if worker.pid is not None:
                    _wake(worker.pid)  # ready for its dump, it waits for a wake-up to reconnect
                self._keep_parked(run)
                return False
            return ok
        finally:
            if not done.done():
                done.set_result(ok)
            self._pending.pop(run.id, None)
            self._accepted.pop(run.id, None)

    async def checkpoint_executing(
        self, run: ActiveRun, worker: Worker, ready_timeout_s: float = READY_TIMEOUT_S
    ) -> bool:
        """Dump a run that is executing (a shutdown drain's grace ran out); True on success.

        The process closes its channel between two steps of its event loop and parks; its
        task is frozen where it stands and carries on from there once restored.
        """
        if not await self._suspend(run, worker, ready_timeout_s):
            return False  # (its loop is busy in code that does not yield: it is interrupted)
        return await self._dump(run, worker, fall_back=False)  # (the drain interrupts it)

    async def _suspend(self, run: ActiveRun, worker: Worker, timeout_s: float) -> bool:
        """Ask the process to close its channels and park; False if not ready in time."""
        from ember.daemon.procs.protocol import Suspend

        worker.checkpointing = asyncio.get_running_loop().create_future()
        worker.send(Suspend(run_id=run.id))
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(worker.checkpointing)
        except TimeoutError:
            worker.checkpointing = None
            return False
        return True

    async def _dump(self, run: ActiveRun, worker: Worker, fall_back: bool = True) -> bool:
        """Dump a process ready for it (retried once); on failure the run falls back."""
        images = self._images.folder(run)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True, mode=0o700)
        self._images.root.chmod(0o700)
        assert worker.pid is not None
        try:
            # What it runs on, while it still runs: a restore elsewhere is refused.
            manifest = await asyncio.to_thread(record, worker.pid, self._criu_version)
        except OSError as exc:
            error: str | None = f"its interpreter and libraries cannot be read ({exc})"
            dump_ms = 0.0
        else:
            waiting = run if fall_back else None  # (the drain dumps runs that execute)
            error, dump_ms = await self._run(
                dump_args(worker.pid, images), images, "dump.log", waiting
            )
            if error is not None and error != NOT_NEEDED:
                # Some failures pass (one of 100 dumps: "Can't get proc fd"); CRIU left the
                # process as it was, parked with its channel closed, so it can go again.
                self._counters["dump_failures"] += 1
                log.warning("checkpoint of run %s failed (%s); retrying once", run.id, error)
                self._engine.note(run, Snapshot.SUSPENDED, f"checkpoint failed ({error}); retrying")
                await asyncio.sleep(DUMP_RETRY_DELAY_S)
                for stale in images.iterdir():
                    stale.unlink()
                error, dump_ms = await self._run(
                    dump_args(worker.pid, images), images, "dump.log", waiting
                )
                if error != NOT_NEEDED:
                    self._counters["dump_retries_ok" if error is None else "dump_failures"] += 1
        if error == NOT_NEEDED:
            shutil.rmtree(images, ignore_errors=True)
            if run.status is RunStatus.WAITING:
                self._counters["dumps_declined"] += 1
                self._hold_undumped(run, worker)
            else:
                self._counters["dumps_not_needed"] += 1
                _wake(worker.pid)  # it reconnects and resumes, never dumped
                self._keep_parked(run)
            return False
        if error is not None:
            shutil.rmtree(images, ignore_errors=True)
            if fall_back:
                self._fall_back(run, worker, error)
            else:
                log.warning("checkpoint of run %s failed (%s)", run.id, error)
                _wake(worker.pid)
                self._keep_parked(run)
            return False
        self._counters["dumps"] += 1
        zygote = worker.zygote.process.pid if worker.zygote is not None else None
        started = time.perf_counter()
        packed = await self._pages.pack(images, run.id, self._pages.lineage(worker.id, zygote))
        pack_ms = (time.perf_counter() - started) * 1000
        size = sum(f.stat().st_size for f in images.iterdir() if f.is_file()) + (
            packed.packed_bytes if packed else 0
        )
        write_private(images / MANIFEST_FILE, manifest)
        write_private(
            images / "meta.json",
            {
                "worker_id": worker.id,
                "token": worker.token,
                "env": worker.key[0],
                "version": worker.key[1],
                "dump_ms": dump_ms,
                "pack_ms": pack_ms,
                "bytes": size,
                "raw_page_bytes": packed.raw_bytes if packed else None,
            },
        )
        self._supervisor.forget(worker)
        worker.parked = None
        if run.parked is worker:
            run.parked = None
        how = (
            f" ({packed.raw_bytes / 1e6:.1f} MB of pages, {packed.literal_pages} not shared,"
            f" packed in {pack_ms:.0f} ms)"
            if packed
            else ""
        )
        self._engine.note(
            run, Snapshot.SUSPENDED, f"checkpointed: {size / 1e6:.2f} MB in {dump_ms:.0f} ms{how}"
        )
        return True

    def _fall_back(self, run: ActiveRun, worker: Worker, reason: str) -> None:
        """Its dump failed twice: the run is held by parking its process, else by replay."""
        how = self._hold_alive_or_replay(run, worker)
        self._counters[f"fallbacks_{how}"] += 1
        log.warning("checkpoint of run %s failed again (%s); held by %s", run.id, reason, how)
        self._engine.note(
            run, Snapshot.SUSPENDED, f"checkpoint failed again ({reason}); held by {how} instead"
        )

    def _hold_undumped(self, run: ActiveRun, worker: Worker, suspended: bool = True) -> None:
        """Its image could not be back before the deadline: hold it by park, else replay."""
        how = self._hold_alive_or_replay(run, worker, suspended)
        self._engine.note(
            run,
            Snapshot.SUSPENDED,
            f"not checkpointed: its restore could not be back before its deadline; held by {how}",
        )

    def _hold_alive_or_replay(self, run: ActiveRun, worker: Worker, suspended: bool = True) -> str:
        """Keep the undumped process parked, or past ``max_parked_processes`` let the run
        replay; which ("park" or "replay"). A ``suspended`` process is woken to reconnect;
        one never asked to get ready for its dump is still connected, parked as it is."""
        assert worker.pid is not None
        if self._supervisor.parked_count() <= self._max_parked:
            if suspended:
                _wake(worker.pid)  # (criu left it as it was, or never ran): it reconnects
            self._keep_parked(run)
            return "park"
        worker.parked = None
        self._supervisor.kill(worker)
        self._engine.replay_instead(run)
        return "replay"

    def _keep_parked(self, run: ActiveRun) -> None:
        """The process could not be dumped: it stays alive, holding the run."""
        run.hold = Hold.PARKED
        self._engine.db.write(lambda conn: store.set_hold(conn, run.id, Hold.PARKED))


def _wake(pid: int) -> None:
    """SIGUSR1 a parked process: it reconnects (restored, or never dumped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
