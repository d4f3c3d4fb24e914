"""What the route handlers need of the daemon, as a Protocol.

The handlers take the daemon as an :class:`ApiDaemon` rather than the class in
:mod:`ember.daemon.api.server`, which builds the app from their route tables: so the server
imports the routes and no route module imports the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ember._admin_types import CreatedKey
    from ember._types import VersionInfo
    from ember.daemon.builds.builder import Builder
    from ember.daemon.config import DaemonConfig
    from ember.daemon.engine.core import Engine
    from ember.daemon.engine.environments import EnvVars
    from ember.daemon.engine.events import EventHub
    from ember.daemon.engine.schedules import Scheduler
    from ember.daemon.procs.checkpoint.support import CriuSupport
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.db import Database


class Forwarding(Protocol):
    """The daemon's forwarded environments (``ember.daemon.api.sync.SyncService``)."""

    def forwards(self, env: str) -> bool:
        """True when this environment's runs go to a remote daemon."""
        ...


class ApiDaemon(Protocol):
    """The daemon as the API sees it: its parts, its identity, and the actions routes take."""

    config: DaemonConfig
    clock: Callable[[], float]
    pid: int
    started_at: float
    checkpoint_strategy: str
    criu: CriuSupport | None
    events: EventHub

    @property
    def db(self) -> Database:
        """The state database."""
        ...

    @property
    def engine(self) -> Engine:
        """The engine."""
        ...

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor of run processes."""
        ...

    @property
    def env_vars(self) -> EnvVars:
        """The environments' variables."""
        ...

    @property
    def builder(self) -> Builder:
        """The builder of versions."""
        ...

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler."""
        ...

    @property
    def sync(self) -> Forwarding | None:
        """The forwarded environments, when the daemon forwards any."""
        ...

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
        """Build a version from a project archive (and its Docker image with ``image``)."""
        ...

    async def promote(self, env: str, version_id: str) -> VersionInfo:
        """Make a READY version the current one of its environment."""
        ...

    async def create_key(self, env: str, name: str) -> CreatedKey:
        """Make an API key for an environment."""
        ...
