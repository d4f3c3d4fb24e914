"""The event hub: run changes fanned out to server-sent-event subscribers (TUI, ``ember dev``,
and the mirrors of other daemons).

Every event has an id, ``<boot>-<seq>``: the boot tells this daemon's life from an earlier
one's, the sequence rises by one per event. The hub keeps the newest ``RETAINED_EVENTS`` of
the environments a resumable subscriber (a mirror, ``?resume=1``) has asked for, so a mirror
that reconnects with ``Last-Event-ID`` gets what it missed; when that cannot be done (the
daemon restarted, or too much happened) the stream starts with a ``gap`` event and the
mirror lists what changed instead.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator

import msgspec

from ember._types import Event, GapEvent

SUBSCRIBER_BUFFER = 10_000
RETAINED_EVENTS = 20_000

_encoder = msgspec.json.Encoder()


class _Subscriber:
    __slots__ = ("env", "overflowed", "queue")

    def __init__(self, env: str) -> None:
        self.env = env
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self.overflowed = False


def _frame(event_id: str, data: bytes) -> bytes:
    return b"id: " + event_id.encode() + b"\ndata: " + data + b"\n\n"


class EventHub:
    """Publishes run changes to subscribers of an environment.

    A subscriber that falls more than ``SUBSCRIBER_BUFFER`` events behind is disconnected
    rather than left to grow without bound; clients reconnect and list runs again.
    """

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self.boot = secrets.token_hex(4)
        self._seq = 0
        self._retained: collections.deque[tuple[int, str, bytes]] = collections.deque(
            maxlen=RETAINED_EVENTS
        )
        # Environments a mirror follows: their events are built and kept even while no one
        # is connected, so a reconnecting mirror misses nothing.
        self._retained_envs: set[str] = set()

    def has_subscribers(self, env: str) -> bool:
        """True when someone listens to this environment (skip building events otherwise)."""
        return env in self._retained_envs or any(s.env == env for s in self._subscribers)

    def publish(self, env: str, event: Event) -> None:
        """Send an event to every subscriber of its environment."""
        self._seq += 1
        data: bytes | None = None
        if env in self._retained_envs:
            data = _frame(f"{self.boot}-{self._seq}", _encoder.encode(event))
            self._retained.append((self._seq, env, data))
        for subscriber in self._subscribers:
            if subscriber.env != env or subscriber.overflowed:
                continue
            if data is None:
                data = _frame(f"{self.boot}-{self._seq}", _encoder.encode(event))
            try:
                subscriber.queue.put_nowait(data)
            except asyncio.QueueFull:
                subscriber.overflowed = True

    def _missed(self, env: str, last_event_id: str | None) -> list[bytes] | None:
        """The retained frames after ``last_event_id``, or None when they are not all kept."""
        if last_event_id is None or env not in self._retained_envs:
            return None
        boot, _, seq_text = last_event_id.partition("-")
        if boot != self.boot or not seq_text.isdigit():
            return None
        seq = int(seq_text)
        oldest = self._retained[0][0] if self._retained else self._seq + 1
        if seq + 1 < oldest and seq < self._seq:
            return None  # some of what followed is no longer kept
        return [data for s, e, data in self._retained if s > seq and e == env]

    async def stream(
        self,
        env: str,
        keepalive_s: float = 15.0,
        *,
        resume: bool = False,
        last_event_id: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield server-sent-event frames for an environment until the consumer stops.

        Args:
            env: the environment.
            keepalive_s: how often a comment line is sent while nothing happens.
            resume: keep this environment's events for a later reconnection, and start with
                what followed ``last_event_id`` (or with a ``gap`` event when that is lost).
            last_event_id: the id of the last event the subscriber holds.
        """
        subscriber = _Subscriber(env)
        missed: list[bytes] | None = None
        if resume:
            # Registered and read in one step, with no await between: nothing falls between
            # the frames replayed and the frames queued.
            missed = self._missed(env, last_event_id)
            self._retained_envs.add(env)
        self._subscribers.append(subscriber)
        try:
            yield b": connected\n\n"
            if resume:
                if missed is None:
                    gap = GapEvent(
                        reason="resumed from nothing"
                        if last_event_id is None
                        else f"event {last_event_id} is no longer kept"
                    )
                    yield _frame(f"{self.boot}-{self._seq}", _encoder.encode(gap))
                else:
                    for data in missed:
                        yield data
            while not subscriber.overflowed:
                try:
                    async with asyncio.timeout(keepalive_s):
                        data = await subscriber.queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                yield data
        finally:
            self._subscribers.remove(subscriber)
