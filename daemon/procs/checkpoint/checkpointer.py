"""The checkpointer: the one object the engine, the drain and the API talk to about CRIU.

A thin façade over the parts (:mod:`.dumps`, :mod:`.restores`, :mod:`.ahead`, the images of
:mod:`.images`), built on one :class:`~.context.CheckpointContext`.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ember.daemon.config import DaemonConfig
from ember.daemon.procs.checkpoint.ahead import RestoreAhead
from ember.daemon.procs.checkpoint.context import CheckpointContext, CheckpointEngine
from ember.daemon.procs.checkpoint.dumps import Dumps
from ember.daemon.procs.checkpoint.restores import Restores
from ember.daemon.procs.checkpoint.support import CriuSupport

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun, Worker
    from ember.daemon.procs.supervisor import Supervisor


class Checkpointer:
    """Dumps and restores the processes of waiting runs.

    An image is restored at most once: every restore (ahead of the deadline or at it) goes
    through one registry, and the run's state is checked again once a slot is free. The
    image stays on disk until the resumed run reports back from the restored process, so a
    daemon that dies in between restores it again on its next start.

    Args:
        support: the CRIU that passed :func:`~.support.detect` (its binary and version).
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
        ctx = CheckpointContext(support, config, engine, supervisor)
        self.counters: Counter[str] = ctx.counters  # (for `ember doctor`; see the context)
        self._dumps = Dumps(ctx)
        self._restores = Restores(ctx, self._dumps)
        self._ahead = RestoreAhead(ctx, self._restores)
        self._dumps.restorable = self._ahead.fits  # (a dump whose restore cannot be in time)
        images = ctx.images
        # What the engine calls, answered by the part that owns it.
        self.checkpoint_executing = self._dumps.checkpoint_executing
        self.restore = self._restores.restore
        self.restore_ahead = self._ahead.plan
        self.close = self._ahead.close
        self.reported = images.reported
        self.lost = images.lost
        self.discard = images.discard
        self.prune = images.prune

    async def checkpoint(self, run: ActiveRun, worker: Worker) -> None:
        """Suspend the run's process and dump it; on failure it stays parked."""
        if await self._dumps.checkpoint(run, worker):
            self._ahead.plan(run)
