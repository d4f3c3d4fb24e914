"""The in-memory run queue: lanes with concurrency limits, priority, and fairness.

A lane is one (environment, queue, concurrency key). As in Trigger.dev, each concurrency key
gets its own copy of the queue's limit. Inside a lane runs leave in order of
``queued_at - priority`` (a priority of 10 dequeues as if the run were 10 s older); across
lanes the queue takes turns, so one busy queue cannot starve the others.

This is a cache of the runs table, rebuilt from it on start. Entries are removed lazily: a
run canceled or expired while queued is skipped when it reaches the head.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from ember._types import RunStatus
from ember.daemon.store.runs import ActiveRun

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
    """Queued runs of every environment, ready to be taken in fair order."""

    def __init__(self) -> None:
        self._lanes: dict[LaneKey, Lane] = {}
        self._limits: dict[tuple[str, str], int | None] = {}
        self._paused: set[tuple[str, str]] = set()
        self._ready: deque[Lane] = deque()
        self._in_ready: set[LaneKey] = set()
        self._seq = itertools.count()
        self.size = 0

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

    def pop(self) -> ActiveRun | None:
        """Take the next run in fair order and count it as running in its lane."""
        while self._ready:
            lane = self._ready.popleft()
            self._in_ready.discard(lane.key)
            if not lane.has_room:
                continue
            while lane.heap:
                _, _, run = heapq.heappop(lane.heap)
                if run.in_queue and run.status is RunStatus.QUEUED:
                    run.in_queue = False
                    lane.queued -= 1
                    self.size -= 1
                    lane.running += 1
                    self._mark_ready(lane)
                    return run
            self._drop_if_idle(lane)
        return None

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
