"""LiveFeed: keeps the dashboard connected to the daemon and current without refreshing.

It polls ``/healthz`` once a second (daemon status and load for the header), follows the
server-sent event stream, and when the daemon goes away it says so and reconnects with
backoff. After every (re)connection it asks the screens to list again, because events sent
while it was away are lost: the stream has no replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ember._client import Call, Client
from ember._errors import DaemonUnavailable, EmberError
from ember._types import Health, LogEvent, RunEvent, RunSummary

HEALTH_INTERVAL_S = 1.0
MAX_BACKOFF_S = 5.0
# The stream skips its "connected" comment, so we cannot see the moment the subscription
# starts; listing again this long after opening it covers changes made in between.
RESYNC_AFTER_S = 0.3


class Link(enum.Enum):
    """How the dashboard stands with the daemon."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class LinkState:
    """What the header shows about the daemon."""

    link: Link
    where: str
    health: Health | None = None
    retry_in_s: float | None = None
    error: str = ""


class RateMeter:
    """Runs finished per second over the last minute, for the header's sparkline."""

    def __init__(self, window_s: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window = window_s
        self._buckets: deque[tuple[int, int]] = deque()

    def tick(self) -> None:
        """Count one finished run now."""
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + 1)
        else:
            self._buckets.append((second, 1))
        while self._buckets and self._buckets[0][0] <= second - self._window:
            self._buckets.popleft()

    def series(self) -> list[float]:
        """Counts per second, oldest first, the current (partial) second excluded."""
        now = int(self._clock())
        counts = dict(self._buckets)
        return [float(counts.get(s, 0)) for s in range(now - self._window, now)]

    def rate(self, over_s: int = 5) -> float:
        """Average runs per second over the last ``over_s`` whole seconds."""
        return sum(self.series()[-over_s:]) / over_s


class LiveFeed:
    """Health polling and the event stream, with reconnection.

    Args:
        client: the client of the environment shown.
        on_state: called when the link or the daemon's load changes.
        on_run: called for every run change.
        on_log: called for every log line.
        on_resync: called after each (re)connection: list again.
    """

    def __init__(
        self,
        client: Client,
        on_state: Callable[[LinkState], None],
        on_run: Callable[[RunSummary], None],
        on_log: Callable[[LogEvent], None],
        on_resync: Callable[[], None],
    ) -> None:
        self.client = client
        self.meter = RateMeter()
        self._on_state = on_state
        self._on_run = on_run
        self._on_log = on_log
        self._on_resync = on_resync
        self.state = LinkState(Link.CONNECTING, client.settings.where)

    def _set(self, state: LinkState) -> None:
        self.state = state
        self._on_state(state)

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff_s = 0.25
        where = self.client.settings.where
        while True:
            try:
                health = await self._health()
            except EmberError as exc:
                self._set(LinkState(Link.DOWN, where, retry_in_s=backoff_s, error=str(exc)))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                continue
            backoff_s = 0.25
            self._set(LinkState(Link.UP, where, health=health))
            stream = asyncio.create_task(self._follow())
            try:
                await self._watch(stream)
            finally:
                stream.cancel()
                with contextlib.suppress(BaseException):
                    await stream
            self._set(LinkState(Link.DOWN, where, retry_in_s=0.0, error="the daemon went away"))

    async def _health(self) -> Health:
        return await self.client.request(
            Call("GET", "/healthz", Health, timeout_s=HEALTH_INTERVAL_S * 3)
        )

    async def _watch(self, stream: asyncio.Task[None]) -> None:
        """Poll health while the stream lives; return when either fails."""
        await asyncio.sleep(RESYNC_AFTER_S)
        if not stream.done():
            self._on_resync()
        while not stream.done():
            await asyncio.wait({stream}, timeout=HEALTH_INTERVAL_S)
            if stream.done():
                return
            try:
                health = await self._health()
            except EmberError:
                return
            self._set(LinkState(Link.UP, self.client.settings.where, health=health))

    async def _follow(self) -> None:
        with contextlib.suppress(DaemonUnavailable):
            async for event in self.client.events():
                if isinstance(event, RunEvent):
                    if event.run.status.is_final:
                        self.meter.tick()
                    self._on_run(event.run)
                elif isinstance(event, LogEvent):
                    self._on_log(event)
