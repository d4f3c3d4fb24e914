"""A small HTTP/1.1 client for the daemon's API: keep-alive pools over Unix sockets or TCP.

The daemon's API is simple (JSON bodies with a Content-Length, and one chunked event
stream), and a trigger is on the hot path of every application that uses Ember. A
general-purpose client costs ~1.4 ms of CPU per request here (httpx, httpcore and anyio,
measured with pyinstrument); this one costs a fraction of that. The async side uses asyncio
streams, the blocking side the standard library's ``http.client``.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the daemon listens: a Unix socket path, or a host and port (with TLS or not)."""

    socket_path: Path | None = None
    host: str = ""
    port: int = 0
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def parse(cls, url: str | None, socket_path: Path, ca_file: Path | None = None) -> Endpoint:
        """The endpoint of a base URL, or of the Unix socket when there is no URL."""
        if not url:
            return cls(socket_path=socket_path)
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(host=parts.hostname or "", port=port, tls=tls, ca_file=ca_file)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of an ``https`` endpoint: the system's trust store, or ``ca_file``."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    @property
    def host_header(self) -> str:
        """The Host header to send."""
        return "ember" if self.socket_path is not None else f"{self.host}:{self.port}"


class ConnectFailed(ConnectionError):
    """No connection could be made to the endpoint."""


def target(path: str, params: Mapping[str, object] | None) -> str:
    """A request target: the path plus its query string (None values left out)."""
    if not params:
        return path
    query = urlencode({k: str(v) for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path


def _request_head(method: str, path: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ConnectionError("response headers are too large") from exc
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line.split(b";", 1)[0], 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


class AsyncPool:
    """Keep-alive connections of one event loop to one endpoint."""

    def __init__(self, endpoint: Endpoint, max_idle: int = 32) -> None:
        self._endpoint = endpoint
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._tls = endpoint.tls_context()

    async def _open(self) -> _Connection:
        endpoint = self._endpoint
        try:
            if endpoint.socket_path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    str(endpoint.socket_path), limit=_MAX_HEADER_BYTES
                )
            else:
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=self._tls, limit=_MAX_HEADER_BYTES
                )
        except OSError as exc:
            raise ConnectFailed(str(exc)) from exc
        return _Connection(reader, writer)

    async def request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        """Send one request and return its status and body.

        Raises:
            ConnectFailed: no connection could be made.
            ConnectionError: the connection broke mid-request.
        """
        head = _request_head(method, path, headers, len(body or b""))
        # A pooled connection may have been closed by the server since its last use: if it
        # fails before any byte of the answer, try once more on a fresh connection.
        for reused in (True, False):
            conn = self._idle.pop() if reused and self._idle else None
            fresh = conn is None
            if conn is None:
                conn = await self._open()
            try:
                conn.writer.write(head + body if body else head)
                status, response_headers = await _read_head(conn.reader)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                conn.close()
                if fresh:
                    raise ConnectionError(f"the daemon closed the connection: {exc}") from exc
                continue
            except BaseException:  # cancelled or timed out: the connection's state is unknown
                conn.close()
                raise
            try:
                data = await self._read_body(conn.reader, response_headers)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                # The daemon went away between the answer's head and its body.
                conn.close()
                raise ConnectionError(f"the daemon closed the connection: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            if response_headers.get("connection") == "close" or len(self._idle) >= self._max_idle:
                conn.close()
            else:
                self._idle.append(conn)
            return status, data
        raise AssertionError("unreachable")

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while chunk := await _read_chunk(reader):
                parts.append(chunk)
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        return await reader.read()

    async def stream(
        self, path: str, headers: Mapping[str, str]
    ) -> AsyncIterator[tuple[int, bytes]]:
        """GET a streamed response; yield (status, data) pieces as they arrive.

        The connection is used for this stream only and closed at the end.
        """
        conn = await self._open()
        try:
            conn.writer.write(_request_head("GET", path, headers, 0))
            status, response_headers = await _read_head(conn.reader)
            if response_headers.get("transfer-encoding") != "chunked":
                yield status, await self._read_body(conn.reader, response_headers)
                return
            while chunk := await _read_chunk(conn.reader):
                yield status, chunk
        finally:
            conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("ember", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SyncConnection:
    """One keep-alive connection for blocking code (guard it with a lock across threads)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._conn is None:
            endpoint = self._endpoint
            if endpoint.socket_path is not None:
                self._conn = _UnixHTTPConnection(endpoint.socket_path, timeout_s)
            elif endpoint.tls:
                self._conn = http.client.HTTPSConnection(
                    endpoint.host, endpoint.port, timeout=timeout_s, context=endpoint.tls_context()
                )
            else:
                self._conn = http.client.HTTPConnection(
                    endpoint.host, endpoint.port, timeout=timeout_s
                )
        self._conn.timeout = timeout_s
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout_s)
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
    ) -> tuple[int, bytes]:
        """Send one request and return its status and body.

        Raises:
            ConnectFailed: no connection could be made.
            ConnectionError: the connection broke mid-request.
        """
        for reused in (True, False):
            was_open = self._conn is not None and self._conn.sock is not None
            conn = self._connection(timeout_s)
            try:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except OSError as exc:
                        self.close()
                        raise ConnectFailed(str(exc)) from exc
                conn.request(method, path, body=body or b"", headers=dict(headers))
                response = conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                self.close()
                if isinstance(exc, ConnectFailed) or not (reused and was_open):
                    raise
                continue
            if response.getheader("connection") == "close":
                self.close()
            return response.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
