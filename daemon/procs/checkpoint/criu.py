"""Running criu: its arguments for a dump and a restore, its errors, and what a killed one left.

The smoke test (:mod:`.support`) runs criu synchronously with :func:`run_sync`; the daemon runs
it from its event loop with :class:`Criu`, in a process group of its own so that a criu that
takes too long is killed with its helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# umount2's flag: detach now, finish when the mount is no longer busy.
_MNT_DETACH = 2

DUMP_TIMEOUT_S = 60.0


def dump_args(pid: int, images: Path) -> list[str]:
    """criu's arguments to dump a run process (the smoke test uses exactly these too)."""
    return ["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "--tcp-close"]


def restore_args(images: Path) -> list[str]:
    """criu's arguments to restore a run process as the caller's child, its PID in a file."""
    return [
        "restore",
        "-d",
        "-S",
        "-D",
        str(images),
        "-o",
        "restore.log",
        "--tcp-close",
        "--pidfile",
        str(images / "pidfile"),
    ]


def run_sync(binary: str, args: list[str], images: Path, log_name: str) -> None:
    """Run criu and wait for it (the smoke test's way).

    Raises:
        RuntimeError: criu failed; the message quotes its log.
    """
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(
            f"criu {args[0]} failed: {log_errors(images / log_name) or result.stderr.strip()}"
        )


def log_errors(log_file: Path) -> str:
    """The Error lines of a CRIU log, minus the harmless RLIMIT_NOFILE one."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line]
    return " | ".join(errors[-3:])


class Criu:
    """The criu binary that passed the smoke test, run from the event loop.

    Args:
        binary: its path.
    """

    def __init__(self, binary: str) -> None:
        self._binary = binary

    async def run(
        self, args: list[str], images: Path, log_name: str, timeout_s: float
    ) -> tuple[str | None, float]:
        """Run criu now; return (None on success else the reason, milliseconds taken)."""
        started = time.perf_counter()
        with tempfile.TemporaryFile() as stderr:
            # subprocess spawns with vfork (~0.3 ms). The loop's create_subprocess_exec forks
            # the whole daemon and waits for the exec in the loop's thread: 3-8 ms with a
            # 20-150 MB daemon, 13 ms a command in a burst of 100 waits, twice per wait.
            # Its own process group, to kill criu and its helpers at once. Images are 0600
            # through the daemon's umask (077 from start).
            process = subprocess.Popen(  # noqa: ASYNC220 - vfork: it returns at once
                [self._binary, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,  # (a file: a pipe that fills up would stall criu)
                start_new_session=True,
            )
            try:
                async with asyncio.timeout(timeout_s):
                    await _exited(process.pid)
            except BaseException as exc:  # over time, or the daemon stops: criu goes
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()  # (killed: at once)
                unmount_yards(images)
                if not isinstance(exc, TimeoutError):
                    raise
                return f"criu {args[0]} took longer than {timeout_s:g} s", timeout_s * 1000
            returncode = process.wait()  # (it has exited: this only reaps it)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if returncode != 0:
                stderr.seek(0)
                said = stderr.read().decode(errors="replace").strip()
                reason = log_errors(images / log_name) or said
                return reason or f"criu {args[0]} exited with status {returncode}", elapsed_ms
        return None, elapsed_ms


async def _exited(pid: int) -> None:
    """Return once process ``pid`` (a child, not reaped yet) has exited."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    try:
        loop.add_reader(fd, readable)
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def unmount_yards(images: Path) -> None:
    """Unmount the cgroup yards a criu killed half-way left under ``images``.

    With ``--cgroup-root`` criu mounts the cgroup hierarchies under the images folder while it
    restores and unmounts them as it ends; killed, it cannot, and the mounts would stay in the
    host's mount namespace for good (one set per cut-off restore).
    """
    prefix = str(images) + "/.criu.cgyard."
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
    except OSError:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    # The controllers inside a yard first, then the yard.
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        libc.umount2(point.encode(), _MNT_DETACH)
    for yard in images.glob(".criu.cgyard.*"):
        with contextlib.suppress(OSError):
            yard.rmdir()
