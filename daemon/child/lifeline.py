"""What ties a run process's life to its daemon: parent-death signals, reaping, identities.

The invariant this serves: at most one attempt of a run executes at any moment. A run
process must never outlive the process that owns it (the zygote, or the parent of its PID
namespace), nor keep going once its daemon is gone, and whatever a task forks must not
outlive the attempt that forked it. Linux only, as the rest of the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed: {os.strerror(errno)}")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies.

    The caller checks afterwards that the parent is still the one it forked from: a parent
    that died before this call sends no signal.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Adopt orphaned descendants, so that what a task forks stays in this process's tree."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def children() -> list[int]:
    """This process's children (host PIDs: /proc is the host's), zombies included."""
    found: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(pid) for pid in (task / "children").read_text().split())
    return found


def kill_descendants() -> int:
    """SIGKILL every descendant of this process and reap them; return how many were found.

    As a subreaper (or as PID 1 of its namespace) this process adopts the children of each
    descendant it kills, so the loop ends once no child is left at all.
    """
    killed = 0
    while True:
        pids = children()
        if not pids:
            return killed
        killed += len(pids)
        if os.getpid() == 1:
            # PID 1 of its own namespace: -1 reaches every other process in it, and only those.
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            # Killed children exit at once; block for one, then look again.
            os.waitpid(-1, 0)
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            pass  # reaped meanwhile (by a child watcher thread, say)


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process named so that a later process given the same PID is not mistaken for it."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the process with this (host) PID now, or None if there is none."""
        ticks = _start_ticks(pid)
        return None if ticks is None else cls(pid, ticks)

    def alive(self) -> bool:
        """Whether this very process still exists (and is not a zombie)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(") ", 1)[1].split()
        return fields[0] != "Z" and int(fields[19]) == self.start_ticks

    def encode(self) -> str:
        """As a command-line argument."""
        return f"{self.pid}:{self.start_ticks}"

    @classmethod
    def decode(cls, text: str) -> ProcessIdentity:
        """From :meth:`encode`'s form."""
        pid, ticks = text.split(":")
        return cls(int(pid), int(ticks))


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (start time); fields after the parenthesized command name start at field 3.
    return int(stat.rsplit(") ", 1)[1].split()[19])
