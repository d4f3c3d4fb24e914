"""CRIU checkpoints: a waiting run's process is dumped to disk and restored when it resumes.

The protocol (measured in ``shared/research/criu-python.md``): the run process closes every
socket and parks on SIGUSR1 (``Suspend``); the daemon dumps it with ``criu dump --tcp-close``
into a 0700 directory (which kills it) and frees everything it held. To resume, ``criu
restore -d -S`` brings it back as a child of the daemon, SIGUSR1 wakes it, and it reconnects
with its old worker id and token. Run processes live as PID 1 of their own PID namespace,
so a restore never collides with a PID taken meanwhile. Images are single-use and deleted
after the restored process says hello. When a dump fails, CRIU leaves the process running:
it is woken and simply stays parked; when a restore fails, the run re-executes from its
journal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ember
from ember._types import RunStatus
from ember.daemon._config import DaemonConfig

if TYPE_CHECKING:
    from ember.daemon._engine import Engine
    from ember.daemon._store import ActiveRun
    from ember.daemon._supervisor import Supervisor, Worker

log = logging.getLogger("ember.daemon")

DUMP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 20.0
# Dumps and restores are CPU- and disk-bound: a few at a time, as the research advises.
PARALLEL_CRIU = 2
# A process restored ahead of its deadline should be back this long before it.
RESTORE_MARGIN_S = 0.25
# Restores planned at once when timed waits end close together (the soonest ones).
RESTORE_PLAN_DEPTH = 256


@dataclass(frozen=True, slots=True)
class CriuSupport:
    """Whether checkpoints work here, and why (or why not)."""

    ok: bool
    reason: str
    binary: str | None = None
    version: str | None = None
    dump_ms: float | None = None
    restore_ms: float | None = None


def _find_binary(config: DaemonConfig) -> str | None:
    if config.criu_path:
        return config.criu_path if os.access(config.criu_path, os.X_OK) else None
    found = shutil.which("criu")
    if found:
        return found
    for folder in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        candidate = os.path.join(folder, "criu")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


_SMOKE_WORKER = r"""
import os, signal, sys, time
woke = []
signal.signal(signal.SIGUSR1, lambda *_: woke.append(1))
counter = 41
sys.stdout.write("parked\n"); sys.stdout.flush()
while not woke:
    signal.pause()
sys.stdout.write(f"counter {counter + 1}\n"); sys.stdout.flush()
"""


def _smoke_test(binary: str, work: Path) -> tuple[float, float]:
    """Dump and restore a Python process started the way run processes are.

    Raises:
        RuntimeError: a step failed; the message says which and quotes CRIU.
    """
    log_path = work / "out.log"
    images = work / "img"
    images.mkdir(mode=0o700)
    python = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x20000000) == 0, 'unshare failed'\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        f"    exec({_SMOKE_WORKER!r})\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    with open(log_path, "ab") as out:
        parent = subprocess.Popen(
            [sys.executable, "-c", python],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    try:
        deadline = time.monotonic() + 10
        while b"parked" not in log_path.read_bytes():
            if time.monotonic() > deadline or parent.poll() is not None:
                raise RuntimeError("the smoke-test process did not start")
            time.sleep(0.01)
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        target = int(children[0])
        start = time.perf_counter()
        _criu(
            binary,
            dump_args(target, images),
            images,
            "dump.log",
        )
        dump_ms = (time.perf_counter() - start) * 1000
        parent.wait(10)
        start = time.perf_counter()
        _criu(
            binary,
            restore_args(images),
            images,
            "restore.log",
        )
        restore_ms = (time.perf_counter() - start) * 1000
        restored = int((images / "pidfile").read_text().strip())
        os.kill(restored, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while b"counter 42" not in log_path.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError("the restored process did not continue after SIGUSR1")
            time.sleep(0.01)
        os.waitpid(restored, 0)
        return dump_ms, restore_ms
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


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


def _criu(binary: str, args: list[str], images: Path, log_name: str) -> None:
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(
            f"criu {args[0]} failed: {_errors(images / log_name) or result.stderr.strip()}"
        )


def _errors(log_file: Path) -> str:
    """The Error lines of a CRIU log, minus the harmless RLIMIT_NOFILE one."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line]
    return " | ".join(errors[-3:])


def detect(config: DaemonConfig, cache_dir: Path | None = None) -> CriuSupport:
    """Decide whether CRIU checkpoints work here: version, privileges, and a real smoke test.

    The smoke-test result is cached per (criu binary and version, kernel, Python, Ember).
    """
    if sys.platform != "linux":
        return CriuSupport(False, f"CRIU needs Linux (this is {sys.platform})")
    binary = _find_binary(config)
    if binary is None:
        return CriuSupport(
            False, "no criu binary on PATH (CRIU >= 4.2 is needed on kernels >= 6.16)"
        )
    try:
        version_text = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CriuSupport(False, f"{binary} --version failed: {exc}", binary)
    match = re.search(r"Version:\s*([\d.]+)", version_text)
    version = match.group(1) if match else "unknown"
    kernel = platform.release()
    needed = (4, 2) if _version_tuple(kernel) >= (6, 16) else (4, 0)
    if _version_tuple(version) < needed:
        return CriuSupport(
            False,
            f"criu {version} at {binary} is too old for kernel {kernel}: "
            f"{'.'.join(map(str, needed))} or newer is needed",
            binary,
            version,
        )
    if os.geteuid() != 0:
        return CriuSupport(
            False, "checkpoints need root (or CAP_CHECKPOINT_RESTORE)", binary, version
        )
    key = f"{binary}|{version}|{kernel}|{sys.version.split()[0]}|{ember.__version__}"
    cache = (cache_dir or Path(tempfile.gettempdir())) / "ember-criu-check.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return CriuSupport(**cached["support"])
    check = subprocess.run([binary, "check"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        support = CriuSupport(
            False, f"criu check failed: {check.stderr.strip()[-300:]}", binary, version
        )
    else:
        with tempfile.TemporaryDirectory(prefix="ember-criu-") as work:
            try:
                dump_ms, restore_ms = _smoke_test(binary, Path(work))
                support = CriuSupport(
                    True,
                    f"criu {version}: a real dump and restore worked",
                    binary,
                    version,
                    round(dump_ms, 1),
                    round(restore_ms, 1),
                )
            except (RuntimeError, OSError, subprocess.SubprocessError, IndexError) as exc:
                support = CriuSupport(False, f"the CRIU smoke test failed: {exc}", binary, version)
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"key": key, "support": dataclasses.asdict(support)}))
    return support


class Checkpointer:
    """Dumps and restores the processes of waiting runs.

    Args:
        binary: the criu binary that passed :func:`detect`.
        config: the daemon's configuration (images live under ``<state>/checkpoints``).
        engine: resumes runs and falls back to replay.
        supervisor: owns the processes.
    """

    def __init__(
        self, binary: str, config: DaemonConfig, engine: Engine, supervisor: Supervisor
    ) -> None:
        self._binary = binary
        self._root = config.state_dir / "checkpoints"
        self._engine = engine
        self._supervisor = supervisor
        self._dumps: dict[str, asyncio.Future[bool]] = {}
        self._slots = asyncio.Semaphore(PARALLEL_CRIU)
        # Timed waits whose process is restored ahead of the deadline: (deadline, run id).
        self._ahead: list[tuple[float, str]] = []
        self._ahead_runs: dict[str, ActiveRun] = {}
        self._ahead_changed = asyncio.Event()
        self._ahead_task: asyncio.Task[None] | None = None
        self._restoring: dict[str, asyncio.Future[None]] = {}
        self._ahead_restores: set[asyncio.Task[None]] = set()
        self._restore_s: deque[float] = deque([0.2], maxlen=32)  # recent restore times

    def images(self, run: ActiveRun) -> Path:
        """The run's image directory."""
        return self._root / run.id

    async def _run(self, args: list[str], images: Path, log_name: str) -> tuple[str | None, float]:
        """Run criu; return (None on success else the reason, milliseconds it took)."""
        async with self._slots:
            started = time.perf_counter()
            error = await self._run_now(args, images, log_name)
            return error, (time.perf_counter() - started) * 1000

    async def _run_now(self, args: list[str], images: Path, log_name: str) -> str | None:
        process = await asyncio.create_subprocess_exec(
            self._binary,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), DUMP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return f"criu {args[0]} took longer than {DUMP_TIMEOUT_S:.0f}s"
        if process.returncode != 0:
            return _errors(images / log_name) or stderr.decode(errors="replace").strip()
        return None

    async def checkpoint(self, run: ActiveRun, worker: Worker) -> None:
        """Suspend the run's process and dump it; on failure it stays parked."""
        from ember.daemon._protocol import Suspend

        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._dumps[run.id] = done
        ok = False
        try:
            worker.checkpointing = asyncio.get_running_loop().create_future()
            worker.send(Suspend(run_id=run.id))
            try:
                await asyncio.wait_for(asyncio.shield(worker.checkpointing), READY_TIMEOUT_S)
            except TimeoutError:
                log.warning("run %s did not get ready for its checkpoint; it stays parked", run.id)
                worker.checkpointing = None
                self._keep_parked(run)
                return
            ok = await self._dump(run, worker)
            if ok:
                self.restore_ahead(run)
        finally:
            if not done.done():
                done.set_result(ok)
            self._dumps.pop(run.id, None)

    async def _dump(self, run: ActiveRun, worker: Worker) -> bool:
        images = self.images(run)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True, mode=0o700)
        self._root.chmod(0o700)
        assert worker.pid is not None
        error, dump_ms = await self._run(
            dump_args(worker.pid, images),
            images,
            "dump.log",
        )
        if error is not None:
            log.warning("checkpoint of run %s failed (%s); it stays parked", run.id, error)
            shutil.rmtree(images, ignore_errors=True)
            # CRIU leaves a process it could not dump running: wake it to reconnect.
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGUSR1)
            self._keep_parked(run)
            return False
        size = sum(f.stat().st_size for f in images.iterdir() if f.is_file())
        (images / "meta.json").write_text(
            json.dumps(
                {
                    "worker_id": worker.id,
                    "token": worker.token,
                    "env": worker.key[0],
                    "version": worker.key[1],
                    "dump_ms": dump_ms,
                    "bytes": size,
                }
            )
        )
        self._supervisor.forget(worker)
        worker.parked = None
        if run.parked is worker:
            run.parked = None
        self._engine.note(
            run, "SUSPENDED", f"checkpointed: {size / 1e6:.1f} MB in {dump_ms:.0f} ms"
        )
        return True

    def _keep_parked(self, run: ActiveRun) -> None:
        """The process could not be dumped: it stays alive, holding the run."""
        run.hold = "parked"
        self._engine.db.write(
            lambda conn: conn.execute("UPDATE runs SET hold = 'parked' WHERE id = ?", (run.id,))
        )

    def restore_ahead(self, run: ActiveRun) -> None:
        """Plan to restore a run waiting for a deadline before it comes, so it resumes on time.

        Restores take ~100 ms and run two at a time: when many timed waits end in the same
        second, restoring only at each deadline made the last ones seconds late.
        """
        wait = run.wait
        if wait is None or wait.kind != "DATETIME" or wait.resume_at is None:
            return
        self._ahead_runs[run.id] = run
        heapq.heappush(self._ahead, (wait.resume_at, run.id))
        self._ahead_changed.set()
        if self._ahead_task is None or self._ahead_task.done():
            self._ahead_task = asyncio.get_running_loop().create_task(self._restore_ahead_loop())

    def _next_restore_at(self) -> float:
        """When the soonest planned restore must start for every one to be back in time."""
        estimate = statistics.median(self._restore_s)
        deadlines = heapq.nsmallest(RESTORE_PLAN_DEPTH, self._ahead)
        return min(
            deadline - (rank // PARALLEL_CRIU + 1) * estimate - RESTORE_MARGIN_S
            for rank, (deadline, _) in enumerate(deadlines)
        )

    async def _restore_ahead_loop(self) -> None:
        while self._ahead:
            delay = self._next_restore_at() - time.time()
            if delay > 0:
                self._ahead_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ahead_changed.wait(), delay)
                continue
            _, run_id = heapq.heappop(self._ahead)
            run = self._ahead_runs.pop(run_id, None)
            if run is None or run.hold != "checkpoint" or run.id in self._restoring:
                continue
            if run.status is not RunStatus.WAITING:
                continue  # its deadline came first: the queue restores it as usual
            await self._slots.acquire()  # at most PARALLEL_CRIU restores, ahead or not
            self._slots.release()
            task = asyncio.get_running_loop().create_task(self._restore_tracked(run))
            self._ahead_restores.add(task)
            task.add_done_callback(self._ahead_restores.discard)
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Plan no more restores; let the ones under way finish."""
        if self._ahead_task is not None:
            self._ahead_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ahead_task
        if self._ahead_restores:
            await asyncio.wait(self._ahead_restores)

    async def _restore_tracked(self, run: ActiveRun) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._restoring[run.id] = done
        try:
            await self._bring_back(run)
        except Exception as exc:  # its image vanished meanwhile, say: the run replays
            log.exception("restoring run %s ahead of its deadline failed", run.id)
            self._fail(run, f"{type(exc).__name__}: {exc}")
        finally:
            self._restoring.pop(run.id, None)
            done.set_result(None)

    async def restore(self, run: ActiveRun) -> None:
        """Bring a checkpointed run's process back; on failure, replay the run."""
        ahead = self._restoring.get(run.id)
        if ahead is not None:
            # Its deadline came while it was being restored ahead of it.
            await asyncio.shield(ahead)
            # Unless its process said hello and resumed it already, or the restore failed
            # (and _fail placed it to replay), it resumes in the restored process.
            if run.status is RunStatus.DEQUEUED and run.hold != "exited":
                self._engine.resume_parked_or_replay(run)
            return
        await self._bring_back(run)

    async def _bring_back(self, run: ActiveRun) -> None:
        """Restore the run's process; a failed restore makes the run replay."""
        from ember.daemon._supervisor import Worker

        pending = self._dumps.get(run.id)
        if pending is not None and not await pending:
            # The dump failed and the process is parked; resume it there.
            self._engine.resume_parked_or_replay(run)
            return
        if run.hold == "parked":
            self._engine.resume_parked_or_replay(run)
            return
        images = self.images(run)
        try:
            meta = json.loads((images / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            self._fail(run, f"its image is unreadable ({exc})")
            return
        worker = Worker(meta["worker_id"], (meta["env"], meta["version"]), meta["token"])
        worker.parked = run
        worker.checkpointing = asyncio.get_running_loop().create_future()
        self._supervisor.adopt(worker)
        run.parked = worker
        pidfile = images / "pidfile"
        error, restore_ms = await self._run(
            restore_args(images),
            images,
            "restore.log",
        )
        if error is not None:
            self._supervisor.forget(worker)
            run.parked = None
            self._fail(run, error)
            return
        self._restore_s.append(restore_ms / 1000)
        pid = int(pidfile.read_text().strip())
        worker.pid = pid
        self._reap_later(pid, worker)
        os.kill(pid, signal.SIGUSR1)
        self._engine.note(run, "PENDING_EXECUTING", f"restored its process in {restore_ms:.0f} ms")
        # The image is single-use: the restored process says hello (on_worker_back) and the
        # image goes; two live copies of one run must never exist.
        shutil.rmtree(images, ignore_errors=True)

    def _fail(self, run: ActiveRun, reason: str) -> None:
        log.warning("restoring run %s failed (%s); it re-executes from its journal", run.id, reason)
        shutil.rmtree(self.images(run), ignore_errors=True)
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
            return

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                from ember.daemon._supervisor import describe_exit

                worker.exit_reason = describe_exit(os.waitstatus_to_exitcode(status))
            self._supervisor.collect(worker)

        loop.add_reader(fd, exited)

    def discard(self, run: ActiveRun) -> None:
        """Delete a run's image (the run was canceled or finished otherwise)."""
        shutil.rmtree(self.images(run), ignore_errors=True)
