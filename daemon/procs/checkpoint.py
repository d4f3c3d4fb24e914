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
import ctypes
import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import zstandard

import ember
from ember._types import RunStatus
from ember.daemon.config import DaemonConfig
from ember.daemon.model import Hold, Snapshot
from ember.daemon.procs.criu_plan import RestorePlan, Timings, parallelism
from ember.daemon.procs.manifest import MANIFEST_FILE, mismatch, record
from ember.daemon.procs.pages import PageStore
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Worker
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.db import Database

# umount2's flag: detach now, finish when the mount is no longer busy.
_MNT_DETACH = 2
log = logging.getLogger("ember.daemon")

DUMP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 20.0
# What _run answers when the run's wait ended before its dump could start.
NOT_NEEDED = "its wait is over: no dump needed"
# A failed dump is tried again after this (its cause may pass: a process fd not there yet).
DUMP_RETRY_DELAY_S = 0.2


class CheckpointEngine(Protocol):
    """The engine as the checkpointer sees it: the runs, their journal, and the fallbacks."""

    @property
    def clock(self) -> Callable[[], float]:
        """Wall-clock seconds (the daemon's clock)."""
        ...

    @property
    def active(self) -> Mapping[str, ActiveRun]:
        """The runs that are not final, by id."""
        ...

    @property
    def db(self) -> Database:
        """The state database."""
        ...

    def note(self, run: ActiveRun, snapshot: Snapshot, description: str) -> None:
        """Record an execution snapshot that does not change the run's status."""
        ...

    def place(self, run: ActiveRun) -> None:
        """Put a run on a process of its version."""
        ...

    def replay_instead(self, run: ActiveRun) -> None:
        """A held process could not be resumed: the run re-executes from its journal."""
        ...

    def resume_parked_or_replay(self, run: ActiveRun) -> None:
        """Resume a run whose dump failed: in its parked process, else by replay."""
        ...


@dataclass(frozen=True, slots=True)
class CriuSupport:
    """Whether checkpoints work here, and why (or why not)."""

    ok: bool
    reason: str
    binary: str | None = None
    version: str | None = None
    dump_ms: float | None = None
    restore_ms: float | None = None


def _find_binary(config: DaemonConfig) -> tuple[str | None, str]:
    """The criu binary to run: ``criu_path`` from the config, else the daemon's PATH.

    Nothing else names it (not the smoke-test cache, not a file anyone can write): the
    daemon runs it as root. Returns (the binary or None, why it was refused or not found).
    """
    candidates = [config.criu_path] if config.criu_path else _search_path()
    refused = ""
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        distrust = _untrusted(candidate)
        if distrust is None:
            return os.path.realpath(candidate), ""
        refused = distrust
    if refused:
        return None, refused
    return None, "no criu binary on PATH (CRIU >= 4.2 is needed on kernels >= 6.16)"


def _search_path() -> list[str]:
    folders = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/sbin", "/usr/sbin"]
    return [os.path.join(folder, "criu") for folder in folders if os.path.isabs(folder)]


def _untrusted(binary: str) -> str | None:
    """Why a root daemon must not run this file (None: it may).

    As root, the binary and every folder above it must belong to root and be writable by
    nobody else, or whoever can write there chooses what runs as uid 0.
    """
    if os.geteuid() != 0:
        return None  # an unprivileged daemon runs it as the user who could replace it anyway
    path = Path(os.path.realpath(binary))
    for part in (path, *path.parents):
        info = part.stat()
        if info.st_uid != 0 or info.st_mode & 0o022:
            return (
                f"refusing {binary}: {part} is "
                + ("not owned by root" if info.st_uid != 0 else "writable by group or others")
                + " and the daemon runs criu as root; install criu root-owned (e.g. in"
                " /usr/local/sbin, mode 0755) or point criu_path at such a copy"
            )
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# SIGUSR1 stays blocked and is taken with sigwait: a handler plus pause() lost the signal
# when it came before the restored process was back in pause() (half the smoke tests).
_SMOKE_WORKER = r"""
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
counter = 41
sys.stdout.write("parked\n"); sys.stdout.flush()
signal.sigwait({signal.SIGUSR1})
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


CACHE_FILE = "criu-check.json"


def detect(config: DaemonConfig) -> CriuSupport:
    """Decide whether CRIU checkpoints work here: version, privileges, and a real smoke test.

    The smoke-test result is cached in the state directory (0600) per (criu binary, its
    size and mtime, version, kernel, Python, Ember). The cache only says whether the test
    passed: the binary always comes from :func:`_find_binary`.
    """
    if sys.platform != "linux":
        return CriuSupport(False, f"CRIU needs Linux (this is {sys.platform})")
    binary, refused = _find_binary(config)
    if binary is None:
        return CriuSupport(False, refused)
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
    info = os.stat(binary)
    key = (
        f"{binary}|{info.st_size}|{info.st_mtime_ns}|{version}|{kernel}|"
        f"{sys.version.split()[0]}|{ember.__version__}"
    )
    cache = config.state_dir / CACHE_FILE
    cached = _read_cache(cache, key)
    if cached is not None:
        return dataclasses.replace(cached, binary=binary, version=version)
    support = _check(binary, version)
    _write_cache(cache, key, support)
    return support


def _check(binary: str, version: str) -> CriuSupport:
    check = subprocess.run([binary, "check"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        return CriuSupport(
            False, f"criu check failed: {check.stderr.strip()[-300:]}", binary, version
        )
    with tempfile.TemporaryDirectory(prefix="ember-criu-") as work:
        try:
            dump_ms, restore_ms = _smoke_test(binary, Path(work))
        except (RuntimeError, OSError, subprocess.SubprocessError, IndexError) as exc:
            return CriuSupport(False, f"the CRIU smoke test failed: {exc}", binary, version)
    return CriuSupport(
        True,
        f"criu {version}: a real dump and restore worked",
        binary,
        version,
        round(dump_ms, 1),
        round(restore_ms, 1),
    )


def _read_cache(cache: Path, key: str) -> CriuSupport | None:
    """A cached verdict, if the file is ours, private, and for this exact setup."""
    try:
        with open(cache, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                return None
            cached = json.loads(file.read())
        if cached["key"] != key:
            return None
        verdict = cached["support"]
        return CriuSupport(
            ok=bool(verdict["ok"]),
            reason=str(verdict["reason"]),
            dump_ms=verdict.get("dump_ms"),
            restore_ms=verdict.get("restore_ms"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path, key: str, support: CriuSupport) -> None:
    verdict = {
        "ok": support.ok,
        "reason": support.reason,
        "dump_ms": support.dump_ms,
        "restore_ms": support.restore_ms,
    }
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as file:
            json.dump({"key": key, "support": verdict}, file)
        os.replace(staging, cache)


class Checkpointer:
    """Dumps and restores the processes of waiting runs.

    An image is restored at most once: every restore (ahead of the deadline or at it) goes
    through one registry, and the run's state is checked again once a slot is free. The
    image stays on disk until the resumed run reports back from the restored process, so a
    daemon that dies in between restores it again on its next start.

    Args:
        support: the CRIU that passed :func:`detect` (its binary and version).
        config: the daemon's configuration (images live under ``<state>/checkpoints``).
        engine: resumes runs and falls back to replay.
        supervisor: owns the processes.
    """

    def __init__(
        self,
        support: CriuSupport,
        config: DaemonConfig,
        engine: CheckpointEngine,
        supervisor: Supervisor,
    ) -> None:
        assert support.binary is not None
        assert support.version is not None
        self._binary = support.binary
        self._criu_version = support.version
        self._root = config.state_dir / "checkpoints"
        self._pages = PageStore(config.state_dir / "checkpoint-bases")
        self._restore_timeout_s = config.criu_restore_timeout_s
        self._engine = engine
        self._supervisor = supervisor
        self._dumps: dict[str, asyncio.Future[bool]] = {}
        # Separate slots: a burst of dumps must not hold back the restores of runs now due.
        self.dump_parallel = self.restore_parallel = parallelism()
        self._dump_slots = asyncio.Semaphore(self.dump_parallel)
        self._slots = asyncio.Semaphore(self.restore_parallel)  # (restores)
        self.dump_times = Timings((support.dump_ms or 200.0) / 1000)
        self.restore_times = Timings((support.restore_ms or 200.0) / 1000)
        self._max_ahead = config.max_restored_ahead
        self._room = asyncio.Event()  # a process restored ahead resumed or exited
        self._max_parked = config.max_parked_processes
        # Since the daemon started, for `ember doctor`: dumps, failures, retries, fallbacks.
        self.counters: Counter[str] = Counter()
        self._sweeping = asyncio.Lock()
        # Timed waits whose process is restored ahead of the deadline: (deadline, run id).
        self._ahead = RestorePlan(
            self.restore_parallel,
            self.restore_times,
            self.dump_times,
            depth=max(1, config.max_restored_ahead),
        )
        self._ahead_runs: dict[str, ActiveRun] = {}
        self._ahead_changed = asyncio.Event()
        self._ahead_task: asyncio.Task[None] | None = None
        # The one registry of restores: whoever registers a run first restores its image;
        # anyone else (the deadline, an early restore) waits for that restore to end.
        self._restoring: dict[str, asyncio.Future[None]] = {}
        # Images whose process is back, kept until the resumed run reports: worker id → run id.
        self._kept: dict[int, str] = {}
        # Restored processes alive now (the daemon's children): never taken for strays.
        self._restored_pids: set[int] = set()
        self._ahead_restores: set[asyncio.Task[None]] = set()

    def images(self, run: ActiveRun) -> Path:
        """The run's image directory."""
        return self._root / run.id

    async def _run(
        self, args: list[str], images: Path, log_name: str, run: ActiveRun | None = None
    ) -> tuple[str | None, float]:
        """Run criu in a slot; return (None on success else the reason, milliseconds taken).

        With ``run``, nothing runs if its wait is over by the time a slot is free: when a
        burst's dumps take longer than its waits, dumping a process only to restore it at
        once cost a dump and a restore for nothing.
        """
        async with self._dump_slots:
            if run is not None and run.status is not RunStatus.WAITING:
                return NOT_NEEDED, 0.0
            error, elapsed_ms = await self._run_now(args, images, log_name, DUMP_TIMEOUT_S)
        if error is None:
            self.dump_times.add(elapsed_ms / 1000)
        return error, elapsed_ms

    async def _run_now(
        self, args: list[str], images: Path, log_name: str, timeout_s: float
    ) -> tuple[str | None, float]:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            self._binary,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own process group, to kill criu and its helpers at once. Images are 0600
            # through the daemon's umask (077 from start): uvloop refuses a `umask` argument.
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                _, stderr = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            unmount_yards(images)
            return f"criu {args[0]} took longer than {timeout_s:g} s", timeout_s * 1000
        elapsed_ms = (time.perf_counter() - started) * 1000
        if process.returncode != 0:
            reason = _errors(images / log_name) or stderr.decode(errors="replace").strip()
            return reason or f"criu {args[0]} exited with status {process.returncode}", elapsed_ms
        return None, elapsed_ms

    async def checkpoint(self, run: ActiveRun, worker: Worker) -> None:
        """Suspend the run's process and dump it; on failure it stays parked."""
        from ember.daemon.procs.protocol import Suspend

        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._dumps[run.id] = done
        ok = False
        try:
            worker.checkpointing = asyncio.get_running_loop().create_future()
            worker.send(Suspend(run_id=run.id))
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    await asyncio.shield(worker.checkpointing)
            except TimeoutError:
                log.warning("run %s did not get ready for its checkpoint; it stays parked", run.id)
                worker.checkpointing = None
                self._keep_parked(run)
                return
            try:
                ok = await self._dump(run, worker)
            except Exception:
                # Whatever broke, the process still holds the run: it must not be left in limbo.
                log.exception("checkpoint of run %s failed; it stays parked", run.id)
                if worker.pid is not None:
                    # Ready for its dump, it waits for a wake-up to reconnect.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGUSR1)
                self._keep_parked(run)
                return
            if ok:
                self.restore_ahead(run)
        finally:
            if not done.done():
                done.set_result(ok)
            self._dumps.pop(run.id, None)

    async def checkpoint_executing(
        self, run: ActiveRun, worker: Worker, ready_timeout_s: float = READY_TIMEOUT_S
    ) -> bool:
        """Dump a run that is executing (a shutdown drain's grace ran out); True on success.

        The process closes its channel between two steps of its event loop and parks; its
        task is frozen where it stands and carries on from there once restored.
        """
        from ember.daemon.procs.protocol import Suspend

        worker.checkpointing = asyncio.get_running_loop().create_future()
        worker.send(Suspend(run_id=run.id))
        try:
            async with asyncio.timeout(ready_timeout_s):
                await asyncio.shield(worker.checkpointing)
        except TimeoutError:
            # (its loop is busy in code that does not yield: it is interrupted instead)
            worker.checkpointing = None
            return False
        return await self._dump(run, worker, fall_back=False)  # (the drain interrupts it)

    async def _dump(self, run: ActiveRun, worker: Worker, fall_back: bool = True) -> bool:
        """Dump a process ready for it (retried once); on failure the run falls back."""
        images = self.images(run)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True, mode=0o700)
        self._root.chmod(0o700)
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
                self.counters["dump_failures"] += 1
                log.warning("checkpoint of run %s failed (%s); retrying once", run.id, error)
                self._engine.note(run, Snapshot.SUSPENDED, f"checkpoint failed ({error}); retrying")
                await asyncio.sleep(DUMP_RETRY_DELAY_S)
                for stale in images.iterdir():
                    stale.unlink()
                error, dump_ms = await self._run(
                    dump_args(worker.pid, images), images, "dump.log", waiting
                )
                if error != NOT_NEEDED:
                    self.counters["dump_retries_ok" if error is None else "dump_failures"] += 1
        if error == NOT_NEEDED:
            shutil.rmtree(images, ignore_errors=True)
            self.counters["dumps_not_needed"] += 1
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
        self.counters["dumps"] += 1
        zygote = worker.zygote.process.pid if worker.zygote is not None else None
        started = time.perf_counter()
        packed = await self._pages.pack(images, run.id, self._pages.lineage(worker.id, zygote))
        pack_ms = (time.perf_counter() - started) * 1000
        size = sum(f.stat().st_size for f in images.iterdir() if f.is_file())
        _write_private(images / MANIFEST_FILE, manifest)
        _write_private(
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
        assert worker.pid is not None
        if self._supervisor.parked_count() <= self._max_parked:
            how = "park"
            _wake(worker.pid)  # CRIU left it running: it reconnects and parks
            self._keep_parked(run)
        else:
            how = "replay"
            worker.parked = None
            self._supervisor.kill(worker)
            self._engine.replay_instead(run)
        self.counters[f"fallbacks_{how}"] += 1
        log.warning("checkpoint of run %s failed again (%s); held by %s", run.id, reason, how)
        self._engine.note(
            run, Snapshot.SUSPENDED, f"checkpoint failed again ({reason}); held by {how} instead"
        )

    def _keep_parked(self, run: ActiveRun) -> None:
        """The process could not be dumped: it stays alive, holding the run."""
        run.hold = Hold.PARKED
        self._engine.db.write(lambda conn: store.set_hold(conn, run.id, Hold.PARKED))

    def restore_ahead(self, run: ActiveRun) -> None:
        """Plan to restore a run waiting for a deadline before it comes, so it resumes on time.

        Restores take ~100 ms and run two at a time: when many timed waits end in the same
        second, restoring only at each deadline made the last ones seconds late.
        """
        wait = run.wait
        if wait is None or wait.kind != "DATETIME" or wait.resume_at is None:
            return
        self._ahead_runs[run.id] = run
        self._ahead.push(wait.resume_at, run.id)
        self._ahead_changed.set()
        if self._ahead_task is None or self._ahead_task.done():
            self._ahead_task = asyncio.get_running_loop().create_task(self._restore_ahead_loop())

    async def _restore_ahead_loop(self) -> None:
        while self._ahead:
            delay = self._ahead.next_start() - self._engine.clock()
            if delay > 0:
                self._ahead_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._ahead_changed.wait()
                continue
            while len(self._kept) + len(self._ahead_restores) >= self._max_ahead:
                # Each restored process holds its own memory: at most so many parked ahead.
                self._room.clear()
                await self._room.wait()
            run_id = self._ahead.pop()
            run = self._ahead_runs.pop(run_id, None)
            if run is None or run.hold != Hold.CHECKPOINT or run.id in self._restoring:
                continue
            if run.status is not RunStatus.WAITING:
                continue  # its deadline came first: the queue restores it as usual
            await self._slots.acquire()  # pace: the next one starts when a slot is free
            self._slots.release()
            task = asyncio.get_running_loop().create_task(self._restore_once(run))
            self._ahead_restores.add(task)
            task.add_done_callback(self._ahead_restores.discard)
            task.add_done_callback(lambda _: self._room.set())
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Plan no more restores; let the ones under way finish."""
        if self._ahead_task is not None:
            self._ahead_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ahead_task
        if self._ahead_restores:
            await asyncio.wait(self._ahead_restores)

    async def restore(self, run: ActiveRun) -> None:
        """Its wait is over: bring a checkpointed run's process back and resume it there.

        The process may be back already (restored ahead of the deadline), or its dump may
        have failed (it stayed parked); a failed restore makes the run replay.
        """
        await self._restore_once(run)
        # Unless the restored process resumed it already, or _fail placed it to replay:
        if run.status is RunStatus.DEQUEUED and run.hold != Hold.EXITED:
            self._engine.resume_parked_or_replay(run)

    async def _restore_once(self, run: ActiveRun) -> None:
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
            pending = self._dumps.get(run.id)
            if pending is not None:
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

        images = self.images(run)
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
        began = time.perf_counter()  # (the pages written back count: they are the restore's)
        try:
            unpacked = await self._pages.unpack(images, worker.id)
        except (OSError, ValueError, zstandard.ZstdError) as exc:
            self._supervisor.forget(worker)
            run.parked = None
            return f"its pages cannot be read ({exc})", False
        error, restore_ms = await self._run_now(
            restore_args(images) + self._supervisor.criu_cgroup_args(worker),
            images,
            "restore.log",
            self._restore_timeout_s,
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
        self.restore_times.add(time.perf_counter() - began)
        self._restored_pids.add(pid)
        # Kept until the resumed run reports back (see reported()): if the daemon dies first,
        # the next one restores it again. _kill_earlier_copy makes sure only one copy lives.
        self._kept[worker.id] = run.id
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
                for _ in range(self.restore_parallel):
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
        self.discard(run)
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

    def reported(self, worker: Worker) -> None:
        """The run resumed in this restored process reported back: its image can go."""
        run_id = self._kept.pop(worker.id, None)
        self._room.set()
        if run_id is not None:
            shutil.rmtree(self._root / run_id, ignore_errors=True)
            self._pages.release(run_id)

    def lost(self, worker: Worker, parked: bool) -> bool:
        """A restored process exited; True if it was still ``parked`` (its run never resumed
        there) and its kept image can restore the run again. Otherwise the image goes.
        """
        run_id = self._kept.pop(worker.id, None)
        self._room.set()
        if run_id is None:
            return False
        images = self._root / run_id
        if parked and (images / "meta.json").exists():
            return True
        shutil.rmtree(images, ignore_errors=True)
        self._pages.release(run_id)
        return False

    def discard(self, run: ActiveRun) -> None:
        """Delete a run's image (the run was canceled or finished otherwise)."""
        for worker_id in [w for w, r in self._kept.items() if r == run.id]:
            del self._kept[worker_id]
        self._room.set()
        shutil.rmtree(self.images(run), ignore_errors=True)
        self._pages.release(run.id)

    def prune(self, keep: set[str]) -> None:
        """At start: delete the images of runs no checkpoint holds any more."""
        kept = {}
        if self._root.is_dir():
            for images in self._root.iterdir():
                if images.name not in keep:
                    shutil.rmtree(images, ignore_errors=True)
                else:
                    kept[images.name] = images
        self._pages.prune(kept)


def _wake(pid: int) -> None:
    """SIGUSR1 a parked process: it reconnects (restored, or never dumped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)


def _write_private(path: Path, value: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as file:
        json.dump(value, file)


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
