"""Restoring a run's process: ``criu restore`` brings it back, SIGUSR1 wakes it, it reconnects.

``criu restore -d -S`` brings the process back as a child of the daemon, in its own PID
namespace (run processes are PID 1 there, so a restore never collides with a PID taken
meanwhile); SIGUSR1 wakes it and it reconnects with its old worker id and token. An image is
restored at most once: every restore (ahead of the deadline or at it) goes through one
registry here, and the run's state is checked again once a slot is free. When a restore
fails, the run re-executes from its journal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from ember._types import RunStatus
from ember.daemon.model import Hold, Snapshot
from ember.daemon.procs.checkpoint.context import CheckpointContext, CheckpointPart
from ember.daemon.procs.checkpoint.criu import restore_args
from ember.daemon.procs.checkpoint.dumps import Dumps
from ember.daemon.procs.checkpoint.manifest import MANIFEST_FILE, mismatch

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Worker

log = logging.getLogger("ember.daemon")


class Restores(CheckpointPart):
    """The restores of checkpointed runs, as many at a time as there are cores.

    Args:
        ctx: what the checkpointer's parts share.
        dumps: the dumps under way (a run's restore waits for its dump to end).
    """

    def __init__(self, ctx: CheckpointContext, dumps: Dumps) -> None:
        super().__init__(ctx)
        self._times = ctx.restore_times
        self._timeout_s = ctx.config.criu_restore_timeout_s
        self._dumps = dumps
        self._parallel = ctx.restore_parallel
        self._slots = asyncio.Semaphore(self._parallel)
        self._sweeping = asyncio.Lock()
        # The one registry of restores: whoever registers a run first restores its image;
        # anyone else (the deadline, an early restore) waits for that restore to end.
        self._restoring: dict[str, asyncio.Future[None]] = {}
        # Restored processes alive now (the daemon's children): never taken for strays.
        self._restored_pids: set[int] = set()

    def under_way(self, run: ActiveRun) -> bool:
        """A restore of the run's image is under way."""
        return run.id in self._restoring

    async def slot_free(self) -> None:
        """Return once a restore slot is free (the pace of restores ahead)."""
        await self._slots.acquire()
        self._slots.release()

    async def restore(self, run: ActiveRun) -> None:
        """Its wait is over: bring a checkpointed run's process back and resume it there.

        The process may be back already (restored ahead of the deadline), or its dump may
        have failed (it stayed parked); a failed restore makes the run replay.
        """
        await self.restore_once(run)
        # Unless the restored process resumed it already, or _fail placed it to replay:
        if run.status is RunStatus.DEQUEUED and run.hold != Hold.EXITED:
            self._engine.resume_parked_or_replay(run)

    async def restore_once(self, run: ActiveRun) -> None:
        """Restore the run's image, unless another restore of it is under way or done."""
        under_way = self._restoring.get(run.id)
        if under_way is not None:
            await asyncio.shield(under_way)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._restoring[run.id] = done
        failed: str | None = None
        criu_ran = False
        try:
            pending = self._dumps.pending(run.id)
            if pending is not None:
                # A dump still waiting for a slot is not needed now (the process stays).
                self._dumps.call_off(run.id)
                await asyncio.shield(pending)  # (outside a slot: the dump needs one)
            # A run whose process was never dumped (or is back) queues for no restore slot:
            # behind a burst's restores, such runs waited seconds for nothing.
            if self._needs_restore(run):
                async with self._slots:
                    # Checked again now that a slot is ours: meanwhile the run may have been
                    # canceled or finished, its dump may have failed (it stays parked), or
                    # its process may be back already.
                    if self._needs_restore(run):
                        failed, criu_ran = await self._bring_back(run)
        except Exception as exc:  # its image vanished meanwhile, say: the run replays
            log.exception("restoring run %s failed", run.id)
            failed = f"{type(exc).__name__}: {exc}"
        finally:
            self._restoring.pop(run.id, None)
            done.set_result(None)
        if failed is not None:
            if criu_ran:
                await self._sweep_strays()
            self._fail(run, failed)

    def _needs_restore(self, run: ActiveRun) -> bool:
        """The run is still held by its image alone."""
        return (
            self._engine.active.get(run.id) is run
            and run.hold == Hold.CHECKPOINT
            and run.parked is None
        )

    async def _bring_back(self, run: ActiveRun) -> tuple[str | None, bool]:
        """Restore the run's process (a slot is held): (why it failed or None, criu ran)."""
        from ember.daemon.model import Worker

        # The whole time the slot is held counts, not criu's alone: the plan paces restores by
        # it (timing criu and the pages only, a burst of 680 restores ended 10 s late).
        began = time.perf_counter()
        images = self._images.folder(run)
        try:
            meta = json.loads((images / "meta.json").read_text())
            manifest = json.loads((images / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            return f"its image is unreadable ({exc})", False
        refused = await asyncio.to_thread(mismatch, manifest, self._criu_version)
        if refused is not None:
            return f"its image does not fit this machine: {refused}", False
        _kill_earlier_copy(images)
        worker = Worker(meta["worker_id"], (meta["env"], meta["version"]), meta["token"])
        worker.machine = run.machine or worker.machine  # restored into its preset's cgroup
        worker.parked = run
        worker.checkpointing = asyncio.get_running_loop().create_future()
        self._supervisor.adopt(worker)
        run.parked = worker
        pidfile = images / "pidfile"
        pidfile.unlink(missing_ok=True)
        try:
            unpacked = await self._pages.unpack(images, worker.id)
        except (OSError, ValueError, zstandard.ZstdError) as exc:
            self._supervisor.forget(worker)
            run.parked = None
            return f"its pages cannot be read ({exc})", False
        error, restore_ms = await self._criu.run(
            restore_args(images) + self._supervisor.criu_cgroup_args(worker),
            images,
            "restore.log",
            self._timeout_s,
        )
        for file in unpacked:  # (criu has read them; the delta stays until the run reports)
            file.unlink(missing_ok=True)
        pid = 0
        if error is None:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError) as exc:
                error = f"criu restore left no pid ({exc})"
        if error is not None:
            self._supervisor.forget(worker)
            run.parked = None
            return error, True
        self._times.add(time.perf_counter() - began)
        self._restored_pids.add(pid)
        # Kept until the resumed run reports back (ImageStore.reported): if the daemon dies first,
        # the next one restores it again. _kill_earlier_copy makes sure only one copy lives.
        self._images.keep(worker, run)
        (images / "restored").write_text(f"{pid} {_start_time(pid)}")
        worker.pid = pid
        self._reap_later(pid, worker)
        os.kill(pid, signal.SIGUSR1)
        self._engine.note(
            run, Snapshot.PENDING_EXECUTING, f"restored its process in {restore_ms:.0f} ms"
        )
        return None, True

    async def _sweep_strays(self) -> None:
        """Kill and reap what failed restores left: the half-restored process tree, zombies.

        ``criu restore -S`` makes the restored process the daemon's child, in a PID
        namespace of its own. Once every slot is ours no restore is under way, so such a
        child that no restored run process owns was left by a failed one: SIGKILL to a
        namespace's init ends the whole namespace.
        """
        async with self._sweeping:
            taken = 0
            try:
                for _ in range(self._parallel):
                    await self._slots.acquire()
                    taken += 1
                for pid in _namespace_children(exclude=self._restored_pids):
                    log.warning("killing process %d, left by a failed restore", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        await asyncio.to_thread(os.waitpid, pid, 0)
            finally:
                for _ in range(taken):
                    self._slots.release()

    def _fail(self, run: ActiveRun, reason: str) -> None:
        log.warning("restoring run %s failed (%s); it re-executes from its journal", run.id, reason)
        self._engine.note(
            run,
            Snapshot.PENDING_EXECUTING,
            f"its checkpoint was not restored: {reason}; it replays from its journal",
        )
        self._images.discard(run)
        self._engine.replay_instead(run)
        if run.status is RunStatus.DEQUEUED:
            self._engine.place(run)
        # (else it was being restored ahead of its deadline: it replays when its wait ends)

    def _reap_later(self, pid: int, worker: Worker) -> None:
        """A restored process is the daemon's child: collect its exit through a pidfd."""
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self._restored_pids.discard(pid)
            return

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                from ember.daemon.procs.supervisor import describe_exit

                worker.exit_reason = describe_exit(os.waitstatus_to_exitcode(status))
            self._restored_pids.discard(pid)
            self._pages.forget_worker(worker.id)
            self._supervisor.collect(worker)

        loop.add_reader(fd, exited)


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot): a PID with a birth date."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _kill_earlier_copy(images: Path) -> None:
    """Kill a process restored from this image by a daemon that died before it reported.

    Two live copies of one run must never exist; the PID alone could be another process
    by now, so its start time must match too.
    """
    try:
        pid_text, started = (images / "restored").read_text().split()
    except (OSError, ValueError):
        return
    pid = int(pid_text)
    if started and _start_time(pid) == started:
        log.warning("killing process %d, an earlier restore of %s", pid, images.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _namespace_children(exclude: set[int]) -> list[int]:
    """The daemon's children that are the init of a PID namespace, minus ``exclude``."""
    me = os.getpid()
    children: set[int] = set()
    for task in os.listdir(f"/proc/{me}/task"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(f"/proc/{me}/task/{task}/children").read_text()
            children.update(int(pid) for pid in text.split())
    found = []
    for pid in sorted(children - exclude):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                levels = line.split()[1:]
                if len(levels) >= 2 and levels[-1] == "1":
                    found.append(pid)
    return found
