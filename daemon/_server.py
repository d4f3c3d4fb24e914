"""The daemon: wires store, engine, supervisor and API together and serves them.

One daemon owns a state directory (enforced with a lock file). It serves the API on a Unix
socket (mode 0600) and optionally on TCP, and runs until :meth:`Daemon.request_stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO

import uvicorn

from ember._admin_types import CreatedKey
from ember._errors import ConfigError
from ember._types import VersionInfo
from ember.daemon import _store as store
from ember.daemon._api import build_app, hash_key
from ember.daemon._builds import Builder
from ember.daemon._checkpoint import Checkpointer, CriuSupport, detect
from ember.daemon._config import DaemonConfig
from ember.daemon._db import Database
from ember.daemon._engine import Engine
from ember.daemon._environments import EnvVars, check_env_name, created_key, new_key
from ember.daemon._events import EventHub
from ember.daemon._modes import PRIVATE_UMASK, tighten
from ember.daemon._schedules import Scheduler
from ember.daemon._supervisor import Supervisor
from ember.daemon._sync_api import SyncService
from ember.daemon._tls import check_tls
from ember.daemon._venvs import python_for

log = logging.getLogger("ember.daemon")


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
        self._lock_file: IO[str] | None = None
        # The umask the daemon was started with, put back at stop and given to run processes.
        self._user_umask: int | None = None
        self._server: uvicorn.Server | None = None
        self._tls_server: uvicorn.Server | None = None
        self._tls_sockets: list[socket.socket] = []
        self.sync: SyncService | None = None
        self._sockets: list[socket.socket] = []
        self.db: Database
        self.events = EventHub()
        self.engine: Engine
        self.supervisor: Supervisor
        self.env_vars: EnvVars
        self.builder: Builder
        self.scheduler: Scheduler

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
        self._lock_state_dir(state)
        fixed = await asyncio.to_thread(tighten, state)
        if fixed:
            log.warning("made %d files and folders under %s private (0600/0700)", fixed, state)
        self.db = await asyncio.to_thread(Database, self.config.db_path, self.config.durability)
        self.engine = Engine(self.config, self.db, self.events)
        self.supervisor = Supervisor(self.config, self.engine, self.config.api_socket)
        self.engine.supervisor = self.supervisor
        self.env_vars = EnvVars(self.db, self.clock, self.supervisor.refresh_env)
        await self.env_vars.load()
        self.supervisor.env_vars = self.env_vars.values
        self.supervisor.interpreter = partial(python_for, state)
        self.supervisor.child_umask = self._user_umask
        self.builder = Builder(state, self.engine, self.supervisor, self.clock, self._on_current)
        self.scheduler = Scheduler(self.db, self.engine, self.clock)
        await self._choose_checkpoints()
        await self.supervisor.start()
        recovered = await self.engine.recover()
        await self.scheduler.start()
        if self.config.sync:
            self.sync = SyncService(self, self.config.sync)
        await self._serve_api()
        if self.sync is not None:
            await self.sync.start()
        # What start-up loaded (recovered runs, their timers, the imports) lives long: out of
        # the collector's sight, full collections no longer walk it again and again.
        gc.freeze()
        log.info(
            "Ember daemon %s ready on %s (%d runs recovered)",
            self.pid,
            self.config.api_socket,
            recovered,
        )

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
        elif wanted == "criu":
            raise ConfigError(
                f"checkpoint = 'criu' but {self.criu.reason}; use checkpoint = 'auto' to park "
                "waiting runs instead, or see `ember doctor`"
            )
        else:
            log.info("checkpoints off, waiting runs park: %s", self.criu.reason)
        log.info("long waits are held by %s", self.checkpoint_strategy)

    def _lock_state_dir(self, state: Path) -> None:
        lock = open(state / "daemon.lock", "a+")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(
                f"another Ember daemon (pid {owner}) already uses the state directory {state}: "
                "stop it, or give this one another EMBER_STATE_DIR"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(self.pid))
        lock.flush()
        self._lock_file = lock

    async def _serve_api(self) -> None:
        path = self.config.api_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            if await _answers(path):
                raise ConfigError(
                    f"a daemon already listens on {path}: stop it, or set EMBER_SOCKET elsewhere"
                )
            path.unlink()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(path))
        os.chmod(path, 0o600)
        self._sockets = [unix]
        tls = self.config.tls_cert is not None
        if self.config.tcp:
            tcp = self._tcp_socket(self.config.tcp)
            # uvicorn applies one TLS setting to all its sockets: with TLS the TCP socket
            # gets a server of its own, and the Unix socket stays plain.
            (self._tls_sockets if tls else self._sockets).append(tcp)
            await self._ensure_api_key()
        app = build_app(self)
        self._server = await self._start_server(app, self._sockets)
        if self._tls_sockets:
            self._tls_server = await self._start_server(
                app,
                self._tls_sockets,
                ssl_certfile=str(self.config.tls_cert),
                ssl_keyfile=str(self.config.tls_key),
            )

    async def _start_server(
        self, app: object, sockets: list[socket.socket], **tls: str
    ) -> uvicorn.Server:
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            lifespan="off",
            access_log=False,
            log_level="warning",
            http="httptools",
            loop="none",
            date_header=False,
            server_header=False,
            timeout_graceful_shutdown=1,
            **tls,  # type: ignore[arg-type]
        )
        config.load()
        server = uvicorn.Server(config)
        # startup()/shutdown() rather than serve(): the daemon owns its signals and its loop.
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=sockets)
        return server

    def _tcp_socket(self, address: str) -> socket.socket:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--tcp {address!r} must be host:port, e.g. 127.0.0.1:8030")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
        return sock

    async def _ensure_api_key(self) -> None:
        """Over TCP a key is required: make one for ``dev`` if none exists yet."""
        if await self.db.read(store.has_keys):
            return
        key = "em_" + secrets.token_urlsafe(32)
        now = self.clock()
        await self.db.write(lambda conn: store.insert_key(conn, hash_key(key), "dev", "first", now))
        key_file = self.config.state_dir / "dev.key"
        key_file.touch(mode=0o600)
        key_file.write_text(key + "\n")
        log.warning("created an API key for environment dev in %s", key_file)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until :meth:`request_stop`, then stop."""
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop serving and stop every process; the table keeps what was in flight."""
        if self.sync is not None:
            await self.sync.close()
        if hasattr(self, "engine"):
            self.engine.begin_close()
        for server, sockets in (
            (self._server, self._sockets),
            (self._tls_server, self._tls_sockets),
        ):
            if server is not None:
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await server.shutdown(sockets=sockets)
        self.config.api_socket.unlink(missing_ok=True)
        if hasattr(self, "builder"):
            await self.builder.close()
        if hasattr(self, "scheduler"):
            await self.scheduler.close()
        if hasattr(self, "engine"):
            await self.engine.close()
        if hasattr(self, "supervisor"):
            await self.supervisor.stop()
        if hasattr(self, "db"):
            await asyncio.to_thread(self.db.close)
        if self._lock_file is not None:
            self._lock_file.close()
        if self._user_umask is not None:
            os.umask(self._user_umask)

    # -- versions, environments -------------------------------------------------------

    async def register_version(
        self, env: str, archive: bytes, *, promote: bool, wait: bool = True
    ) -> VersionInfo:
        """Build a version from a project archive (see :mod:`ember.daemon._builds`).

        Identical content to the current version registers nothing and returns it.
        """
        return await self.builder.register(check_env_name(env), archive, promote=promote, wait=wait)

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
        await self.db.write(lambda conn: store.insert_key(conn, key_hash, env, name, now))
        return created_key(key, env, name, now, key_hash)


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True
