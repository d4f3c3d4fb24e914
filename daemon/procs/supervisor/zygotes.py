"""The zygotes: one warm parent per version, started, indexed, asked for forks, stopped.

A zygote imports a version's task modules once; every run process is a fork of it, so a cold
start costs a fork, not an interpreter start and the imports. It runs as the daemon's child
or in a container of the version's image (``procs/docker_runtime.py``), and talks to the
daemon on a channel of its own: its index of tasks, the PIDs it forked and their exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from ember._machines import MACHINES
from ember.daemon.model import VersionKey, Zygote, ZygoteProcess
from ember.daemon.procs.docker_runtime import CONTAINER_SITE, ContainerProcess, site_packages
from ember.daemon.procs.protocol import Exited, Forked, FrameDecoder, FromZygote, Indexed, encode
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorPart
from ember.daemon.procs.supervisor.exits import Exits, describe_exit
from ember.daemon.procs.supervisor.isolation import Isolation

log = logging.getLogger("ember.daemon")
# Variables of the daemon's environment that must not leak into run processes.
_STRIPPED_ENV = ("EMBER_VERSION", "TRIGGER_VERSION")


class _ZygoteProtocol(asyncio.Protocol):
    def __init__(self, zygotes: Zygotes, zygote: Zygote) -> None:
        self._zygotes = zygotes
        self._zygote = zygote
        self._decoder = FrameDecoder(FromZygote)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Here, not when create_unix_connection returns: its Indexed can be read before
        # that, and forks queued meanwhile were then never sent (runs waited forever).
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._zygote.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._zygotes.on_message(self._zygote, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._zygotes.on_lost(self._zygote)


class Zygotes(SupervisorPart):
    """The live zygote of each version, and those stopped until their exit is collected.

    Args:
        ctx: the supervisor's shared state.
        isolation: the container runtime, and the cgroups of forks that never started.
        exits: told when a zygote reports that a process it forked exited.
    """

    def __init__(self, ctx: SupervisorContext, isolation: Isolation, exits: Exits) -> None:
        super().__init__(ctx)
        self._isolation = isolation
        self._exits = exits
        self.by_version: dict[VersionKey, Zygote] = {}
        # Zygotes stopped while the daemon runs, until their exit status is collected.
        self.stopped: list[Zygote] = []
        self._logs_dir = ctx.config.run_logs_dir
        # Set by the daemon: whether run processes get a PID namespace each, and the umask
        # zygotes (and the task code they fork) get back: the user's.
        self.pidns = False
        self.child_umask: int | None = None
        # Set by the daemon: the Python a version's code runs on (its own virtual environment
        # when it has requirements), and the variables of an environment (``ember env set``).
        self.interpreter: Callable[[str], str] = lambda code_dir: sys.executable
        self.env_vars: Callable[[str], Mapping[str, str]] = lambda env: {}

    def _env(self, env: str, version: str) -> dict[str, str]:
        child_env = dict(os.environ)
        child_env.update(self.env_vars(env))
        for name in _STRIPPED_ENV:
            child_env.pop(name, None)
        child_env.update(
            EMBER_SOCKET=str(self.ctx.api_socket),
            EMBER_ENV=env,
            EMBER_RUN_VERSION=version,
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return child_env

    def ensure(self, env: str, version: str, code_dir: str) -> Zygote:
        """The version's live zygote, started now if it has none."""
        key = (env, version)
        zygote = self.by_version.get(key)
        if zygote is not None and zygote.alive:
            return zygote
        config = self.config
        log_path = self._logs_dir / f"{env.replace('/', '_')}-{version}.log"
        common = [
            "--code-dir",
            code_dir,
            "--worker-socket",
            str(config.worker_socket),
            "--heartbeat-s",
            str(config.heartbeat_interval_s),
            "--cancel-grace-s",
            str(config.cancel_grace_s),
            *([] if config.tracing else ["--no-tracing"]),
            *(f"--instrument={name}" for name in config.instrumentations),
        ]
        process: ZygoteProcess
        if self._isolation.in_container(env):
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
                        str(self.ctx.processes_lock),
                        *(["--pidns"] if self.pidns else []),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self._env(env, version),
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
        self.by_version[key] = zygote
        zygote.connecting = loop.create_task(self._connect(zygote, ours))
        return zygote

    def _start_container(
        self, key: VersionKey, code_dir: str, common: list[str], log_path: Path
    ) -> tuple[ContainerProcess, socket.socket]:
        """The zygote in a container of the version's image (``procs/docker_runtime.py``)."""
        docker = self._isolation.docker
        assert docker is not None
        config = self.config
        log_path.touch()
        channel = config.worker_socket.parent / f"zygote-{secrets.token_hex(4)}.sock"
        interpreter = self.interpreter(code_dir)
        env = self._env(*key)
        if interpreter != sys.executable:  # the version's own environment, copied in
            env["PYTHONPATH"] = f"{site_packages(interpreter)}:{CONTAINER_SITE}"
        argv = [str(Path(sys.executable).resolve()), "-m", "ember.daemon.child.zygote"]
        argv += ["--connect", str(channel), "--log-file", str(log_path), *common]

        def failed(reason: str) -> None:
            zygote = self.by_version.get(key)
            if zygote is not None and not zygote.indexed.done():
                zygote.indexed.set_result(Indexed(error=reason))
            if zygote is not None:
                if zygote.connecting is not None:
                    zygote.connecting.cancel()  # (nothing will connect)
                self.on_lost(zygote)

        return docker.start(
            key=key,
            code_dir=code_dir,
            argv=argv,
            env=env,
            mounts=[config.worker_socket, self.ctx.api_socket, log_path],
            channel=channel,
            on_failed=failed,
            retired=lambda: self.is_stale(key),
        )

    async def _connect(self, zygote: Zygote, sock: socket.socket) -> None:
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
        zygote = self.ensure(env, version, code_dir)
        try:
            async with asyncio.timeout(timeout_s):
                indexed = await asyncio.shield(zygote.indexed)
        except TimeoutError:
            self.stop(zygote)
            return Indexed(error=f"importing the task modules took longer than {timeout_s:.0f}s")
        if indexed.error is not None:
            self.stop(zygote)
        return indexed

    def on_message(self, zygote: Zygote, message: Any) -> None:
        """A frame from the zygote: its index, a PID it forked, or an exit."""
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
            worker = self.workers.get(message.worker_id)
            if worker is not None:
                worker.zygote_pid = message.pid
        elif isinstance(message, Exited):
            for worker in list(self.workers.values()):
                if worker.checkpointing is not None:
                    continue  # dumped by CRIU on purpose, not a crash
                if worker.zygote_pid == message.pid and worker.zygote is zygote:
                    worker.exit_reason = describe_exit(message.status)
                    self._exits.gone(worker)

    def on_lost(self, zygote: Zygote) -> None:
        """The zygote's channel closed (or its container failed): it is gone."""
        zygote.alive = False
        if zygote not in self.stopped:
            self.stopped.append(zygote)
        if self.by_version.get(zygote.key) is zygote:
            del self.by_version[zygote.key]
        if not zygote.indexed.done():
            code = zygote.process.poll()
            zygote.indexed.set_result(
                Indexed(error=f"the zygote exited before importing the tasks (status {code})")
            )
        self._fail_starting(zygote, "the version's zygote exited")

    def _fail_starting(self, zygote: Zygote, reason: str) -> None:
        # Only this zygote's forks: a zygote stopped on purpose reports its end late, when a
        # new zygote of the same version may be starting processes already.
        workers = self.workers
        starting = [w for w in workers.values() if w.zygote is zygote and w.pid is None]
        for worker in starting:
            workers.pop(worker.id, None)
            self._isolation.drop(worker)
            self.done_starting(worker.pool)
        if starting:
            self.engine.on_spawn_failed(*zygote.key, reason)

    def stop(self, zygote: Zygote) -> None:
        """Stop the zygote: its channel closes (it then exits), or it is killed."""
        zygote.alive = False
        self.stopped = [z for z in self.stopped if z.process.poll() is None]
        if zygote not in self.stopped:
            self.stopped.append(zygote)
        if zygote.transport is not None:
            zygote.transport.close()
        elif zygote.process.poll() is None:
            zygote.process.kill()
        if self.by_version.get(zygote.key) is zygote:
            del self.by_version[zygote.key]

    def stop_if_unused(self, key: VersionKey) -> None:
        """Stop an old version's zygote once no run waits for it and no process is left."""
        zygote = self.by_version.get(key)
        if zygote is None or not zygote.indexed.done() or not self.is_stale(key):
            return  # (a zygote still importing belongs to a version being registered)
        if any(self.engine.awaiting_count((*key, machine)) for machine in MACHINES):
            return
        if not any(w.key == key for w in self.workers.values()):
            self.stop(zygote)

    def sweep(self, now: float) -> None:
        """Stop the zygotes nobody needed for ``process_idle_s``, and outdated ones."""
        workers = self.workers.values()
        used = {w.key for w in workers}
        for key, zygote in list(self.by_version.items()):
            starting = any(w.key == key and w.pid is None for w in workers)
            if zygote.outdated and not starting:
                self.stop(zygote)
            elif key in used or self.engine.current.get(key[0]) == key[1]:
                zygote.idle_since = now
            elif now - zygote.idle_since > self.config.process_idle_s:
                self.stop(zygote)
