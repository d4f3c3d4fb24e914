"""Rate limits of queues: at most ``limit`` attempt starts in any ``period_s`` window.

A sliding-window log, exact rather than approximate: each window keeps the start times of
the attempts inside it. A run taken from the queue holds a *reservation* until its attempt
starts (the process may take a while to fork); the reservation then becomes that attempt's
recorded start time, the same instant written to the ``attempts`` table. A run is let out
only while ``starts in (now - period, now] + reservations < limit``, which bounds the starts
in every window of ``period_s`` by the limit (take the window's last-dequeued run: every
other start in the window was either a reservation or a start inside its own look-back).

The windows are rebuilt on start from the ``attempts`` table, so the limit holds across a
daemon restart. A window belongs to the queue, or with ``per_key`` to each concurrency key.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WindowKey = tuple[str, str, str | None]


@dataclass(frozen=True, slots=True)
class RateSpec:
    """A queue's rate limit as the daemon applies it."""

    limit: int
    period_s: float
    per_key: bool = False

    def describe(self) -> str:
        """``100 per 60s`` (per concurrency key)."""
        per = " per concurrency key" if self.per_key else ""
        return f"{self.limit} starts per {self.period_s:g}s{per}"


@dataclass(slots=True)
class Window:
    """Attempt starts of one window key, oldest first, and reservations not yet started."""

    starts: deque[float] = field(default_factory=deque)
    reserved: int = 0

    def used(self, now: float, period_s: float) -> int:
        """Starts in ``(now - period_s, now]`` plus reservations."""
        starts = self.starts
        while starts and starts[0] <= now - period_s:
            starts.popleft()
        return len(starts) + self.reserved


class RateLimiter:
    """The rate windows of every rate-limited queue."""

    def __init__(self) -> None:
        self.specs: dict[tuple[str, str], RateSpec] = {}
        self._windows: dict[WindowKey, Window] = {}

    def set(self, env: str, queue: str, spec: RateSpec | None) -> None:
        """Set or clear a queue's rate limit."""
        if spec is None:
            self.specs.pop((env, queue), None)
        else:
            self.specs[(env, queue)] = spec

    def clear(self, env: str, queue: str) -> None:
        """Forget a queue's recorded starts (before reading them back from the table)."""
        for wkey in [k for k in self._windows if k[:2] == (env, queue)]:
            self._windows[wkey].starts.clear()

    def window_key(self, env: str, queue: str, key: str | None) -> WindowKey | None:
        """Which window a run of this lane counts in; None when the queue has no rate limit."""
        spec = self.specs.get((env, queue))
        if spec is None:
            return None
        return (env, queue, key if spec.per_key else None)

    def _window(self, wkey: WindowKey) -> Window:
        window = self._windows.get(wkey)
        if window is None:
            window = self._windows[wkey] = Window()
        return window

    def blocked_until(self, wkey: WindowKey, now: float) -> float | None:
        """None if one more run may start now; else when the window frees a place.

        ``inf`` when only reservations fill it: the place frees as one starts or is returned.
        """
        spec = self.specs[(wkey[0], wkey[1])]
        window = self._window(wkey)
        if window.used(now, spec.period_s) < spec.limit:
            return None
        # Reservations turn into starts that stay in the window for a whole period.
        free = spec.limit - window.reserved
        if free <= 0:
            return float("inf")
        return window.starts[len(window.starts) - free] + spec.period_s

    def reserve(self, wkey: WindowKey) -> None:
        """A run left the queue to start an attempt: hold its place."""
        self._window(wkey).reserved += 1

    def unreserve(self, wkey: WindowKey) -> None:
        """A reserved run went back (or away) without starting."""
        window = self._window(wkey)
        window.reserved = max(0, window.reserved - 1)

    def started(self, wkey: WindowKey, at: float) -> None:
        """A reserved run's attempt started at ``at`` (the time written to the table)."""
        window = self._window(wkey)
        window.reserved = max(0, window.reserved - 1)
        window.starts.append(at)

    def load(self, wkey: WindowKey, at: float) -> None:
        """An attempt start read back from the table on recovery (in time order)."""
        self._window(wkey).starts.append(at)

    def longest_period_s(self) -> float:
        """How far back recovery must read attempt starts."""
        return max((s.period_s for s in self.specs.values()), default=0.0)

    def forget_idle(self, now: float) -> None:
        """Drop windows with nothing in them (concurrency keys can be per user)."""
        for wkey in [k for k, w in self._windows.items() if not w.reserved]:
            spec = self.specs.get((wkey[0], wkey[1]))
            if spec is None or self._windows[wkey].used(now, spec.period_s) == 0:
                del self._windows[wkey]
