"""The supervisor: one warm zygote per version, and the run processes forked from it.

A zygote imports a version's task modules once; every run process is a fork of it, so a cold
start costs a fork, not an interpreter start and the imports. A run process executes runs
one after another until it has done ``max_runs_per_process`` or idles for
``process_idle_s``. The engine decides which run goes where; the supervisor owns processes
and their channels, and tells the engine when one is ready or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import psutil

from ember._machines import DEFAULT_MACHINE, MACHINES
from ember._types import ProcessInfo
from ember.daemon.config import DaemonConfig
from ember.daemon.model import PoolKey, VersionKey, Worker, Zygote, ZygoteProcess
from ember.daemon.procs.cgroups import MachineLimits, RunCgroup
from ember.daemon.procs.docker_runtime import (
    CONTAINER_SITE,
    ContainerProcess,
    DockerRuntime,
    nested_cgroup,
    site_packages,
)
from ember.daemon.procs.protocol import (
    MAX_FRAME_BYTES,
    Done,
    Exited,
    Fork,
    Forked,
    FrameDecoder,
    FromWorker,
    FromZygote,
    Heartbeat,
    Hello,
    Indexed,
    Log,
    Shutdown,
    Spans,
    Wait,
    encode,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("ember.daemon")
# Connections to the worker socket the kernel queues before the daemon accepts them.
WORKER_BACKLOG = 4096

# After a run process's channel closes, wait this long for its exit status before reporting
# it gone, so the reason says "killed by SIGKILL" rather than "closed its channel".
_EXIT_STATUS_WAIT_S = 0.5
# A process sent SIGKILL is gone within milliseconds; past this, the engine is told anyway
# (one stuck in the kernel runs no more code of its task).
_DEATH_WAIT_S = 10.0
# How long a starting daemon waits for an earlier daemon's processes to exit on their own
# (they notice within milliseconds) before it kills them.
_PREDECESSOR_WAIT_S = 5.0
# Variables of the daemon's environment that must not leak into run processes.
_STRIPPED_ENV = ("EMBER_VERSION", "TRIGGER_VERSION")


class SupervisorEngine(Protocol):
    """The engine as the supervisor sees it: told when processes come, talk and go."""

    @property
    def clock(self) -> Callable[[], float]:
        """Wall-clock seconds (the daemon's clock)."""
        ...

    @property
    def current(self) -> Mapping[str, str]:
        """The current version of each environment."""
        ...

    def awaiting_count(self, key: PoolKey) -> int:
        """How many runs wait for a process of (environment, version, machine preset)."""
        ...

    def rebalance(self) -> None:
        """Processes were freed or evicted: fork for the versions runs wait for."""
        ...

    def on_spawn_failed(self, env: str, version: str, reason: str) -> None:
        """The version's zygote could not start."""
        ...

    def on_worker_ready(self, worker: Worker) -> None:
        """A process connected and can take a run."""
        ...

    def on_worker_back(self, worker: Worker) -> None:
        """A process reconnected after a checkpoint."""
        ...

    def on_worker_message(
        self, worker: Worker, message: Log | Spans | Heartbeat | Wait | Done
    ) -> None:
        """A frame from a run process."""
        ...

    def on_worker_gone(self, worker: Worker, reason: str) -> None:
        """A process exited or its channel closed."""
        ...


class _ZygoteProtocol(asyncio.Protocol):
    def __init__(self, supervisor: Supervisor, zygote: Zygote) -> None:
        self._supervisor = supervisor
        self._zygote = zygote
        self._decoder = FrameDecoder(FromZygote)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Here, not when create_unix_connection returns: its Indexed can be read before
        # that, and forks queued meanwhile were then never sent (runs waited forever).
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._zygote.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._supervisor._on_zygote_message(self._zygote, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._supervisor._on_zygote_lost(self._zygote)


class _WorkerProtocol(asyncio.Protocol):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._decoder = FrameDecoder(FromWorker)
        self._transport: asyncio.Transport | None = None
        self.worker: Worker | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ValueError as exc:
            log.warning("closing a worker channel: %s", exc)
            if self.worker is not None:
                self.worker.fault = (
                    f"{exc} (at most {MAX_FRAME_BYTES} bytes): a log line, output or error "
                    "that large cannot be recorded; return a reference to stored data instead"
                )
            assert self._transport is not None
            self._transport.close()
            return
        engine = self._supervisor.engine
        for message in messages:
            if self.worker is None:
                if not isinstance(message, Hello):
                    assert self._transport is not None
                    self._transport.close()
                    return
                assert self._transport is not None
                self.worker = self._supervisor._on_hello(message, self._transport)
                if self.worker is None:
                    return
            elif isinstance(message, Log | Spans | Heartbeat | Wait | Done):
                engine.on_worker_message(self.worker, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self._supervisor._on_channel_closed(self.worker)


def _drain(transport: asyncio.Transport) -> None:
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


class Supervisor:
    """Starts zygotes, forks run processes, and watches them.

    Args:
        config: the daemon's configuration.
        engine: receives ready, message and gone notifications.
        api_socket: the API socket run processes use to trigger child runs.
    """

    def __init__(self, config: DaemonConfig, engine: SupervisorEngine, api_socket: Path) -> None:
        self.config = config
        self.engine = engine
        self._api_socket = api_socket
        self._zygotes: dict[VersionKey, Zygote] = {}
        # Zygotes stopped while the daemon runs, until their exit status is collected.
        self._stopped_zygotes: list[Zygote] = []
        self._workers: dict[int, Worker] = {}
        self._idle: dict[PoolKey, list[Worker]] = {}
        self._starting: dict[PoolKey, int] = {}
        # How run processes are held to their machine presets (set up in start()), and the
        # cgroup of each process that has one.
        self.limits = MachineLimits("off")
        self._cgroups: dict[int, RunCgroup] = {}
        # Set by the daemon when some environment has runtime = "docker".
        self.docker: DockerRuntime | None = None
        # Ids stay unique across restarts: a restored process says hello with its old id.
        self._next_id = time.time_ns() // 1000
        self.pidns = False
        # Set by the daemon: zygotes (and the task code they fork) get the user's umask back.
        self.child_umask: int | None = None
        # psutil keeps the previous CPU sample per Process object: reuse them between calls.
        self._psutil: dict[int, psutil.Process] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._logs_dir = config.run_logs_dir
        # Set by the daemon: the Python a version's code runs on (its own virtual environment
        # when it has requirements), and the variables of an environment (``ember env set``).
        self.interpreter: Callable[[str], str] = lambda code_dir: sys.executable
        self.env_vars: Callable[[str], Mapping[str, str]] = lambda env: {}
        self._generation: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for run processes on the worker socket."""
        await self._outlive_predecessors()
        self.limits = MachineLimits(self.config.machine_limits)
        path = self.config.worker_socket
        path.unlink(missing_ok=True)
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        # A deep backlog: hundreds of processes woken at once (a burst of waits) reconnect
        # together, and asyncio's default of 100 left the rest hanging in connect().
        self._server = await loop.create_unix_server(
            lambda: _WorkerProtocol(self), str(path), backlog=WORKER_BACKLOG
        )
        os.chmod(path, 0o600)
        self._sweeper = loop.create_task(self._sweep())

    @property
    def _processes_lock(self) -> Path:
        # Every zygote holds a shared lock on it, and every process it forks inherits it.
        return self.config.state_dir / "processes.lock"

    async def _outlive_predecessors(self) -> None:
        """Wait until no process of an earlier daemon is left; kill those that linger.

        Recovery turns the runs they executed into new attempts: an old process still
        running would be a second attempt at the same time.
        """
        path = self._processes_lock
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

    async def stop(self) -> None:
        """Stop every process: run processes get SIGKILL, zygotes their channel closed.

        Runs that were executing stay EXECUTING in the table and become new attempts on the
        next start, exactly as after a crash, so there is one recovery path to trust.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
        for worker in list(self._workers.values()):
            self.kill(worker)
            if worker.transport is not None:
                worker.transport.close()
            _close_pidfd(worker)
        zygotes = list(self._zygotes.values()) + self._stopped_zygotes
        for zygote in zygotes:
            self._stop_zygote(zygote)
        if self._server is not None:
            self._server.close()
        for zygote in zygotes:
            try:
                await asyncio.to_thread(zygote.process.wait, 5)
            except subprocess.TimeoutExpired:
                zygote.process.kill()
                await asyncio.to_thread(zygote.process.wait)
        self.limits.close()

    # -- zygotes ------------------------------------------------------------------------

    def _zygote_env(self, env: str, version: str) -> dict[str, str]:
        child_env = dict(os.environ)
        child_env.update(self.env_vars(env))
        for name in _STRIPPED_ENV:
            child_env.pop(name, None)
        child_env.update(
            EMBER_SOCKET=str(self._api_socket),
            EMBER_ENV=env,
            EMBER_RUN_VERSION=version,
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return child_env

    def _ensure_zygote(self, env: str, version: str, code_dir: str) -> Zygote:
        key = (env, version)
        zygote = self._zygotes.get(key)
        if zygote is not None and zygote.alive:
            return zygote
        log_path = self._logs_dir / f"{env.replace('/', '_')}-{version}.log"
        common = [
            "--code-dir",
            code_dir,
            "--worker-socket",
            str(self.config.worker_socket),
            "--heartbeat-s",
            str(self.config.heartbeat_interval_s),
            "--cancel-grace-s",
            str(self.config.cancel_grace_s),
            *([] if self.config.tracing else ["--no-tracing"]),
            *(f"--instrument={name}" for name in self.config.instrumentations),
        ]
        process: ZygoteProcess
        if self.docker is not None and self.docker.runs(env):
            process, ours = self._start_container(key, code_dir, common, log_path)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    [
                        self.interpreter(code_dir),
                        "-m",
                        "ember.daemon.child.zygote",
                        "--fd",
                        str(theirs.fileno()),
                        *common,
                        "--lock",
                        str(self._processes_lock),
                        *(["--pidns"] if self.pidns else []),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self._zygote_env(env, version),
                    cwd=code_dir,
                    close_fds=True,
                    start_new_session=True,
                    umask=-1 if self.child_umask is None else self.child_umask,
                )
            theirs.close()
        loop = asyncio.get_running_loop()
        zygote = Zygote(
            key, code_dir, process, loop.create_future(), idle_since=self.engine.clock()
        )
        self._zygotes[key] = zygote
        zygote.connecting = loop.create_task(self._connect_zygote(zygote, ours))
        return zygote

    def _start_container(
        self, key: VersionKey, code_dir: str, common: list[str], log_path: Path
    ) -> tuple[ContainerProcess, socket.socket]:
        """The zygote in a container of the version's image (``procs/docker_runtime.py``)."""
        assert self.docker is not None
        log_path.touch()
        channel = self.config.worker_socket.parent / f"zygote-{secrets.token_hex(4)}.sock"
        interpreter = self.interpreter(code_dir)
        env = self._zygote_env(*key)
        if interpreter != sys.executable:  # the version's own environment, copied in
            env["PYTHONPATH"] = f"{site_packages(interpreter)}:{CONTAINER_SITE}"
        argv = [str(Path(sys.executable).resolve()), "-m", "ember.daemon.child.zygote"]
        argv += ["--connect", str(channel), "--log-file", str(log_path), *common]

        def failed(reason: str) -> None:
            zygote = self._zygotes.get(key)
            if zygote is not None and not zygote.indexed.done():
                zygote.indexed.set_result(Indexed(error=reason))
            if zygote is not None:
                if zygote.connecting is not None:
                    zygote.connecting.cancel()  # (nothing will connect)
                self._on_zygote_lost(zygote)

        return self.docker.start(
            key=key,
            code_dir=code_dir,
            argv=argv,
            env=env,
            mounts=[self.config.worker_socket, self._api_socket, log_path],
            channel=channel,
            on_failed=failed,
            retired=lambda: self._is_stale(key),
        )

    async def _connect_zygote(self, zygote: Zygote, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            # A containerized zygote connects to us: the listener serves that one connection.
            with sock:
                sock, _ = await loop.sock_accept(sock)
        transport, _ = await loop.create_unix_connection(
            lambda: _ZygoteProtocol(self, zygote), sock=sock
        )
        zygote.transport = transport

    async def index(
        self, env: str, version: str, code_dir: str, timeout_s: float = 120.0
    ) -> Indexed:
        """Start the version's zygote and return the tasks it found (or its import error)."""
        zygote = self._ensure_zygote(env, version, code_dir)
        try:
            async with asyncio.timeout(timeout_s):
                indexed = await asyncio.shield(zygote.indexed)
        except TimeoutError:
            self._stop_zygote(zygote)
            return Indexed(error=f"importing the task modules took longer than {timeout_s:.0f}s")
        if indexed.error is not None:
            self._stop_zygote(zygote)
        return indexed

    def _on_zygote_message(self, zygote: Zygote, message: Any) -> None:
        if isinstance(message, Indexed):
            if not zygote.indexed.done():
                zygote.indexed.set_result(message)
            if message.error is None and zygote.transport is not None:
                for fork in zygote.pending_forks:
                    zygote.transport.write(encode(fork))
                zygote.pending_forks.clear()
            elif message.error is not None:
                self._fail_starting(
                    zygote, f"the version's code failed to import:\n{message.error}"
                )
        elif isinstance(message, Forked):
            worker = self._workers.get(message.worker_id)
            if worker is not None:
                worker.zygote_pid = message.pid
        elif isinstance(message, Exited):
            for worker in list(self._workers.values()):
                if worker.checkpointing is not None:
                    continue  # dumped by CRIU on purpose, not a crash
                if worker.zygote_pid == message.pid and worker.zygote is zygote:
                    worker.exit_reason = describe_exit(message.status)
                    self._gone(worker)

    def _on_zygote_lost(self, zygote: Zygote) -> None:
        zygote.alive = False
        if zygote not in self._stopped_zygotes:
            self._stopped_zygotes.append(zygote)
        if self._zygotes.get(zygote.key) is zygote:
            del self._zygotes[zygote.key]
        if not zygote.indexed.done():
            code = zygote.process.poll()
            zygote.indexed.set_result(
                Indexed(error=f"the zygote exited before importing the tasks (status {code})")
            )
        self._fail_starting(zygote, "the version's zygote exited")

    def _fail_starting(self, zygote: Zygote, reason: str) -> None:
        # Only this zygote's forks: a zygote stopped on purpose reports its end late, when a
        # new zygote of the same version may be starting processes already.
        starting = [w for w in self._workers.values() if w.zygote is zygote and w.pid is None]
        for worker in starting:
            self._workers.pop(worker.id, None)
            self._drop_cgroup(worker)
            self._starting[worker.pool] = max(0, self._starting.get(worker.pool, 0) - 1)
        if starting:
            self.engine.on_spawn_failed(*zygote.key, reason)

    def _stop_zygote(self, zygote: Zygote) -> None:
        zygote.alive = False
        self._stopped_zygotes = [z for z in self._stopped_zygotes if z.process.poll() is None]
        if zygote not in self._stopped_zygotes:
            self._stopped_zygotes.append(zygote)
        if zygote.transport is not None:
            zygote.transport.close()
        elif zygote.process.poll() is None:
            zygote.process.kill()
        if self._zygotes.get(zygote.key) is zygote:
            del self._zygotes[zygote.key]

    # -- run processes ------------------------------------------------------------------

    def take_idle(self, env: str, version: str, machine: str = DEFAULT_MACHINE) -> Worker | None:
        """An idle run process of the version and preset, now marked busy, or None."""
        idle = self._idle.get((env, version, machine))
        while idle:
            worker = idle.pop()
            if not worker.gone and not worker.retiring and worker.parked is None:
                return worker
        return None

    def make_idle(self, worker: Worker) -> None:
        """A run process has nothing to do: keep it warm for the next run."""
        if worker.gone or worker.retiring:
            return
        if self._is_stale(worker.key) or self._outdated(worker):
            self.retire(worker)  # an old version: its zygote goes once its last process has
            return
        worker.idle_since = self.engine.clock()
        self._idle.setdefault(worker.pool, []).append(worker)

    def _is_stale(self, key: VersionKey) -> bool:
        return self.engine.current.get(key[0]) != key[1]

    def _outdated(self, worker: Worker) -> bool:
        return worker.generation != self._generation.get(worker.key[0], 0)

    def refresh_env(self, env: str) -> None:
        """The environment's variables changed: replace its processes as they free up.

        Idle run processes exit and zygotes restart with the new variables; a run
        executing keeps the values it started with, and its process exits after it.
        """
        self._generation[env] = self._generation.get(env, 0) + 1
        for pool, idle in self._idle.items():
            if pool[0] == env:
                while idle:
                    self.retire(idle.pop())
        for key, zygote in list(self._zygotes.items()):
            starting = any(w.key == key and w.pid is None for w in self._workers.values())
            if key[0] == env and zygote.indexed.done() and not starting:
                self._stop_zygote(zygote)
            elif key[0] == env:
                zygote.outdated = True  # stopped by the sweep once its forks are done

    def drop_stale(self, env: str) -> None:
        """A new version is current: let the processes of the environment's older ones go.

        Idle run processes of old versions exit now and each old zygote stops once none of
        its processes is left, so runs executing on an old version finish on its code.
        """
        for pool, idle in self._idle.items():
            if pool[0] == env and self._is_stale(pool[:2]):
                while idle:
                    self.retire(idle.pop())
        for key in [k for k in self._zygotes if k[0] == env]:
            self._stop_if_unused(key)

    def _stop_if_unused(self, key: VersionKey) -> None:
        zygote = self._zygotes.get(key)
        if zygote is None or not zygote.indexed.done() or not self._is_stale(key):
            return  # (a zygote still importing belongs to a version being registered)
        if any(self.engine.awaiting_count((*key, machine)) for machine in MACHINES):
            return
        if not any(w.key == key for w in self._workers.values()):
            self._stop_zygote(zygote)

    def spawn(self, env: str, version: str, code_dir: str, machine: str = DEFAULT_MACHINE) -> None:
        """Start run processes for the runs of a version and preset that wait, within the cap."""
        pool = (env, version, machine)
        wanted = self.engine.awaiting_count(pool)
        while self._starting.get(pool, 0) < wanted:
            if self._counted() >= self.config.max_concurrent_runs and not self._evict_idle(pool):
                return  # at the cap: retried when a process idles or exits
            if not self._fork((env, version), code_dir, machine):
                return

    def prepare_successor(self, worker: Worker) -> None:
        """The process starts its last run before recycling: fork its successor meanwhile.

        Recycling then costs no run a wait for a fork (a few ms, with a PID namespace).
        """
        if worker.runs_done + 1 < self.config.max_runs_per_process or worker.last_run:
            return
        worker.last_run = True
        zygote = self._zygotes.get(worker.key)
        if zygote is None or self._is_stale(worker.key) or self._outdated(worker):
            return  # its replacement, if any, is another version's or forked afresh
        if self._counted() < self.config.max_concurrent_runs:
            self._fork(worker.key, zygote.code_dir, worker.machine)

    def _counted(self) -> int:
        """Processes that count against the cap.

        Parked processes hold memory, not slots: they are capped apart (engine). Processes
        on their way out (on their last run, or exiting) are replaced before they are gone.
        """
        return sum(
            1
            for w in self._workers.values()
            if w.parked is None and not w.retiring and not w.last_run
        )

    def _fork(self, key: VersionKey, code_dir: str, machine: str) -> bool:
        """Ask the version's zygote for a process in a cgroup of the preset (False: refused)."""
        env, version = key
        worker = Worker(
            self._next_id,
            key,
            secrets.token_hex(16),
            generation=self._generation.get(env, 0),
            machine=machine,
        )
        self._next_id += 1
        try:
            cgroup = self._make_cgroup(worker)
        except OSError as exc:
            self.engine.on_spawn_failed(
                env, version, f"the {machine} preset's cgroup could not be made: {exc}"
            )
            return False
        self._workers[worker.id] = worker
        self._starting[worker.pool] = self._starting.get(worker.pool, 0) + 1
        zygote = self._ensure_zygote(env, version, code_dir)
        worker.zygote = zygote
        worker.contained = isinstance(zygote.process, ContainerProcess)
        zygote.fork(
            Fork(
                worker_id=worker.id,
                token=worker.token,
                cgroup_procs=cgroup.procs if cgroup is not None else [],
                memory_rlimit=self.limits.rlimit_bytes(MACHINES[machine]),
            )
        )
        return True

    def _make_cgroup(self, worker: Worker) -> RunCgroup | None:
        if self.docker is not None and self.docker.runs(worker.key[0]):
            return None  # made inside its container's cgroup once it says hello
        cgroup = self.limits.create(f"w{worker.id}", MACHINES[worker.machine])
        if cgroup is not None:
            self._cgroups[worker.id] = cgroup
        return cgroup

    def _drop_cgroup(self, worker: Worker) -> None:
        """The process is gone: note what its cgroup saw, then remove the cgroup."""
        cgroup = self._cgroups.pop(worker.id, None)
        if cgroup is not None:
            worker.oom_killed = worker.oom_killed or cgroup.oom_kills() > 0
            worker.usage = cgroup.usage()
            self.limits.discard(cgroup)

    def _enter_container(self, worker: Worker, ns_pid: int) -> int | None:
        """A containerized process's host PID, once it is in its preset's nested cgroup.

        Before the engine gives it a run, so no task code runs outside the preset's limits.
        """
        assert worker.zygote is not None
        process = cast(ContainerProcess, worker.zygote.process)
        host_pid = process.host_pid(ns_pid)
        if host_pid is None:
            log.warning("run process %s (pid %s in its container) is not found", worker.id, ns_pid)
            return None
        try:
            cgroup = nested_cgroup(process, f"w{worker.id}", MACHINES[worker.machine])
            self._cgroups[worker.id] = cgroup
            for procs in cgroup.procs:
                Path(procs).write_text(str(host_pid))
        except OSError as exc:
            log.warning("cannot hold run process %s to its preset: %s", worker.id, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(host_pid, signal.SIGKILL)
            return None
        return host_pid

    def cgroup_of(self, worker: Worker) -> RunCgroup | None:
        """The process's cgroup (for reading its limits back, or a restore into it)."""
        return self._cgroups.get(worker.id)

    def criu_cgroup_args(self, worker: Worker) -> list[str]:
        """``criu restore`` arguments that put the restored process into its new cgroup."""
        cgroup = self._cgroups.get(worker.id)
        if cgroup is None:
            return []
        args = []
        for controllers, path in cgroup.criu_roots:
            args += ["--cgroup-root", f"{controllers}:{path}" if controllers else path]
        return args

    def _evict_idle(self, keep: PoolKey) -> bool:
        for key, idle in self._idle.items():
            if key != keep and idle:
                self.retire(idle.pop())
                return True
        return False

    def _on_hello(self, hello: Hello, transport: asyncio.Transport) -> Worker | None:
        worker = self._workers.get(hello.worker_id)
        if worker is None or not secrets.compare_digest(worker.token, hello.token):
            log.warning("refusing a run process with an unknown id or token (pid %s)", hello.pid)
            transport.close()
            return None
        reconnected = worker.transport is None and (worker.pid is not None or hello.restored)
        pid = hello.pid
        if worker.contained:  # its PID in the container: the host's is found once
            host_pid = worker.pid or self._enter_container(worker, hello.pid)
            if host_pid is None:
                transport.close()
                return None
            pid = host_pid
        worker.transport = transport
        worker.pid = pid
        _close_pidfd(worker)
        with contextlib.suppress(OSError):  # (gone already: its channel's close follows)
            worker.pidfd = os.pidfd_open(pid)
        if hello.restored or (reconnected and worker.parked is not None):
            # Back from a checkpoint (or from a dump that failed): deliver what waited.
            worker.checkpointing = None
            outbox, worker.outbox = worker.outbox, []
            for message in outbox:
                worker.send(message)
            self.engine.on_worker_back(worker)
            return worker
        self._starting[worker.pool] = max(0, self._starting.get(worker.pool, 0) - 1)
        self.engine.on_worker_ready(worker)
        return worker

    def collect(self, worker: Worker) -> None:
        """A restored process (the daemon's own child) exited."""
        if worker.transport is not None:
            worker.transport.close()
        else:
            self._gone(worker)

    def parked_count(self) -> int:
        """Processes idling for a waiting run."""
        return sum(1 for w in self._workers.values() if w.parked is not None)

    def adopt(self, worker: Worker) -> None:
        """Track a process restored from a checkpoint (a child of the daemon, not a zygote).

        Its preset's cgroup is made now: the restore puts the process into it
        (:meth:`criu_cgroup_args`), as the zygote's fork did the first time.

        Raises:
            OSError: the cgroup could not be made (the restore fails; the run replays).
        """
        self._make_cgroup(worker)
        self._workers[worker.id] = worker

    def forget(self, worker: Worker) -> None:
        """Stop tracking a process that was dumped: its image holds it now."""
        self._workers.pop(worker.id, None)
        worker.transport = None
        _close_pidfd(worker)
        self._drop_cgroup(worker)

    def release(self, worker: Worker) -> None:
        """A run process finished a run: recycle it or hand it the next one.

        A process restored from a checkpoint exits with its run: it shares no page with a
        zygote (~16 MB each, against ~5 MB for a fork), so it is no worker to keep warm.
        """
        restored = worker.zygote is None
        if (
            restored
            or worker.runs_done >= self.config.max_runs_per_process
            or self._outdated(worker)
        ):
            self.retire(worker)
            self.engine.rebalance()
        else:
            self.engine.on_worker_ready(worker)

    def retire(self, worker: Worker) -> None:
        """Ask an idle run process to exit."""
        worker.retiring = True
        worker.send(Shutdown())

    def terminate(self, worker: Worker, grace_s: float) -> None:
        """SIGTERM a run process, and SIGKILL it if it is still there after ``grace_s``."""
        worker.retiring = True
        self._signal(worker, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace_s, self.kill, worker)

    def kill(self, worker: Worker) -> None:
        """SIGKILL a run process with everything it started."""
        worker.retiring = True
        self._kill_tree(worker)

    def _signal(self, worker: Worker, signum: int) -> None:
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
        descendants: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(worker.pid).children(recursive=True)
        if worker.pidfd is not None:
            # Alive, so its PID (its group's id) is still its own.
            with contextlib.suppress(OSError):
                os.killpg(worker.pid, signal.SIGKILL)
        self._signal(worker, signal.SIGKILL)
        for process in descendants:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def busy_workers(self) -> Iterator[Worker]:
        """Run processes executing an attempt."""
        return (w for w in list(self._workers.values()) if w.run is not None)

    def _on_channel_closed(self, worker: Worker) -> None:
        worker.transport = None
        if worker.checkpointing is not None:
            # It closed its channel on purpose: ready to be dumped.
            if not worker.checkpointing.done():
                worker.checkpointing.set_result(None)
            return
        if worker.exit_reason is None:
            # Make sure it is gone, then wait briefly for the zygote's exit status.
            self._signal(worker, signal.SIGKILL)
            asyncio.get_running_loop().call_later(_EXIT_STATUS_WAIT_S, self._gone, worker)
        else:
            self._gone(worker)

    def _gone(self, worker: Worker) -> None:
        if worker.gone or worker.id not in self._workers:
            return
        if worker.transport is not None:
            # The exit status came first: the channel's close follows and finishes the job.
            # What the process wrote before it exited (its last spans and log lines) may
            # still wait in the socket, unread: a close would drop it.
            _drain(worker.transport)
            worker.transport.close()
            return
        worker.gone = True
        self._workers.pop(worker.id, None)
        idle = self._idle.get(worker.pool)
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
        self._drop_cgroup(worker)  # (dead by now: what its cgroup counted is final)
        reason = worker.exit_reason or "closed its channel"
        if worker.fault is not None:
            reason = f"{reason}: the daemon ended it because {worker.fault}"
        self.engine.on_worker_gone(worker, reason)
        self._stop_if_unused(worker.key)
        self.engine.rebalance()

    async def _sweep(self) -> None:
        """Every few seconds: retire idle processes and zygotes nobody needs."""
        while True:
            await asyncio.sleep(min(5.0, self.config.process_idle_s))
            now = self.engine.clock()
            for idle in self._idle.values():
                for worker in [w for w in idle if now - w.idle_since > self.config.process_idle_s]:
                    idle.remove(worker)
                    self.retire(worker)
            used = {w.key for w in self._workers.values()}
            for key, zygote in list(self._zygotes.items()):
                starting = any(w.key == key and w.pid is None for w in self._workers.values())
                if zygote.outdated and not starting:
                    self._stop_zygote(zygote)
                elif key in used or self.engine.current.get(key[0]) == key[1]:
                    zygote.idle_since = now
                elif now - zygote.idle_since > self.config.process_idle_s:
                    self._stop_zygote(zygote)

    def stats(self) -> dict[str, int]:
        """Counts for health and the dashboard."""
        return {
            "processes": len(self._workers),
            "idle_processes": sum(len(v) for v in self._idle.values()),
            "zygotes": len(self._zygotes),
        }

    def processes(self) -> list[ProcessInfo]:
        """Every run process, with its CPU use and memory where it can be measured."""
        found = []
        for worker in self._workers.values():
            cpu = rss = None
            if worker.pid is not None:
                process = self._psutil.get(worker.pid)
                try:
                    if process is None:
                        process = self._psutil[worker.pid] = psutil.Process(worker.pid)
                    cpu = process.cpu_percent(None)
                    rss = process.memory_info().rss
                except psutil.Error:
                    self._psutil.pop(worker.pid, None)
            held = worker.run if worker.run is not None else worker.parked
            state: Literal["starting", "idle", "busy", "parked", "retiring"] = (
                "retiring"
                if worker.retiring
                else "starting"
                if worker.transport is None
                else "busy"
                if worker.run is not None
                else "parked"
                if worker.parked is not None
                else "idle"
            )
            found.append(
                ProcessInfo(
                    worker_id=worker.id,
                    env=worker.key[0],
                    version=worker.key[1],
                    state=state,
                    pid=worker.pid,
                    run_id=held.id if held is not None else None,
                    task_id=held.task_id if held is not None else None,
                    runs_done=worker.runs_done,
                    cpu_percent=cpu,
                    rss_bytes=rss,
                )
            )
        live = {w.pid for w in self._workers.values()}
        for pid in [p for p in self._psutil if p not in live]:
            del self._psutil[pid]
        return sorted(found, key=lambda p: p.worker_id)


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


def _exited(pidfd: int) -> bool:
    """Whether the process behind a pidfd has exited (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _close_pidfd(worker: Worker) -> None:
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
