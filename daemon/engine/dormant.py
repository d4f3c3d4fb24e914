"""Dormant runs: DELAYED runs due beyond a horizon live in the table alone until it nears.

A million runs delayed by a month cost no memory: recovery loads only those due within
``delayed_in_memory_s``, the sweeper moves the horizon and loads what it reaches, and an
action on a dormant run (cancel, reschedule, a debounce) brings it into memory first.
"""

from __future__ import annotations

import math

from ember._types import RunStatus
from ember.daemon.engine.context import EngineContext, EnginePart
from ember.daemon.engine.dispatch import Dispatch
from ember.daemon.engine.lifecycle import Lifecycle
from ember.daemon.model import ActiveRun
from ember.daemon.store import runs as store


class DormantRuns(EnginePart):
    """The horizon of DELAYED runs held in memory, and loading those it reaches.

    Args:
        ctx: the engine's shared state.
        lifecycle: the active runs.
        dispatch: where a loaded run is admitted.
    """

    def __init__(self, ctx: EngineContext, lifecycle: Lifecycle, dispatch: Dispatch) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
        self.active = lifecycle.active
        self.dispatch = dispatch
        # DELAYED runs due later than this live in the table alone (set on recovery).
        self.horizon = math.inf

    def dormant(self, run: ActiveRun) -> bool:
        """A DELAYED run due beyond the horizon: the table alone holds it until it nears."""
        return (
            run.status is RunStatus.DELAYED
            and run.delay_until is not None
            and run.delay_until > self.horizon
        )

    def load_delayed(self, now: float) -> None:
        """Bring in the DELAYED runs that the moving horizon now reaches.

        The read is synchronous on the loop, and the horizon moves with it: a trigger that
        commits around it either finds the new horizon and keeps its run, or committed
        before the read, which then finds the run.
        """
        horizon = now + self.config.delayed_in_memory_s
        # Often enough that a run is in memory long before it is due, and rarely a read.
        if horizon - self.horizon < min(60.0, self.config.delayed_in_memory_s / 10):
            return
        after = self.horizon
        self.horizon = horizon
        for run in self.db.read_point(lambda conn: store.load_delayed(conn, after, horizon)):
            if run.id not in self.active:
                self.active[run.id] = run
                self.dispatch.admit(run, now)
        self.lifecycle.update_idle()

    def held(self, run_id: str) -> ActiveRun | None:
        """The run if it is active, bringing a dormant DELAYED run into memory first."""
        run = self.active.get(run_id)
        if run is not None:
            return run
        run = self.db.read_point(lambda conn: store.load_delayed_run(conn, run_id))
        if run is not None:
            self.active[run.id] = run
            self.dispatch.admit(run, self.clock())
            self.lifecycle.update_idle()
        return run
