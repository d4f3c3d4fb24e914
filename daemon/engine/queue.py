"""The in-memory run queue: lanes with concurrency limits, priority, and fairness.

A lane is one (environment, queue, concurrency key). As in Trigger.dev, each concurrency key
gets its own copy of the queue's limit. Inside a lane runs leave in order of
``queued_at - priority`` (a priority of 10 dequeues as if the run were 10 s older); across
lanes the queue takes turns, so one busy queue cannot starve the others.

A queue with a rate limit (``_ratelimit.py``) also keeps a lane out of turn while its window
is full: the lane is *blocked* until the window frees a place, and :attr:`RunQueue.wake_at`
tells the engine when to look again.

This is a cache of the runs table, rebuilt from it on start. Entries are removed lazily: a
run canceled or expired while queued is skipped when it reaches the head.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ember._types import RunStatus
from ember.daemon.engine.ratelimit import RateLimiter
from ember.daemon.model import ActiveRun

LaneKey = tuple[str, str, str | None]


@dataclass(slots=True, eq=False)
class Lane:
    """One queue (or one concurrency key of it) of one environment."""

    key: LaneKey
    limit: int | None
    running: int = 0
    queued: int = 0
    paused: bool = False
    heap: list[tuple[float, int, ActiveRun]] = field(default_factory=list)

    @property
    def has_room(self) -> bool:
        """True when one more run may start in this lane."""
        return not self.paused and (self.limit is None or self.running < self.limit)


class RunQueue:
    """Queued runs of every environment, ready to be taken in fair order.

    Args:
        clock: wall-clock seconds (the engine's): rate windows are in its time.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lanes: dict[LaneKey, Lane] = {}
        self._limits: dict[tuple[str, str], int | None] = {}
        self._paused: set[tuple[str, str]] = set()
        self._ready: deque[Lane] = deque()
        self._in_ready: set[LaneKey] = set()
        self._seq = itertools.count()
        self.size = 0
        self.rates = RateLimiter()
        # Lanes held back by a full rate window, and the earliest time one may free.
        self._blocked: dict[LaneKey, tuple[Lane, float]] = {}
        self.wake_at = math.inf

    def set_limit(self, env: str, queue: str, limit: int | None) -> None:
        """Set a queue's concurrency limit (per concurrency key)."""
        self._limits[(env, queue)] = limit
        for lane in self._lanes.values():
            if lane.key[0] == env and lane.key[1] == queue:
                lane.limit = limit
                self._mark_ready(lane)

    def limit(self, env: str, queue: str) -> int | None:
        """A queue's concurrency limit, None when unlimited."""
        return self._limits.get((env, queue))

    def set_paused(self, env: str, queue: str, paused: bool) -> None:
        """Pause or resume taking runs from a queue."""
        if paused:
            self._paused.add((env, queue))
        else:
            self._paused.discard((env, queue))
        for lane in self._lanes.values():
            if lane.key[:2] == (env, queue):
                lane.paused = paused
                self._mark_ready(lane)

    def lane(self, run: ActiveRun) -> Lane:
        """The lane of a run, created on first use."""
        key = (run.env, run.queue, run.concurrency_key)
        lane = self._lanes.get(key)
        if lane is None:
            lane = Lane(
                key,
                self._limits.get((run.env, run.queue)),
                paused=(run.env, run.queue) in self._paused,
            )
            self._lanes[key] = lane
        return lane

    def push(self, run: ActiveRun, queued_at: float) -> None:
        """Add a QUEUED run."""
        lane = self.lane(run)
        heapq.heappush(lane.heap, (queued_at - run.priority, next(self._seq), run))
        run.in_queue = True
        lane.queued += 1
        self.size += 1
        self._mark_ready(lane)

    def _mark_ready(self, lane: Lane) -> None:
        if lane.heap and lane.has_room and lane.key not in self._in_ready:
            self._ready.append(lane)
            self._in_ready.add(lane.key)

    def pop(self, now: float) -> ActiveRun | None:
        """Take the next run in fair order and count it as running in its lane.

        A run that starts a new attempt in a rate-limited queue takes a reservation in the
        rate window (``run.rate_window``), which its attempt start turns into a start time.
        """
        rates = self.rates
        while self._ready:
            lane = self._ready.popleft()
            self._in_ready.discard(lane.key)
            if not lane.has_room:
                continue
            wkey = rates.window_key(*lane.key) if rates.specs else None
            if wkey is not None and lane.heap:
                until = rates.blocked_until(wkey, now)
                if until is not None:
                    self._blocked[lane.key] = (lane, until)
                    self.wake_at = min(self.wake_at, until)
                    continue
            while lane.heap:
                _, _, run = heapq.heappop(lane.heap)
                if run.in_queue and run.status is RunStatus.QUEUED:
                    run.in_queue = False
                    lane.queued -= 1
                    self.size -= 1
                    lane.running += 1
                    if wkey is not None and run.hold is None:
                        rates.reserve(wkey)
                        run.rate_window = wkey
                    self._mark_ready(lane)
                    return run
            self._drop_if_idle(lane)
        return None

    def unblock(self) -> None:
        """Give blocked lanes their turn again (a rate window may have freed a place)."""
        blocked, self._blocked = self._blocked, {}
        self.wake_at = math.inf
        for lane, _ in blocked.values():
            if self._lanes.get(lane.key) is lane:  # (not a lane dropped meanwhile)
                self._mark_ready(lane)

    def blocked_until(self, run: ActiveRun) -> float | None:
        """When the rate limit lets the run's lane start again, if it holds the lane back."""
        entry = self._blocked.get((run.env, run.queue, run.concurrency_key))
        return entry[1] if entry is not None else None

    def rate_blocked_until(self, env: str, queue: str) -> float | None:
        """The soonest a blocked lane of the queue may start a run, if any is blocked."""
        times = [until for key, (_, until) in self._blocked.items() if key[:2] == (env, queue)]
        return min(times) if times else None

    def why_queued(self, run: ActiveRun) -> str | None:
        """Why a QUEUED run has not started yet, as a user should read it."""
        if not run.in_queue:
            return None
        lane = self._lanes.get((run.env, run.queue, run.concurrency_key))
        if lane is None:
            return None
        if lane.paused:
            return f"queue {run.queue!r} is paused; `ember queues resume {run.queue}` resumes it"
        until = self.blocked_until(run)
        if until is not None:
            spec = self.rates.specs[(run.env, run.queue)]
            return f"rate limit of queue {run.queue!r} reached ({spec.describe()})" + (
                f"; the next may start in {max(0.0, until - self.clock()):.1f}s"
                if until != math.inf
                else ""
            )
        if lane.limit is not None and lane.running >= lane.limit:
            return f"queue {run.queue!r} is at its concurrency limit ({lane.limit})"
        return None

    def started(self, run: ActiveRun, at: float) -> None:
        """The run's new attempt started at ``at``: its reservation becomes a start."""
        if run.rate_window is not None:
            self.rates.started(run.rate_window, at)
            run.rate_window = None

    def discard(self, run: ActiveRun) -> None:
        """Forget a QUEUED run that leaves the queue another way (canceled, expired).

        Its heap entry stays and is skipped when it reaches the head.
        """
        lane = self._lanes.get((run.env, run.queue, run.concurrency_key))
        if lane is not None and run.in_queue:
            run.in_queue = False
            lane.queued -= 1
            self.size -= 1

    def push_back(self, run: ActiveRun, queued_at: float) -> None:
        """Return a run taken by :meth:`pop` that could not start."""
        self.release(run)
        self.push(run, queued_at)

    def release(self, run: ActiveRun) -> None:
        """A run of this lane stopped running: free its place."""
        if run.rate_window is not None:
            # It never started: its place in the rate window is free again.
            self.rates.unreserve(run.rate_window)
            run.rate_window = None
            self.unblock()
        lane = self._lanes.get((run.env, run.queue, run.concurrency_key))
        if lane is None:
            return
        lane.running = max(0, lane.running - 1)
        self._mark_ready(lane)
        self._drop_if_idle(lane)

    def _drop_if_idle(self, lane: Lane) -> None:
        # Concurrency keys can be per user: forget lanes with nothing queued or running.
        if lane.queued == 0 and lane.running == 0 and lane.key[2] is not None:
            self._lanes.pop(lane.key, None)

    def stats(self, env: str) -> dict[str, tuple[int, int]]:
        """Per queue of an environment: (running, queued entries)."""
        out: dict[str, tuple[int, int]] = {}
        for (lane_env, queue, _), lane in self._lanes.items():
            if lane_env == env:
                running, queued = out.get(queue, (0, 0))
                out[queue] = (running + lane.running, queued + lane.queued)
        for lane_env, queue in self._limits:
            if lane_env == env:
                out.setdefault(queue, (0, 0))
        return out

    def is_paused(self, env: str, queue: str) -> bool:
        """True when the queue is paused."""
        return (env, queue) in self._paused
