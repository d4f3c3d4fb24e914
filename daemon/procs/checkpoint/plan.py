"""How many CRIU dumps and restores run at once, and when each restore ahead must start.

criu is CPU-bound here (a dump of the bench's run process is ~40 ms frozen plus criu's own
start-up; its page files go to the page cache), so more at once than there are cores only
makes each one slower. Dumps and restores have separate slots: a burst of dumps (many runs
starting to wait) must not hold back the restores of runs that are due.

Restores ahead are planned from measured times: the restore queue is ordered by deadline,
and the restore at rank ``r`` (``P`` at a time, each taking ``t``: the 90th percentile of
recent restores under the load they ran in, times ``SAFETY``) must start by ``deadline -
(r // P + 1) * t - margin``; the soonest of those starts, over the whole queue, is when the
next one starts.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Sequence

# A process restored ahead of its deadline should be back this long before it.
RESTORE_MARGIN_S = 0.25
# Restore times kept to estimate the next ones.
TIMES_KEPT = 64
# Restores measured before their own times alone make the plan.
CALIBRATED_AFTER = 8
# Planned restores take this much longer than measured: the plan's error is lateness.
SAFETY = 1.25


def parallelism() -> int:
    """criu commands of one kind at a time: one per core the daemon may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Timings:
    """Recent durations of one kind of criu command, in seconds.

    Args:
        first_s: the estimate before anything was measured (the smoke test's time).
    """

    def __init__(self, first_s: float) -> None:
        self._times: deque[float] = deque([first_s], maxlen=TIMES_KEPT)
        self.measured = 0

    def add(self, seconds: float) -> None:
        """Record one command's wall time."""
        self._times.append(seconds)
        self.measured += 1

    def estimate(self) -> float:
        """The 90th percentile: planning on the median made half the restores late."""
        return self._percentile(0.9)

    def median(self) -> float:
        """The median: what a long queue of them takes, one after another, per command."""
        return self._percentile(0.5)

    def _percentile(self, fraction: float) -> float:
        ordered = sorted(self._times)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class RestorePlan:
    """Timed waits to restore ahead, soonest deadline first.

    Args:
        parallel: restores that run at once.
        timings: what restores take.
        before: what dumps take: until a few restores were measured, a restore is planned
            to take as long as a dump under the same load (the smoke test's one restore,
            alone, is too hopeful: planning on it made a burst of 100 waits 2.5 s late).
        depth: how many may be restored ahead at once (``max_restored_ahead``): the plan
            covers the soonest ones only, since the others wait for room anyway (planning
            200 with room for 100 restored the first 100 a needless 55 s early).
    """

    def __init__(
        self,
        parallel: int,
        timings: Timings,
        before: Timings | None = None,
        depth: int | None = None,
    ) -> None:
        self._depth = depth
        self._parallel = parallel
        self._timings = timings
        self._before = before
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline: float, run_id: str) -> None:
        """Plan a restore for a run whose wait ends at ``deadline``."""
        heapq.heappush(self._heap, (deadline, run_id))

    def pop(self) -> str:
        """The run whose restore is due first."""
        return heapq.heappop(self._heap)[1]

    def each_s(self) -> float:
        """What one restore is planned to take (with a margin over the 90th percentile)."""
        each = self._timings.estimate()
        if self._before is not None and self._timings.measured < CALIBRATED_AFTER:
            each = max(each, self._before.estimate())
        return each * SAFETY

    def next_start(self) -> float:
        """When the soonest restore must start for every planned one to be back in time."""
        each = self.each_s()
        return min(
            deadline - (rank // self._parallel + 1) * each - RESTORE_MARGIN_S
            for rank, (deadline, _) in enumerate(sorted(self._heap)[: self._depth])
        )

    def fits(
        self,
        deadline: float,
        now: float,
        lead_s: float,
        alive: int = 0,
        pending: Sequence[float] = (),
    ) -> bool:
        """Whether one more image due at ``deadline``, made ``lead_s`` from now (its dump),
        could be restored before it comes, besides the images still to be made of the
        ``pending`` deadlines (dumps under way or queued).

        Every image due by then needs a restore slot before then, and those due within a
        second of it need room together (``depth``), with the ``alive`` processes restored
        ahead already if the deadline is near enough for them to be alive still: past
        either, a dump only makes the run late, where its process, kept, resumes it at once.
        """
        each = self.each_s()
        due = sum(1 for d, _ in self._heap if d <= deadline)
        due += sum(1 for d in pending if d <= deadline)
        slots = self._parallel * (deadline - RESTORE_MARGIN_S - now - lead_s) / each
        if due + 1 > slots:
            return False
        if self._depth is None:
            return True
        # (due within a second of it, either side: alive together around it)
        together = sum(1 for d, _ in self._heap if abs(d - deadline) < 1.0)
        together += sum(1 for d in pending if abs(d - deadline) < 1.0)
        # (those restored ahead now are due within the plan's longest lead)
        if deadline - now <= self._depth / self._parallel * each + RESTORE_MARGIN_S + 1.0:
            together += alive
        return together + 1 <= self._depth
