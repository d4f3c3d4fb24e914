"""How run processes end: signals and kills, and the engine told once one is really gone.

A run's next attempt may start once the engine hears its process is gone, so it hears only
when the process is dead (its pidfd polls readable), with the reason its zygote reported.
A starting daemon also ends the processes an earlier daemon left (:func:`outlive_predecessors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from ember.daemon.model import VersionKey, Worker
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorPart
from ember.daemon.procs.supervisor.isolation import Isolation

log = logging.getLogger("ember.daemon")

# After a run process's channel closes, wait this long for its exit status before reporting
# it gone, so the reason says "killed by SIGKILL" rather than "closed its channel".
_EXIT_STATUS_WAIT_S = 0.5
# A process sent SIGKILL is gone within milliseconds; past this, the engine is told anyway
# (one stuck in the kernel runs no more code of its task).
_DEATH_WAIT_S = 10.0
# How long a starting daemon waits for an earlier daemon's processes to exit on their own
# (they notice within milliseconds) before it kills them.
_PREDECESSOR_WAIT_S = 5.0


class Exits(SupervisorPart):
    """Ends run processes and reports each one gone, once.

    Args:
        ctx: the supervisor's shared state.
        isolation: whose cgroups are read and removed when a process is gone.
        stop_if_unused: stops the version's zygote if no process or run needs it now.
    """

    def __init__(
        self,
        ctx: SupervisorContext,
        isolation: Isolation,
        stop_if_unused: Callable[[VersionKey], None],
    ) -> None:
        super().__init__(ctx)
        self._isolation = isolation
        self._stop_if_unused = stop_if_unused

    def terminate(self, worker: Worker, grace_s: float) -> None:
        """SIGTERM a run process, and SIGKILL it if it is still there after ``grace_s``."""
        worker.retiring = True
        self.send_signal(worker, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace_s, self.kill, worker)

    def kill(self, worker: Worker) -> None:
        """SIGKILL a run process with everything it started."""
        worker.retiring = True
        self._kill_tree(worker)

    def send_signal(self, worker: Worker, signum: int) -> None:
        """Send the process a signal (through its pidfd once it said hello)."""
        if worker.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(worker.pidfd, signum)
        elif worker.pid is not None and not worker.gone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _kill_tree(self, worker: Worker) -> None:
        """SIGKILL the process, its process group and its descendants.

        With a PID namespace, killing its init ends every process in it. Without, the run
        process is a subreaper that leads its own group: while it lives, everything its
        task forked is in its tree. (Once it is dead, its zygote kills its orphans.)
        """
        if worker.pid is None or (worker.pidfd is not None and _exited(worker.pidfd)):
            return
        descendants = _descendants(worker.pid)
        if worker.pidfd is not None:
            # Alive, so its PID (its group's id) is still its own.
            with contextlib.suppress(OSError):
                os.killpg(worker.pid, signal.SIGKILL)
        self.send_signal(worker, signal.SIGKILL)
        for pid in descendants:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def collect(self, worker: Worker) -> None:
        """A restored process (the daemon's own child) exited."""
        if worker.transport is not None:
            worker.transport.close()
        else:
            self.gone(worker)

    def on_channel_closed(self, worker: Worker) -> None:
        """The process's worker channel closed: on purpose for a dump, or it is ending."""
        worker.transport = None
        if worker.checkpointing is not None:
            # It closed its channel on purpose: ready to be dumped.
            if not worker.checkpointing.done():
                worker.checkpointing.set_result(None)
            return
        if worker.exit_reason is None:
            # Make sure it is gone, then wait briefly for the zygote's exit status.
            self.send_signal(worker, signal.SIGKILL)
            asyncio.get_running_loop().call_later(_EXIT_STATUS_WAIT_S, self.gone, worker)
        else:
            self.gone(worker)

    def gone(self, worker: Worker) -> None:
        """The process exited or its channel closed: report it once it is dead."""
        if worker.gone or worker.id not in self.workers:
            return
        if worker.transport is not None:
            # The exit status came first: the channel's close follows and finishes the job.
            # What the process wrote before it exited (its last spans and log lines) may
            # still wait in the socket, unread: a close would drop it.
            drain(worker.transport)
            worker.transport.close()
            return
        worker.gone = True
        self.workers.pop(worker.id, None)
        idle = self.idle.get(worker.pool)
        if idle and worker in idle:
            idle.remove(worker)
        # Its run's next attempt may start once the engine hears of this: the process must
        # be dead first, or two attempts of the run could execute at once.
        self._kill_tree(worker)
        pidfd, worker.pidfd = worker.pidfd, None
        if pidfd is None or _exited(pidfd):
            if pidfd is not None:
                os.close(pidfd)
            self._report_gone(worker)
            return
        loop = asyncio.get_running_loop()

        def dead(late: bool) -> None:
            loop.remove_reader(pidfd)
            timer.cancel()
            os.close(pidfd)
            if late:
                log.warning("run process %s outlived SIGKILL by %ss", worker.pid, _DEATH_WAIT_S)
            self._report_gone(worker)

        loop.add_reader(pidfd, dead, False)
        timer = loop.call_later(_DEATH_WAIT_S, dead, True)

    def _report_gone(self, worker: Worker) -> None:
        self._isolation.drop(worker)  # (dead by now: what its cgroup counted is final)
        reason = worker.exit_reason or "closed its channel"
        if worker.fault is not None:
            reason = f"{reason}: the daemon ended it because {worker.fault}"
        self.engine.on_worker_gone(worker, reason)
        self._stop_if_unused(worker.key)
        self.engine.rebalance()


async def outlive_predecessors(path: Path) -> None:
    """Wait until no process of an earlier daemon holds ``path``; kill those that linger.

    Recovery turns the runs they executed into new attempts: an old process still
    running would be a second attempt at the same time.
    """
    with open(path, "a") as lock:  # noqa: ASYNC230 - a local file, opened once at start
        for round_ in range(2):
            deadline = time.monotonic() + _PREDECESSOR_WAIT_S
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await asyncio.sleep(0.02)
                    continue
                fcntl.flock(lock, fcntl.LOCK_UN)
                return
            killed = _kill_holders(path)
            log.warning("killed %d process(es) an earlier daemon left running", killed)
            if round_:
                log.error("processes of an earlier daemon hold %s still", path)


def _kill_holders(path: Path) -> int:
    """SIGKILL every process (but this one) that has ``path`` open; return how many."""
    target = str(path.resolve())
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def drain(transport: asyncio.Transport) -> None:
    """Hand the protocol what is readable on the transport's socket now, up to its end."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return
    protocol = transport.get_protocol()
    assert isinstance(protocol, asyncio.Protocol)
    while True:
        try:
            data = os.read(sock.fileno(), 256 * 1024)  # (non-blocking: the loop's socket)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if not data or transport.is_closing():
            return
        protocol.data_received(data)


# Whether this kernel lists each thread's children (CONFIG_PROC_CHILDREN).
_CHILDREN_LISTED = Path(f"/proc/self/task/{os.getpid()}/children").exists()


def _descendants(pid: int) -> list[int]:
    """The PIDs below ``pid`` now: its children, theirs, and so on.

    Read from each thread's ``children`` list, one small read per process of the tree.
    psutil's walk reads every process of the host for its parent instead, 47 ms with 2,000
    processes (``bench/descendants_bench.py``): a burst of 1,000 run processes ending paid it
    on the loop 1,000 times.
    """
    if not _CHILDREN_LISTED:
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        return []
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # (it exited meanwhile)
        for thread in threads:
            try:
                children = Path(f"/proc/{parent}/task/{thread}/children").read_text().split()
            except OSError:
                continue
            found.extend(map(int, children))
            todo.extend(map(int, children))
    return found


def _exited(pidfd: int) -> bool:
    """Whether the process behind a pidfd has exited (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def close_pidfd(worker: Worker) -> None:
    """Close the process's pidfd, if it has one."""
    if worker.pidfd is not None:
        os.close(worker.pidfd)
        worker.pidfd = None


def describe_exit(status: int) -> str:
    """A process exit status in words."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"
