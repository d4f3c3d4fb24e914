"""The run process's end of the worker channel: frames in and out over the daemon's socket.

:class:`Link` is what the rest of the process sends through: frames from the loop go out at
the end of its iteration in one write; frames from task threads (``def`` tasks that log or
print) are handed to the loop, within a bound, so a flood of lines cannot grow memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from ember.daemon.procs.protocol import FrameDecoder, Message, ToWorker, encode

# Frames queued by task threads (``def`` tasks that log or print) before a thread waits for
# the loop to hand them to the channel: a flood of lines cannot grow memory without bound.
_THREAD_QUEUE_BYTES = 4 * 1024 * 1024


# Frames queued by task threads (``def`` tasks that log or print) before a thread waits for
# the loop to hand them to the channel: a flood of lines cannot grow memory without bound.
_THREAD_QUEUE_BYTES = 4 * 1024 * 1024


class Channel(asyncio.Protocol):
    """The connection to the daemon: frames are handled as they arrive, in order.

    A protocol rather than a stream reader: a no-op run costs a few loop iterations less
    without a reader task to create and wait for after every frame.
    """

    def __init__(
        self,
        handle: Callable[[ToWorker], None],
        lost: Callable[[], None],
        flow: Callable[[bool], None],
    ) -> None:
        self._handle = handle
        self._lost = lost
        self._flow = flow
        self._decoder = FrameDecoder(ToWorker)
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._handle(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._flow(False)
        self._lost()

    def pause_writing(self) -> None:
        self._flow(True)

    def resume_writing(self) -> None:
        self._flow(False)

    def write(self, frames: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames)


class Link:
    """The current channel to the daemon (a new one after a checkpoint's restore).

    Only the loop's thread may touch a transport: frames sent from a ``def`` task's thread
    are queued and handed over by the loop, in order, and the thread waits while the queue
    is full or the channel's buffer is over its high-water mark.
    """

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._paused = False
        self._changed = threading.Condition()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand frames to this loop, running on the calling thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def set_paused(self, paused: bool) -> None:
        """The channel's flow control (called on the loop's thread)."""
        with self._changed:
            self._paused = paused
            self._changed.notify_all()

    def send(self, message: Message, *more: Message) -> None:
        frame = encode(message) if not more else b"".join(map(encode, (message, *more)))
        if threading.get_ident() == self._loop_thread:
            self._flush()  # frames queued by a thread go first, as they were sent first
            if self.channel is not None:
                self.channel.write(frame)
            else:
                # Closed for a checkpoint: a run checkpointed mid-execution may end before
                # the channel is back, and its Done must reach the daemon. Sent on reconnect.
                with self._changed:
                    self._queue.append(frame)
                    self._queued_bytes += len(frame)
            return
        with self._changed:
            # (Re-checked every second: a channel closed meanwhile frees the thread.)
            while (self._paused or self._queued_bytes >= _THREAD_QUEUE_BYTES) and (
                self.channel is not None
            ):
                self._changed.wait(1.0)
            first = not self._queue
            self._queue.append(frame)
            self._queued_bytes += len(frame)
        if first and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is ending
                self._loop.call_soon_threadsafe(self._flush)

    def flush(self) -> None:
        """Hand over the frames queued while the channel was closed (after a reconnect)."""
        self._flush()

    def _flush(self) -> None:
        if self.channel is None:
            return  # kept until the channel is back (see send)
        with self._changed:
            frames, self._queue = self._queue, []
            self._queued_bytes = 0
            self._changed.notify_all()
        if frames:
            self.channel.write(b"".join(frames))


async def hang_up(channel: Channel, timeout_s: float = 1.0) -> None:
    """Close the channel so that the daemon reads every frame sent before.

    A Unix socket closed while frames from its peer wait unread in it (a ``Shutdown`` sent
    just after an ``Evict``) resets the connection, and the peer loses what it had not read
    yet: the process's last spans and log lines. So the process half-closes, goes on reading
    until the daemon, having read everything up to that end, closes its side, and only then
    closes its own.
    """
    transport = channel.transport
    assert transport is not None
    if transport.can_write_eof():
        transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(channel.closed)
    transport.close()
