"""Restoring ahead: a run waiting for a deadline gets its process back before the deadline comes.

Restores take ~100 ms and run a few at a time: when many timed waits end in the same second,
restoring only at each deadline made the last ones seconds late. So the dumped runs of timed
waits are planned (:class:`~.plan.RestorePlan`, from measured restore times) and restored
early, through the one registry of :class:`~.restores.Restores`, while at most
``max_restored_ahead`` restored processes wait (each holds its own memory).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ember._types import RunStatus
from ember.daemon.model import Hold
from ember.daemon.procs.checkpoint.context import CheckpointContext
from ember.daemon.procs.checkpoint.plan import RestorePlan
from ember.daemon.procs.checkpoint.restores import Restores

if TYPE_CHECKING:
    from ember.daemon.model import ActiveRun


class RestoreAhead:
    """The timed waits whose process is restored ahead of the deadline, and their loop.

    Args:
        ctx: what the checkpointer's parts share.
        restores: the restores (the one registry, and their slots).
    """

    def __init__(self, ctx: CheckpointContext, restores: Restores) -> None:
        self._engine = ctx.engine
        self._images = ctx.images
        self._restores = restores
        self._max_ahead = ctx.config.max_restored_ahead
        # Timed waits whose process is restored ahead of the deadline: (deadline, run id).
        self._ahead = RestorePlan(
            ctx.restore_parallel,
            ctx.restore_times,
            ctx.dump_times,
            depth=max(1, ctx.config.max_restored_ahead),
        )
        self._ahead_runs: dict[str, ActiveRun] = {}
        self._ahead_changed = asyncio.Event()
        self._ahead_task: asyncio.Task[None] | None = None
        self._ahead_restores: set[asyncio.Task[None]] = set()

    def fits(self, deadline: float, lead_s: float, pending: Sequence[float] = ()) -> bool:
        """Whether an image due at ``deadline``, made ``lead_s`` from now, could be restored
        ahead of it besides those of the ``pending`` dumps (:meth:`~.plan.RestorePlan.fits`)."""
        alive = self._images.kept_count() + len(self._ahead_restores)
        return self._ahead.fits(deadline, self._engine.clock(), lead_s, alive, pending)

    def plan(self, run: ActiveRun) -> None:
        """Plan to restore a run waiting for a deadline before it comes, so it resumes on time."""
        wait = run.wait
        if wait is None or wait.kind != "DATETIME" or wait.resume_at is None:
            return
        self._ahead_runs[run.id] = run
        self._ahead.push(wait.resume_at, run.id)
        self._ahead_changed.set()
        if self._ahead_task is None or self._ahead_task.done():
            self._ahead_task = asyncio.get_running_loop().create_task(self._restore_ahead_loop())

    async def _restore_ahead_loop(self) -> None:
        room = self._images.room
        while self._ahead:
            delay = self._ahead.next_start() - self._engine.clock()
            if delay > 0:
                self._ahead_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._ahead_changed.wait()
                continue
            while self._images.kept_count() + len(self._ahead_restores) >= self._max_ahead:
                # Each restored process holds its own memory: at most so many parked ahead.
                room.clear()
                await room.wait()
            run_id = self._ahead.pop()
            run = self._ahead_runs.pop(run_id, None)
            if run is None or run.hold != Hold.CHECKPOINT or self._restores.under_way(run):
                continue
            if run.status is not RunStatus.WAITING:
                continue  # its deadline came first: the queue restores it as usual
            await self._restores.slot_free()  # pace: the next one starts when a slot is free
            task = asyncio.get_running_loop().create_task(self._restores.restore_once(run))
            self._ahead_restores.add(task)
            task.add_done_callback(self._ahead_restores.discard)
            task.add_done_callback(lambda _: room.set())
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Plan no more restores; let the ones under way finish."""
        if self._ahead_task is not None:
            self._ahead_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ahead_task
        if self._ahead_restores:
            await asyncio.wait(self._ahead_restores)
