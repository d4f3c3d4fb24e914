"""The worker socket: each run process's channel to the daemon, from its hello on.

A forked (or restored) process connects and says hello with the id and token it was forked
with; from then on its frames go to the engine, and the close of its channel to
:class:`~.exits.Exits`. The frames are ``procs/protocol.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import cast

from ember.daemon.model import Worker
from ember.daemon.procs.protocol import (
    MAX_FRAME_BYTES,
    Done,
    FrameDecoder,
    FromWorker,
    Heartbeat,
    Hello,
    Log,
    Spans,
    Wait,
)
from ember.daemon.procs.supervisor.context import SupervisorContext, SupervisorPart
from ember.daemon.procs.supervisor.exits import Exits, close_pidfd
from ember.daemon.procs.supervisor.isolation import Isolation

log = logging.getLogger("ember.daemon")
# Connections to the worker socket the kernel queues before the daemon accepts them.
WORKER_BACKLOG = 4096


class _WorkerProtocol(asyncio.Protocol):
    def __init__(self, channels: WorkerChannels) -> None:
        self._channels = channels
        self._engine = channels.engine
        self._decoder = FrameDecoder(FromWorker)
        self._transport: asyncio.Transport | None = None
        self.worker: Worker | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ValueError as exc:
            log.warning("closing a worker channel: %s", exc)
            if self.worker is not None:
                self.worker.fault = (
                    f"{exc} (at most {MAX_FRAME_BYTES} bytes): a log line, output or error "
                    "that large cannot be recorded; return a reference to stored data instead"
                )
            assert self._transport is not None
            self._transport.close()
            return
        engine = self._engine
        for message in messages:
            if self.worker is None:
                if not isinstance(message, Hello):
                    assert self._transport is not None
                    self._transport.close()
                    return
                assert self._transport is not None
                self.worker = self._channels.on_hello(message, self._transport)
                if self.worker is None:
                    return
            elif isinstance(message, Log | Spans | Heartbeat | Wait | Done):
                engine.on_worker_message(self.worker, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self._channels.exits.on_channel_closed(self.worker)


class WorkerChannels(SupervisorPart):
    """The worker socket's server, and the hello that binds a channel to its process.

    Args:
        ctx: the supervisor's shared state.
        isolation: puts a containerized process into its preset's cgroup at its hello.
        exits: told when a channel closes.
    """

    def __init__(self, ctx: SupervisorContext, isolation: Isolation, exits: Exits) -> None:
        super().__init__(ctx)
        self.exits = exits
        self._isolation = isolation
        self._server: asyncio.Server | None = None

    async def listen(self) -> None:
        """Listen for run processes on the worker socket."""
        path = self.config.worker_socket
        path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        # A deep backlog: hundreds of processes woken at once (a burst of waits) reconnect
        # together, and asyncio's default of 100 left the rest hanging in connect().
        self._server = await loop.create_unix_server(
            lambda: _WorkerProtocol(self), str(path), backlog=WORKER_BACKLOG
        )
        os.chmod(path, 0o600)

    def close(self) -> None:
        """Stop accepting connections."""
        if self._server is not None:
            self._server.close()

    def on_hello(self, hello: Hello, transport: asyncio.Transport) -> Worker | None:
        """Bind the channel to the process it names (None: refused and closed)."""
        worker = self.workers.get(hello.worker_id)
        if worker is None or not secrets.compare_digest(worker.token, hello.token):
            log.warning("refusing a run process with an unknown id or token (pid %s)", hello.pid)
            transport.close()
            return None
        reconnected = worker.transport is None and (worker.pid is not None or hello.restored)
        pid = hello.pid
        if worker.contained:  # its PID in the container: the host's is found once
            host_pid = worker.pid or self._isolation.enter_container(worker, hello.pid)
            if host_pid is None:
                transport.close()
                return None
            pid = host_pid
        worker.transport = transport
        worker.pid = pid
        close_pidfd(worker)
        with contextlib.suppress(OSError):  # (gone already: its channel's close follows)
            worker.pidfd = os.pidfd_open(pid)
        if hello.restored or (reconnected and worker.parked is not None):
            # Back from a checkpoint (or from a dump that failed): deliver what waited.
            worker.checkpointing = None
            outbox, worker.outbox = worker.outbox, []
            for message in outbox:
                worker.send(message)
            self.engine.on_worker_back(worker)
            return worker
        self.done_starting(worker.pool)
        self.engine.on_worker_ready(worker)
        return worker
