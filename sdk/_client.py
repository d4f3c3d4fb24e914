"""The client that talks to a daemon, over its Unix socket or over TCP with an API key.

Every API call is described once as a :class:`Call` and can be sent from async code
(:meth:`Client.request`) or from blocking code (:meth:`Client.request_sync`), so the SDK's
blocking twins share one implementation with the async calls.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from ember._config import ClientSettings
from ember._errors import DaemonUnavailable, EmberError, api_error
from ember._http import AsyncPool, Endpoint, SyncConnection, target
from ember._types import (
    REQUEST_KEY_HEADER,
    BatchEvent,
    ErrorBody,
    Event,
    GapEvent,
    LogEvent,
    RunEvent,
)

T = TypeVar("T")

_error_decoder = msgspec.json.Decoder(ErrorBody)
_event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API request and the type its JSON answer decodes to."""

    method: str
    path: str
    response: type[T]
    body: bytes | None = None
    params: Mapping[str, Any] | None = None
    timeout_s: float | None = None
    # A key of this request alone (triggers): the daemon answers a request sent again with
    # it as it answered the first, so the client may retry after a lost answer.
    request_key: str | None = None


def request_key() -> str:
    """A new key for one request: random, so no two calls ever share one."""
    return secrets.token_urlsafe(18)


# Retries of a keyed request whose connection broke: the daemon may be restarting.
RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


class Client:
    """A connection to one Ember daemon.

    Args:
        settings: where the daemon is and which environment to use; from the environment
            (``EMBER_SOCKET``, ``EMBER_URL``, ``EMBER_API_KEY``, ``EMBER_ENV``) when omitted.
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env()
        self._endpoint = Endpoint.parse(
            self.settings.url, self.settings.socket_path, self.settings.ca_file
        )
        headers = {"host": self._endpoint.host_header, "content-type": "application/json"}
        if self.settings.url is None:
            # Over TCP the API key decides the environment; on the socket the client names it.
            headers["x-ember-env"] = self.settings.env
        if self.settings.api_key:
            headers["authorization"] = f"Bearer {self.settings.api_key}"
        self._headers = headers
        # Connections belong to the event loop that opened them: one pool per live loop.
        self._pools: dict[asyncio.AbstractEventLoop, AsyncPool] = {}
        self._sync = SyncConnection(self._endpoint)
        self._sync_lock = threading.Lock()
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    def _pool(self) -> AsyncPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for stale in [other for other in self._pools if other.is_closed()]:
                del self._pools[stale]
            pool = self._pools[loop] = AsyncPool(self._endpoint)
        return pool

    # -- answers ------------------------------------------------------------------------

    def _decode(self, call: Call[T], status: int, data: bytes) -> T:
        if status >= 400:
            raise self._error(status, data)
        decoder = self._decoders.get(call.response)
        if decoder is None:
            decoder = self._decoders[call.response] = msgspec.json.Decoder(call.response)
        result: T = decoder.decode(data)
        return result

    def _error(self, status: int, data: bytes) -> EmberError:
        try:
            detail = _error_decoder.decode(data).error
        except msgspec.DecodeError:
            detail = data.decode(errors="replace") or f"HTTP {status}"
        if self.settings.profile is not None:
            where = f"profile {self.settings.profile}, {self.settings.url}"
            detail = f"{detail} (the remote daemon of {where})"
        return api_error(status, detail)

    def _unavailable(self, reason: str) -> DaemonUnavailable:
        if self.settings.profile is not None:
            hint = (
                "check the certificate (the profile's ca_file, or `ember login --ca-file`)"
                if "CERTIFICATE" in reason.upper()
                else "check that it runs and that the URL is right (`ember whoami`)"
            )
            return DaemonUnavailable(
                f"the remote daemon of profile {self.settings.profile} at {self.settings.url} "
                f"does not answer ({reason}): {hint}"
            )
        return DaemonUnavailable(
            f"no Ember daemon answers at {self.settings.where} ({reason}): start one with "
            "`ember dev` (or `ember daemon`), or point EMBER_SOCKET / EMBER_URL at a running one"
        )

    # -- requests -----------------------------------------------------------------------

    async def request(self, call: Call[T]) -> T:
        """Send a call from async code and return its decoded answer.

        Raises:
            DaemonUnavailable: nothing listens at the address, or it did not answer in time.
            ApiError: the daemon refused the request (a subclass per status).
        """
        timeout_s = call.timeout_s or self.settings.timeout_s
        path = target(call.path, call.params)
        headers = self._headers_of(call)
        delays = iter(RETRY_DELAYS_S if call.request_key else ())
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    status, data = await self._pool().request(call.method, path, headers, call.body)
            except ConnectionError as exc:  # ConnectFailed included
                delay_s = next(delays, None)
                if delay_s is None:
                    raise self._unavailable(str(exc)) from exc
                await asyncio.sleep(delay_s)
                continue
            except TimeoutError as exc:
                raise self._unavailable(f"no answer within {timeout_s:.0f}s") from exc
            return self._decode(call, status, data)

    def _headers_of(self, call: Call[Any]) -> Mapping[str, str]:
        if call.request_key is None:
            return self._headers
        return {**self._headers, REQUEST_KEY_HEADER: call.request_key}

    def request_sync(self, call: Call[T]) -> T:
        """Send a call from blocking code and return its decoded answer.

        Raises:
            DaemonUnavailable: nothing listens at the address, or it did not answer in time.
            ApiError: the daemon refused the request (a subclass per status).
        """
        timeout_s = call.timeout_s or self.settings.timeout_s
        path = target(call.path, call.params)
        headers = self._headers_of(call)
        delays = iter(RETRY_DELAYS_S if call.request_key else ())
        while True:
            try:
                with self._sync_lock:
                    status, data = self._sync.request(
                        call.method, path, headers, call.body, timeout_s
                    )
            except TimeoutError as exc:
                raise self._unavailable(f"no answer within {timeout_s:.0f}s") from exc
            except OSError as exc:  # ConnectionError included
                delay_s = next(delays, None)
                if delay_s is None:
                    raise self._unavailable(str(exc)) from exc
                time.sleep(delay_s)
                continue
            return self._decode(call, status, data)

    async def events(
        self, params: Mapping[str, Any] | None = None
    ) -> AsyncIterator[RunEvent | LogEvent | BatchEvent]:
        """Stream run changes and log lines as they happen (server-sent events).

        Raises:
            DaemonUnavailable: nothing listens at the address, or it went away.
        """
        async for _, event in self.event_frames(params):
            if not isinstance(event, GapEvent):
                yield event

    async def event_frames(
        self, params: Mapping[str, Any] | None = None, last_event_id: str | None = None
    ) -> AsyncGenerator[tuple[str | None, Event]]:
        """Stream events with their ids; with ``last_event_id`` the daemon resumes after it.

        Raises:
            DaemonUnavailable: nothing listens at the address, or it went away.
        """
        async for event_id, data in self.sse("/api/v1/events", params, last_event_id):
            yield event_id, _event_decoder.decode(data)

    async def sse(
        self, path: str, params: Mapping[str, Any] | None, last_event_id: str | None = None
    ) -> AsyncGenerator[tuple[str | None, bytes]]:
        """Stream a server-sent-event response: each event's id and data, as they come.

        Raises:
            DaemonUnavailable: nothing listens at the address, or it went away.
        """
        headers = dict(self._headers)
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        buffer = b""
        try:
            async for status, data in self._pool().stream(target(path, params), headers):
                if status >= 400:
                    raise self._error(status, data)
                buffer += data
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    event_id: str | None = None
                    for line in frame.split(b"\n"):
                        if line.startswith(b"id: "):
                            event_id = line[4:].decode()
                        elif line.startswith(b"data: "):
                            yield event_id, line[6:]
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            raise self._unavailable(str(exc) or "the event stream closed") from exc

    async def aclose(self) -> None:
        """Close the connections opened from the current event loop."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Close the blocking connection."""
        with self._sync_lock:
            self._sync.close()


_default: Client | None = None
_default_lock = threading.Lock()


def configure(client: Client | ClientSettings | None = None) -> Client:
    """Set the client that ``task.trigger()``, ``runs`` and ``tasks`` use by default.

    Args:
        client: a client, or settings to build one; the environment's defaults when omitted.
    """
    global _default
    with _default_lock:
        _default = client if isinstance(client, Client) else Client(client)
        return _default


def default_client() -> Client:
    """The client configured with :func:`configure`, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default
