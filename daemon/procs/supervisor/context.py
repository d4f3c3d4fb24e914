"""What every part of the supervisor shares: the engine, and the tables of run processes.

Each part (see :mod:`.core`) takes this context and the parts below it; the tables here are
the one record of which run processes exist, which are idle, and how many are starting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from ember.daemon.config import DaemonConfig
from ember.daemon.model import PoolKey, VersionKey, Worker
from ember.daemon.procs.protocol import Done, Heartbeat, Log, Spans, Wait


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


class SupervisorContext:
    """The supervisor's shared state: configuration, engine, and the process tables.

    Args:
        config: the daemon's configuration.
        engine: receives ready, message and gone notifications.
        api_socket: the API socket run processes use to trigger child runs.
    """

    def __init__(self, config: DaemonConfig, engine: SupervisorEngine, api_socket: Path) -> None:
        self.config = config
        self.engine = engine
        self.api_socket = api_socket
        # The tables are never replaced, only changed: each part holds them at hand.
        # Every run process, from its fork request until it is gone, by id.
        self.workers: dict[int, Worker] = {}
        self.idle: dict[PoolKey, list[Worker]] = {}
        # Forks asked for and not said hello yet, per pool.
        self.starting: dict[PoolKey, int] = {}
        # Bumped when an environment's variables change (see Pool.refresh_env).
        self.generation: dict[str, int] = {}

    @property
    def processes_lock(self) -> Path:
        """The file every zygote holds a shared lock on (and every process it forks)."""
        return self.config.state_dir / "processes.lock"


class SupervisorPart:
    """A part of the supervisor: the shared context, and its stable members at hand.

    (At hand, not through ``ctx``: the pool's calls are made for every run.)
    """

    def __init__(self, ctx: SupervisorContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.engine = ctx.engine
        self.workers = ctx.workers
        self.idle = ctx.idle
        self.starting = ctx.starting
        self.generation = ctx.generation

    def done_starting(self, pool: PoolKey) -> None:
        """One fork of the pool said hello, or will never."""
        self.starting[pool] = max(0, self.starting.get(pool, 0) - 1)

    def is_stale(self, key: VersionKey) -> bool:
        """Whether the version is no longer its environment's current one."""
        return self.engine.current.get(key[0]) != key[1]

    def outdated(self, worker: Worker) -> bool:
        """Whether the process was forked before its environment's variables changed."""
        return worker.generation != self.generation.get(worker.key[0], 0)
