"""``streams``: chunks a run sends as it goes (an LLM's tokens, progress lines), which readers
follow live and which stay readable after the run, as Trigger.dev's realtime streams.

Inside a run, ``streams.append("tokens", text)`` queues a chunk (any JSON value); queued
chunks go to the daemon in order, up to 1,000 a request, a tenth of a second after the first
of them (at once past 1,000), on ``await streams.flush()``, before each durable wait and at
the end of each attempt. ``await streams.pipe("tokens", source)`` appends every item of an
(async) iterable. Anywhere, ``streams.read(run_id, "tokens")`` returns the chunks so far and
``streams.subscribe(run_id, "tokens")`` yields them as they come, until the run is final and
the stream is complete (a reconnect resumes after the last chunk received). A run executed
again (a retry, a replay) appends what it sends again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Iterator
from typing import Any

import msgspec

from ember._client import Call, Client, default_client
from ember._errors import DaemonUnavailable, OutsideRunError
from ember._runtime import current_runtime
from ember._stream_types import StreamAppend, StreamAppended, StreamPage

FLUSH_AFTER_S = 0.1
BATCH = 1000
RECONNECT_S = 60.0
_encoder = msgspec.json.Encoder()


class _Outbox:
    """A run's chunks not sent yet, by stream, and the lock that keeps sends in order."""

    def __init__(self) -> None:
        self.queued: dict[str, list[Any]] = {}
        self.count = 0
        self.lock = asyncio.Lock()
        self.timer: asyncio.Handle | None = None


_runs: dict[str, _Outbox] = {}


def _run_id(what: str) -> str:
    runtime = current_runtime()
    if runtime is None:
        raise OutsideRunError(
            f"streams.{what}() works inside a run only; read a run's streams with "
            "streams.read(run_id, name) or streams.subscribe(run_id, name)"
        )
    return runtime.context.run_id


async def flush_streams(run_id: str) -> None:
    """Send a run's queued chunks, in order (the worker calls it at an attempt's end)."""
    outbox = _runs.get(run_id)
    if outbox is None:
        return
    if outbox.timer is not None:
        outbox.timer.cancel()
        outbox.timer = None
    async with outbox.lock:
        while outbox.queued:
            name, chunks = next(iter(outbox.queued.items()))
            batch, rest = chunks[:BATCH], chunks[BATCH:]
            if rest:
                outbox.queued[name] = rest
            else:
                del outbox.queued[name]
            outbox.count -= len(batch)
            body = _encoder.encode(StreamAppend(chunks=batch))
            path = f"/api/v1/runs/{run_id}/streams/{name}"
            await default_client().request(Call("POST", path, StreamAppended, body=body))


def forget_streams(run_id: str) -> None:
    """The attempt ended in this process: drop the run's outbox."""
    outbox = _runs.pop(run_id, None)
    if outbox is not None and outbox.timer is not None:
        outbox.timer.cancel()


def _flush_later(run_id: str) -> None:
    outbox = _runs.get(run_id)
    if outbox is not None:
        outbox.timer = None
        task = asyncio.get_running_loop().create_task(flush_streams(run_id))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


class Streams:
    """``from ember import streams`` (see the module)."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used by the readers: the one given, else the default."""
        return self._client or default_client()

    def append(self, name: str, value: Any) -> None:
        """Queue a chunk (a JSON value) at the end of the run's stream ``name``."""
        run_id = _run_id("append")
        outbox = _runs.setdefault(run_id, _Outbox())
        outbox.queued.setdefault(name, []).append(value)
        outbox.count += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a def task's thread: sent on flush or at the attempt's end
        if outbox.count >= BATCH:
            if outbox.timer is not None:
                outbox.timer.cancel()
            outbox.timer = loop.call_soon(_flush_later, run_id)
        elif outbox.timer is None:
            outbox.timer = loop.call_later(FLUSH_AFTER_S, _flush_later, run_id)

    async def pipe(self, name: str, source: AsyncIterable[Any] | Iterable[Any]) -> list[Any]:
        """Append every item of ``source`` as it comes; returns the items, once sent."""
        items = []
        if isinstance(source, AsyncIterable):
            async for item in source:
                self.append(name, item)
                items.append(item)
        else:
            for item in source:
                self.append(name, item)
                items.append(item)
        await self.flush()
        return items

    async def flush(self) -> None:
        """Send the queued chunks now."""
        await flush_streams(_run_id("flush"))

    async def read(self, run_id: str, name: str) -> list[Any]:
        """Every chunk of a run's stream so far, in order."""
        chunks: list[Any] = []
        after = 0
        while True:
            call = Call(
                "GET", f"/api/v1/runs/{run_id}/streams/{name}", StreamPage, params={"after": after}
            )
            page = await self.client.request(call)
            chunks += [msgspec.json.decode(c.data) for c in page.chunks]
            if len(page.chunks) < BATCH:  # (the daemon's page is as large)
                return chunks
            after = page.chunks[-1].seq

    def read_sync(self, run_id: str, name: str) -> list[Any]:
        """Blocking twin of :meth:`read`."""
        return asyncio.run(self._read_on_own_loop(run_id, name))

    async def _read_on_own_loop(self, run_id: str, name: str) -> list[Any]:
        try:
            return await self.read(run_id, name)
        finally:
            await self.client.aclose()

    async def subscribe(self, run_id: str, name: str) -> AsyncGenerator[Any]:
        """The chunks of a run's stream as they come, until the run is final and all came."""
        path = f"/api/v1/realtime/runs/{run_id}/streams/{name}"
        last: str | None = None
        loop = asyncio.get_running_loop()
        gone_since: float | None = None
        while True:
            try:
                async for event_id, data in self.client.sse(path, None, last):
                    gone_since = None
                    if event_id is None:
                        return  # the end event
                    last = event_id
                    yield msgspec.json.decode(data)
            except DaemonUnavailable:
                gone_since = gone_since or loop.time()
                if loop.time() - gone_since > RECONNECT_S:
                    raise
            await asyncio.sleep(0.2)

    def subscribe_sync(self, run_id: str, name: str) -> Iterator[Any]:
        """Blocking twin of :meth:`subscribe`."""
        loop = asyncio.new_event_loop()
        chunks = self.subscribe(run_id, name)
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.run_until_complete(self.client.aclose())
            loop.close()


streams = Streams()
