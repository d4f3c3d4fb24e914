"""What every part of the engine shares: its stores, its clock, and the daemon's wiring.

The engine is parts along a run's lifecycle (see docs/architecture.md): each takes this
context and the parts below it. What the daemon sets after the engine is built (the
supervisor, the checkpointer once a CRIU smoke test passed, the disk guard) and what it
changes at run time (draining, closing) lives here once, so every part reads the same value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ember.daemon.config import DaemonConfig
from ember.daemon.engine.events import EventHub
from ember.daemon.engine.queue import RunQueue
from ember.daemon.engine.traces import SpanIngest
from ember.daemon.store.blobs import BlobStore
from ember.daemon.store.db import Database

if TYPE_CHECKING:
    from ember.daemon.procs.checkpoint.checkpointer import Checkpointer
    from ember.daemon.procs.supervisor import Supervisor
    from ember.daemon.store.diskguard import DiskGuard

log = logging.getLogger("ember.daemon")


class EngineContext:
    """The engine's shared state: configuration, database, blobs, events, clock, queue.

    Args:
        config: the daemon's configuration.
        db: the state database.
        events: where run changes are published.
        clock: wall-clock seconds; every timestamp and timer of the engine, its journal, the
            supervisor and the checkpointer reads it (the daemon's clock, injectable in tests).
    """

    def __init__(
        self,
        config: DaemonConfig,
        db: Database,
        events: EventHub,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.db = db
        self.events = events
        self.clock = clock
        self.blobs = BlobStore(config.state_dir / "blobs")
        self.queue = RunQueue(clock)
        # The run processes' spans, stored with their runs and exported (engine/traces.py).
        self.traces = SpanIngest(db, self.spawn)
        self.supervisor: Supervisor
        self.checkpointer: Checkpointer | None = None
        # How long waits are held; the daemon sets "criu" when a checkpoint smoke test passed.
        self.strategy = "replay" if config.checkpoint == "replay" else "park"
        # Set by the daemon: refuses new runs while the disk is nearly full (store/diskguard.py).
        self.disk_guard: DiskGuard | None = None
        # Set when a SIGTERM drain begins (ops/drain.py): no attempt starts from then on.
        self.draining = False
        # Set when the daemon begins to stop: long polls are answered, failed writes not retried.
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())


class EnginePart:
    """A part of the engine: the shared context, and its stable members at hand."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.db = ctx.db
        self.blobs = ctx.blobs
        self.events = ctx.events
        self.clock = ctx.clock
        self.queue = ctx.queue
