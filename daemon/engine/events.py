"""The event hub: run changes fanned out to server-sent-event subscribers (TUI, ``ember dev``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec

from ember._types import Event

SUBSCRIBER_BUFFER = 10_000

_encoder = msgspec.json.Encoder()


class _Subscriber:
    __slots__ = ("env", "overflowed", "queue")

    def __init__(self, env: str) -> None:
        self.env = env
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self.overflowed = False


class EventHub:
    """Publishes run changes to subscribers of an environment.

    A subscriber that falls more than ``SUBSCRIBER_BUFFER`` events behind is disconnected
    rather than left to grow without bound; clients reconnect and list runs again.
    """

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []

    def has_subscribers(self, env: str) -> bool:
        """True when someone listens to this environment (skip building events otherwise)."""
        return any(s.env == env for s in self._subscribers)

    def publish(self, env: str, event: Event) -> None:
        """Send an event to every subscriber of its environment."""
        data: bytes | None = None
        for subscriber in self._subscribers:
            if subscriber.env != env or subscriber.overflowed:
                continue
            if data is None:
                data = _encoder.encode(event)
            try:
                subscriber.queue.put_nowait(data)
            except asyncio.QueueFull:
                subscriber.overflowed = True

    async def stream(self, env: str, keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
        """Yield server-sent-event frames for an environment until the consumer stops."""
        subscriber = _Subscriber(env)
        self._subscribers.append(subscriber)
        try:
            yield b": connected\n\n"
            while not subscriber.overflowed:
                try:
                    data = await asyncio.wait_for(subscriber.queue.get(), keepalive_s)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                yield b"data: " + data + b"\n\n"
        finally:
            self._subscribers.remove(subscriber)
