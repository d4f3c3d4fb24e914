"""What every part of the checkpointer shares: the engine, the supervisor, criu, the images.

The checkpointer is parts along a checkpoint's life (see docs/architecture.md): the dumps
(:mod:`.dumps`), the restores (:mod:`.restores`) and the restores ahead of a deadline
(:mod:`.ahead`). Each takes this context, built once by the façade
(:class:`~ember.daemon.procs.checkpoint.checkpointer.Checkpointer`), and the parts it needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ember.daemon.config import DaemonConfig
from ember.daemon.procs.checkpoint.bases import PageStore
from ember.daemon.procs.checkpoint.criu import Criu
from ember.daemon.procs.checkpoint.images import ImageStore
from ember.daemon.procs.checkpoint.plan import Timings, parallelism

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Snapshot
    from ember.daemon.procs.checkpoint.support import CriuSupport
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.db import Database


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


class CheckpointContext:
    """The checkpointer's shared state: the engine and supervisor, criu, images, timings.

    Built from the arguments of the façade,
    :class:`~ember.daemon.procs.checkpoint.checkpointer.Checkpointer` (see there).
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
        self.criu = Criu(support.binary)
        self.criu_version = support.version
        self.config = config
        self.engine = engine
        self.supervisor = supervisor
        self.pages = PageStore(config.state_dir / "checkpoint-bases")
        self.images = ImageStore(config.state_dir / "checkpoints", self.pages)
        # Separate slots: a burst of dumps must not hold back the restores of runs now due.
        self.dump_parallel = self.restore_parallel = parallelism()
        self.dump_times = Timings((support.dump_ms or 200.0) / 1000)
        self.restore_times = Timings((support.restore_ms or 200.0) / 1000)
        # Since the daemon started, for `ember doctor`: dumps, failures, retries, fallbacks.
        self.counters: Counter[str] = Counter()


class CheckpointPart:
    """A part of the checkpointer: the shared context, and its members every part uses."""

    def __init__(self, ctx: CheckpointContext) -> None:
        self.ctx = ctx
        self._criu = ctx.criu
        self._criu_version = ctx.criu_version
        self._engine = ctx.engine
        self._supervisor = ctx.supervisor
        self._images = ctx.images
        self._pages = ctx.pages
