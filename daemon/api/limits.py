"""What keeps hostile or careless TCP clients from taking the daemon down.

uvicorn's httptools protocol has no header-size limit, never times out a connection that
sends nothing (or sends its request one byte at a time), and accepts connections until the
process runs out of file descriptors, at which point the Unix socket refuses the local
applications too. :func:`guarded_protocol` makes a subclass of it that adds, per connection:

- a header-size cap (431) on every socket: bytes are counted before the parser buffers them,
  so a 128 MB header costs at most one read buffer beyond the cap;
- on TCP, an idle timeout until the first byte of a request, and a deadline for the whole
  request (headers and body) once it begins (408): a slowloris client is cut off;
- on TCP, a cap on connections per client address and in total (503 with the reason),
  counted by a :class:`ConnectionGate`. The Unix socket is never capped: its owner is the
  daemon's own user, and it must keep answering while TCP is flooded.

The daemon raises its ``RLIMIT_NOFILE`` soft limit at start (:func:`raise_fd_limit`) and fits
the TCP cap under it (:func:`fit_tcp_cap`), keeping descriptors for the database, run
processes and the Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from contextlib import suppress
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("ember.daemon")

# Descriptors kept out of the TCP cap: SQLite and its WAL, logs, zygotes, run processes'
# channels, the Unix socket's clients. Measured use with 25 runs executing is ~150.
FD_RESERVE = 256
# A refusal is logged at most this often, so a flood does not flood the log too.
_LOG_EVERY_S = 10.0
# After an error answer, what the client still sends is read and dropped this long before
# the connection closes: closing with unread data makes the kernel send a reset, and the
# client would lose the answer that says what was wrong.
_LINGER_S = 1.0
# At most this many connections linger at once: in a flood of refused connections, the rest
# are closed at once (a client that sent nothing yet still reads its 503), so lingering never
# eats the descriptors the Unix socket needs.
_MAX_LINGERING = 64


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return the soft limit.

    An unlimited hard limit is taken as 1,048,576 (the kernel's default ``nr_open``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return int(soft)


def fit_tcp_cap(max_tcp_connections: int, fd_soft_limit: int) -> int:
    """The TCP connection cap that leaves :data:`FD_RESERVE` descriptors for everything else.

    Logs a warning when ``max_tcp_connections`` does not fit and is lowered.
    """
    room = max(fd_soft_limit - FD_RESERVE, 1)
    if max_tcp_connections <= room:
        return max_tcp_connections
    log.warning(
        "max_tcp_connections = %d does not fit under the open-file limit of %d (keeping %d "
        "for the daemon itself): TCP is capped at %d connections; raise `ulimit -n` "
        "(LimitNOFILE= in a systemd unit) to allow more",
        max_tcp_connections,
        fd_soft_limit,
        FD_RESERVE,
        room,
    )
    return room


class ConnectionGate:
    """Counts open TCP connections, per client address and in total, and admits or refuses.

    Args:
        per_client: connections one client address may hold open.
        total: TCP connections the daemon holds open at once.
    """

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self.lingering = 0
        self._logged_at = 0.0

    def admit(self, host: str) -> str | None:
        """Count a new connection from ``host``; return why it is refused, or None."""
        held = self.by_client.get(host, 0)
        if held >= self.per_client:
            reason = (
                f"{host} already holds {held} connections to this daemon "
                f"(max_connections_per_client = {self.per_client}): reuse or close some"
            )
        elif self.open >= self.total:
            reason = (
                f"the daemon holds {self.open} TCP connections, its limit "
                f"(max_tcp_connections = {self.total}): retry later"
            )
        else:
            self.by_client[host] = held + 1
            self.open += 1
            return None
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("refusing TCP connections (%d so far): %s", self.refused, reason)
        return reason

    def release(self, host: str) -> None:
        """Forget a connection :meth:`admit` counted."""
        self.open -= 1
        left = self.by_client.get(host, 1) - 1
        if left > 0:
            self.by_client[host] = left
        else:
            self.by_client.pop(host, None)


def _raw_response(status: bytes, message: str) -> bytes:
    """A complete HTTP/1.1 error response with an Ember error body, closing the connection."""
    body = b'{"error":' + json.dumps(message).encode() + b"}"
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


def guarded_protocol(
    gate: ConnectionGate,
    *,
    max_header_bytes: int,
    idle_timeout_s: float,
    request_timeout_s: float,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the limits of this module (see its docstring)."""

    class GuardedProtocol(HttpToolsProtocol):
        """One HTTP connection under the daemon's limits."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._tcp_host: str | None = None
            self._in_headers = False
            self._header_bytes = 0
            self._head_bytes = 0
            self._receiving = False
            self._lingering = False
            self._timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            if self.server is None or self.server[1] is None:
                return  # the Unix socket: never capped, never timed out
            host = self.client[0] if self.client is not None else "?"
            refusal = gate.admit(host)
            if refusal is not None:
                self._refuse(b"503 Service Unavailable", refusal)
                return
            self._tcp_host = host
            self._arm(idle_timeout_s, self._idle_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._lingering:
                self._lingering = False
                gate.lingering -= 1
            if self._tcp_host is not None:
                gate.release(self._tcp_host)
                self._tcp_host = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return
            if self._tcp_host is not None and not self._receiving:
                # The first byte of a request: from now on it has a deadline to be complete.
                self._receiving = True
                self._arm(request_timeout_s, self._request_expired)
            super().data_received(data)
            # Counted after the parser ran, from the read where a request began (see
            # on_message_begin): a read that also ends the headers is checked exactly in
            # on_headers_complete; one that leaves them unfinished past the cap is refused
            # before the next read, so the parser never buffers more than one read beyond.
            if self._in_headers:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse_headers()

        def on_message_begin(self) -> None:
            # Also for a request pipelined behind one still answered: its headers count too.
            self._in_headers = True
            self._header_bytes = 0
            self._head_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            if self._head_bytes > max_header_bytes:
                # Headers that ended within the read that crossed the cap, counted exactly.
                self._refuse_headers()
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._lingering:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._lingering:
                return
            super().on_message_complete()
            if self._tcp_host is not None:
                # Received in full: the handler may take its time (long polls, streams).
                self._receiving = False
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._tcp_host is not None and not self._receiving:
                # Between requests the idle timeout applies again.
                self._arm(idle_timeout_s, self._idle_expired)

        def _idle_expired(self) -> None:
            self._timer = None
            if not self._receiving and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

        def _request_expired(self) -> None:
            self._timer = None
            if self._receiving:
                self._refuse(
                    b"408 Request Timeout",
                    f"the request was not received in full within {request_timeout_s} s "
                    "(request_timeout_s)",
                )

        def _refuse_headers(self) -> None:
            self._refuse(
                b"431 Request Header Fields Too Large",
                f"the request's headers are over {max_header_bytes} bytes "
                "(max_header_bytes): send less in headers, put data in the body",
            )

        def _refuse(self, status: bytes, message: str) -> None:
            if self.transport.is_closing() or self._lingering:
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self.transport.close()  # an answer is half-sent: no room for another
                return
            self.transport.write(_raw_response(status, message))
            if gate.lingering >= _MAX_LINGERING:
                self.transport.close()
                return
            self._lingering = True
            gate.lingering += 1
            with suppress(OSError, NotImplementedError):
                self.transport.write_eof()
            self._arm(_LINGER_S, self.transport.close)

        def eof_received(self) -> None:
            if self._lingering:
                self.transport.close()  # the client sent all it had: nothing left to reset

        def _arm(self, delay_s: float, callback: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay_s, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return GuardedProtocol
