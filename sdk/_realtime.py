"""Realtime: ``runs.subscribe(run_id)``, ``runs.subscribe_to_tag(tag)``,
``runs.subscribe_to_batch(batch_id)``, as async iterators of :class:`RunUpdate` (and
blocking twins).

Each update carries the run as it is now (status, metadata, output once done) and the
execution snapshot it records. The daemon filters the stream and numbers updates with
durable ids; when the connection drops (the daemon restarted), the iterator reconnects with
the last id it yielded and goes on from exactly there, for up to ``reconnect_s`` without a
daemon. ``subscribe`` ends after the run's final update; the others run until you stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from ember._client import Client
from ember._errors import DaemonUnavailable
from ember._realtime_types import RunUpdate

_decoder = msgspec.json.Decoder(RunUpdate)
RECONNECT_S = 60.0


async def updates(
    client: Client, params: dict[str, str], *, until_final: bool, reconnect_s: float = RECONNECT_S
) -> AsyncIterator[RunUpdate]:
    """The updates of a subscription (see the module), reconnecting after the last one."""
    last: str | None = None
    loop = asyncio.get_running_loop()
    gone_since: float | None = None
    while True:
        try:
            async for _, data in client.sse("/api/v1/realtime/runs", params, last):
                gone_since = None
                update = _decoder.decode(data)
                last = update.event_id
                yield update
                if until_final and update.snapshot == "FINISHED" and update.run.is_final:
                    return
        except DaemonUnavailable:
            now = loop.time()
            gone_since = gone_since or now
            if now - gone_since > reconnect_s:
                raise
            await asyncio.sleep(0.2)
            continue
        # The stream ended without an error (the daemon stopped): reconnect likewise.
        gone_since = gone_since or loop.time()
        await asyncio.sleep(0.2)


def blocking(client: Client, iterator: AsyncIterator[RunUpdate]) -> Iterator[RunUpdate]:
    """Drive an async subscription from blocking code, on a loop of its own."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(iterator))
            except StopAsyncIteration:
                return
    finally:
        closing: Any = getattr(iterator, "aclose", None)
        if closing is not None:
            loop.run_until_complete(closing())
        loop.run_until_complete(client.aclose())  # (the connections of this loop)
        loop.close()
