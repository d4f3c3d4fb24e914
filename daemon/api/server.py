"""The daemon: wires store, engine, supervisor and API together and serves them.

One daemon owns a state directory (enforced with a lock file). It serves the API on a Unix
socket (mode 0600) and optionally on TCP, and runs until :meth:`Daemon.request_stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import uvicorn

from ember._admin_types import CreatedKey
from ember._errors import ConfigError
from ember._types import VersionInfo
from ember.daemon.api.app import build_app, ensure_api_key, hash_key
from ember.daemon.api.limits import ConnectionGate, fit_tcp_cap, guarded_protocol, raise_fd_limit
from ember.daemon.api.sockets import answers, listen_unix, start_server, tcp_socket
from ember.daemon.api.sync import SyncService
from ember.daemon.api.tls import check_tls
from ember.daemon.builds.builder import Builder
from ember.daemon.builds.images import VersionImages
from ember.daemon.builds.venvs import python_for
from ember.daemon.config import DaemonConfig
from ember.daemon.engine.core import Engine
from ember.daemon.engine.environments import EnvVars, check_env_name, created_key, new_key
from ember.daemon.engine.events import EventHub
from ember.daemon.engine.schedules import Scheduler
from ember.daemon.ops.drain import DrainReport, drain
from ember.daemon.ops.logrotate import rotate_logs
from ember.daemon.ops.otlp import OtlpExporter
from ember.daemon.ops.systemd import Notifier, keep_posted, listen_sockets, status_line
from ember.daemon.procs.checkpoint.checkpointer import Checkpointer
from ember.daemon.procs.checkpoint.kdat import kdat_cache_problem
from ember.daemon.procs.checkpoint.support import CriuSupport, detect
from ember.daemon.procs.supervisor import Supervisor
from ember.daemon.store import keys as keys_store
from ember.daemon.store.db import Database
from ember.daemon.store.diskguard import DiskGuard
from ember.daemon.store.modes import PRIVATE_UMASK, lock_state_dir, tighten
from ember.daemon.store.retention import prune_loop

log = logging.getLogger("ember.daemon")


@dataclass(frozen=True, slots=True)
class _Parts:
    """What the daemon builds on its database: made together, so stop closes all or none."""

    engine: Engine
    supervisor: Supervisor
    env_vars: EnvVars
    builder: Builder
    scheduler: Scheduler


class Daemon:
    """An Ember daemon.

    Args:
        config: its configuration.
        clock: wall-clock seconds; injectable so tests can move across days.
    """

    def __init__(self, config: DaemonConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.pid = os.getpid()
        self.started_at = clock()
        self.checkpoint_strategy = "park"
        self.criu: CriuSupport | None = None
        self._stop = asyncio.Event()
        # A second stop request (SIGTERM/SIGINT again) ends the drain's grace at once.
        self._force = asyncio.Event()
        self.notifier = Notifier(config.systemd)
        self.last_drain: DrainReport | None = None
        self._activated = False  # the API socket came from systemd (socket activation)
        self._chores: list[asyncio.Task[None]] = []
        self._lock_file: IO[str] | None = None
        # The umask the daemon was started with, put back at stop and given to run processes.
        self._user_umask: int | None = None
        self._server: uvicorn.Server | None = None
        self._tls_server: uvicorn.Server | None = None
        self._tls_sockets: list[socket.socket] = []
        self.sync: SyncService | None = None
        # Spans to an OTLP collector, when otlp_endpoint (or OTEL_EXPORTER_OTLP_*) is set.
        self.otlp: OtlpExporter | None = None
        self._sockets: list[socket.socket] = []
        self.gate: ConnectionGate | None = None
        self.events = EventHub()
        # Made by start(): the database, then the parts built on it, all at once.
        self._db: Database | None = None
        self._parts: _Parts | None = None

    # -- parts ----------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """The state database (from :meth:`start` on)."""
        if self._db is None:
            raise RuntimeError("the daemon is not started: await Daemon.start() first")
        return self._db

    @property
    def engine(self) -> Engine:
        """The engine (from :meth:`start` on)."""
        return self._started().engine

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor of zygotes and run processes (from :meth:`start` on)."""
        return self._started().supervisor

    @property
    def env_vars(self) -> EnvVars:
        """The environments' variables (from :meth:`start` on)."""
        return self._started().env_vars

    @property
    def builder(self) -> Builder:
        """The builder of versions (from :meth:`start` on)."""
        return self._started().builder

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of cron schedules (from :meth:`start` on)."""
        return self._started().scheduler

    def _started(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError("the daemon is not started: await Daemon.start() first")
        return self._parts

    def _build(self, db: Database, state: Path) -> _Parts:
        """The parts on the database, wired; nothing here does I/O."""
        engine = Engine(self.config, db, self.events, self.clock)
        supervisor = Supervisor(self.config, engine, self.config.api_socket)
        engine.supervisor = supervisor
        supervisor.interpreter = partial(python_for, state)
        images = VersionImages(self.config)
        supervisor.docker = images.runtime()
        supervisor.child_umask = self._user_umask
        engine.disk_guard = DiskGuard(state, self.config.min_free_bytes)
        return _Parts(
            engine=engine,
            supervisor=supervisor,
            env_vars=EnvVars(db, self.clock, supervisor.refresh_env),
            builder=Builder(state, engine, supervisor, self.clock, self._on_current, images),
            scheduler=Scheduler(db, engine, self.clock),
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state, recover runs, start the supervisor and the API.

        Raises:
            ConfigError: another daemon owns the state directory, or a socket is taken.
        """
        check_tls(self.config.tls_cert, self.config.tls_key, self.config.tcp)
        state = self.config.state_dir
        # Everything the daemon writes in its state is private: the database, logs, blobs,
        # code, tokens and CRIU images (a process's memory). Task code keeps the user's umask.
        self._user_umask = os.umask(PRIVATE_UMASK)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = lock_state_dir(state, self.pid)
        fixed = await asyncio.to_thread(tighten, state)
        if fixed:
            log.warning("made %d files and folders under %s private (0600/0700)", fixed, state)
        self._db = await asyncio.to_thread(Database, self.config.db_path, self.config.durability)
        self._parts = self._build(self._db, state)
        await self.env_vars.load()
        self.supervisor.env_vars = self.env_vars.values
        await self._choose_checkpoints()
        await self.supervisor.start()
        recovered = await self.engine.recover()
        await self.scheduler.start()
        if self.config.sync:
            self.sync = SyncService(self, self.config.sync)
            # Known before the API serves: a request for one never finds it missing (a 500).
            await self.sync.db.add_envs(self.config.sync)
        await self._serve_api()
        if self.sync is not None:
            await self.sync.start()
        # What start-up loaded (recovered runs, their timers, the imports) lives long: out of
        # the collector's sight, full collections no longer walk it again and again.
        gc.freeze()
        log.info(
            "Ember daemon %s ready on %s (%d runs recovered)",
            self.pid,
            "a socket from systemd" if self._activated else self.config.api_socket,
            recovered,
        )
        # Only now: systemd starts what depends on us once recovery is done and we listen.
        self.notifier.ready(status_line(self.engine.stats()))
        self._start_chores()

    def _start_chores(self) -> None:
        """Loops beside the engine: watchdog and status, log rotation, retention."""
        loop = asyncio.get_running_loop()
        if self.notifier.enabled:
            self._chores.append(loop.create_task(keep_posted(self.notifier, self._status)))
        self._chores.append(
            loop.create_task(
                rotate_logs(
                    self.config.run_logs_dir, self.config.log_max_bytes, self.config.log_backups
                )
            )
        )
        if self.config.otlp_endpoint:
            self.otlp = OtlpExporter(self.config.otlp_endpoint, self.config.otlp_headers)
            self.engine.traces.sinks.append(self.otlp)
            self.otlp.start()
        if (retention_s := self.config.retention_s) is not None:
            every_s = self.config.prune_every_s
            prune = prune_loop(self.db, self.engine.blobs, retention_s, self.clock, every_s)
            self._chores.append(loop.create_task(prune))

    def _status(self) -> str | None:
        """systemd's STATUS= line; none while draining (the drain posts its own)."""
        return None if self.engine.draining else status_line(self.engine.stats())

    async def _choose_checkpoints(self) -> None:
        """Pick how long waits are held: CRIU where a real dump/restore works, else park."""
        wanted = self.config.checkpoint
        if wanted not in ("auto", "criu"):
            self.checkpoint_strategy = wanted
            return
        self.criu = await asyncio.to_thread(detect, self.config)
        if self.criu.ok and self.criu.binary is not None:
            self.engine.strategy = "criu"
            self.engine.checkpointer = Checkpointer(
                self.criu, self.config, self.engine, self.supervisor
            )
            self.supervisor.pidns = True
            self.checkpoint_strategy = "criu"
            problem = kdat_cache_problem(self.criu.check_ms)
            if problem is not None:
                log.warning(problem)
        elif wanted == "criu":
            raise ConfigError(
                f"checkpoint = 'criu' but {self.criu.reason}; use checkpoint = 'auto' to park "
                "waiting runs instead, or see `ember doctor`"
            )
        else:
            log.info("checkpoints off, waiting runs park: %s", self.criu.reason)
        log.info("long waits are held by %s", self.checkpoint_strategy)

    async def _serve_api(self) -> None:
        activated = listen_sockets(self.config.systemd)
        if activated:
            # systemd made the socket (its path, owner and mode come from the .socket unit)
            # and queues connections while we start: no bind, and no unlink at stop.
            self._activated = True
            self._sockets = activated
        else:
            self._sockets = [await self._bind_unix(self.config.api_socket)]
        tls = self.config.tls_cert is not None
        if self.config.tcp:
            tcp = tcp_socket(self.config.tcp)
            # uvicorn applies one TLS setting to all its sockets: with TLS the TCP socket
            # gets a server of its own, and the Unix socket stays plain.
            (self._tls_sockets if tls else self._sockets).append(tcp)
            await ensure_api_key(self.db, self.clock, self.config.state_dir)
        # More descriptors than the usual 1,024, and a TCP cap under them: a TCP flood is
        # refused with a 503 while the Unix socket keeps its room.
        fd_limit = raise_fd_limit()
        # Fitted (and warned about) only when TCP is served: the Unix socket has no cap.
        total = fit_tcp_cap(self.config.max_tcp_connections, fd_limit) if self.config.tcp else 0
        self.gate = ConnectionGate(self.config.max_connections_per_client, total)
        protocol = guarded_protocol(
            self.gate,
            max_header_bytes=self.config.max_header_bytes,
            idle_timeout_s=self.config.idle_timeout_s,
            request_timeout_s=self.config.request_timeout_s,
        )
        app = build_app(self)
        self._server = await start_server(app, protocol, self._sockets)
        if self._tls_sockets:
            self._tls_server = await start_server(
                app,
                protocol,
                self._tls_sockets,
                ssl_certfile=str(self.config.tls_cert),
                ssl_keyfile=str(self.config.tls_key),
            )

    async def _bind_unix(self, path: Path) -> socket.socket:
        if await answers(path):
            raise ConfigError(
                f"a daemon already listens on {path}: stop it, or set EMBER_SOCKET elsewhere"
            )
        return listen_unix(path, self.config)

    def request_stop(self) -> None:
        """Ask :meth:`run` to drain and stop; asked again, to stop at once (signal-safe)."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until :meth:`request_stop`, drain (see ``ops/drain.py``), then stop."""
        await self.start()
        try:
            await self._stop.wait()
            self.last_drain = await drain(
                self.engine,
                self.supervisor,
                self.notifier,
                self.config.shutdown_grace_s,
                self._force,
            )
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop serving and stop every process; the table keeps what was in flight."""
        if self.sync is not None:
            await self.sync.close()
        for chore in self._chores:
            chore.cancel()
        parts = self._parts
        if parts is not None:
            parts.engine.begin_close()
        for server, sockets in (
            (self._server, self._sockets),
            (self._tls_server, self._tls_sockets),
        ):
            if server is not None:
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await server.shutdown(sockets=sockets)
        if not self._activated:
            self.config.api_socket.unlink(missing_ok=True)
        if parts is not None:
            await parts.builder.close()
            await parts.scheduler.close()
            await parts.engine.close()
            await parts.supervisor.stop()
        if self.otlp is not None:
            await self.otlp.stop()  # after the engine: the last runs' spans go too
        if self._db is not None:
            await asyncio.to_thread(self._db.close)
        if self._lock_file is not None:
            self._lock_file.close()
        if self._user_umask is not None:
            os.umask(self._user_umask)
        self.notifier.close()

    # -- versions, environments -------------------------------------------------------

    async def register_version(
        self,
        env: str,
        archive: bytes,
        *,
        promote: bool,
        wait: bool = True,
        image: bool = False,
        push: str | None = None,
    ) -> VersionInfo:
        """Build a version from a project archive (see :mod:`ember.daemon.builds.builder`).

        Identical content to the current version registers nothing and returns it.
        """
        return await self.builder.register(
            check_env_name(env), archive, promote=promote, wait=wait, image=image, push=push
        )

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version the current one of its environment."""
        return await self.builder.promote(env, version_id)

    async def _on_current(self, env: str) -> None:
        """A version became current: old versions' processes go, declared schedules sync."""
        self.supervisor.drop_stale(env)
        record = self.engine.versions[(env, self.engine.current[env])]
        await self.scheduler.sync_declared(env, record.tasks.values())

    async def create_key(self, env: str, name: str) -> CreatedKey:
        """Make an API key for an environment; the key itself is returned only here."""
        key = new_key(check_env_name(env))
        now = self.clock()
        key_hash = hash_key(key)
        await self.db.write(lambda conn: keys_store.insert_key(conn, key_hash, env, name, now))
        return created_key(key, env, name, now, key_hash)
