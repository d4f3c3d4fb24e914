"""The HTTP client that talks to a daemon, over its Unix socket or over TCP with an API key.

Every API call is described once as a :class:`Call` and can be sent from async code
(:meth:`Client.request`) or from blocking code (:meth:`Client.request_sync`), so the SDK's
blocking twins share one implementation with the async calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from ember._config import ClientSettings
from ember._errors import DaemonUnavailable, api_error
from ember._types import ErrorBody, Event

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


@dataclass(slots=True)
class _AsyncSlot:
    """An httpx.AsyncClient tied to the event loop that created it."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient


@dataclass(slots=True)
class _State:
    sync: httpx.Client | None = None
    async_slots: list[_AsyncSlot] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Client:
    """A connection to one Ember daemon.

    Args:
        settings: where the daemon is and which environment to use; from the environment
            (``EMBER_SOCKET``, ``EMBER_URL``, ``EMBER_API_KEY``, ``EMBER_ENV``) when omitted.
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env()
        self._state = _State()
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    # -- transports ---------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        headers = {"content-type": "application/json", "x-ember-env": self.settings.env}
        if self.settings.api_key:
            headers["authorization"] = f"Bearer {self.settings.api_key}"
        return {
            "base_url": self.settings.url or "http://ember",
            "headers": headers,
            "timeout": self.settings.timeout_s,
        }

    def _sync_client(self) -> httpx.Client:
        with self._state.lock:
            if self._state.sync is None:
                transport = (
                    None
                    if self.settings.url
                    else httpx.HTTPTransport(uds=str(self.settings.socket_path))
                )
                self._state.sync = httpx.Client(transport=transport, **self._client_kwargs())
            return self._state.sync

    def _async_client(self) -> httpx.AsyncClient:
        # An AsyncClient's pool belongs to one event loop; keep one per live loop.
        loop = asyncio.get_running_loop()
        slots = self._state.async_slots
        for slot in slots:
            if slot.loop is loop:
                return slot.client
        slots[:] = [s for s in slots if not s.loop.is_closed()]
        transport = (
            None
            if self.settings.url
            else httpx.AsyncHTTPTransport(uds=str(self.settings.socket_path))
        )
        client = httpx.AsyncClient(transport=transport, **self._client_kwargs())
        slots.append(_AsyncSlot(loop, client))
        return client

    # -- requests -----------------------------------------------------------------------

    def _decode(self, call: Call[T], response: httpx.Response) -> T:
        if response.status_code >= 400:
            raise self._error(response)
        decoder = self._decoders.get(call.response)
        if decoder is None:
            decoder = self._decoders[call.response] = msgspec.json.Decoder(call.response)
        result: T = decoder.decode(response.content)
        return result

    def _error(self, response: httpx.Response) -> Exception:
        try:
            detail = _error_decoder.decode(response.content).error
        except msgspec.DecodeError:
            detail = response.text or response.reason_phrase
        return api_error(response.status_code, detail)

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        hint = (
            "start one with `ember dev` (or `ember daemon`), or point EMBER_SOCKET / EMBER_URL "
            "at a running daemon"
        )
        return DaemonUnavailable(f"no Ember daemon answers at {self.settings.where}: {hint}")

    def _params(self, call: Call[Any]) -> dict[str, Any] | None:
        if call.params is None:
            return None
        return {k: v for k, v in call.params.items() if v is not None}

    async def request(self, call: Call[T]) -> T:
        """Send a call from async code and return its decoded answer.

        Raises:
            DaemonUnavailable: nothing listens at the address.
            ApiError: the daemon refused the request (a subclass per status).
        """
        try:
            response = await self._async_client().request(
                call.method,
                call.path,
                content=call.body,
                params=self._params(call),
                timeout=call.timeout_s or self.settings.timeout_s,
            )
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as exc:
            raise self._unavailable(exc) from exc
        return self._decode(call, response)

    def request_sync(self, call: Call[T]) -> T:
        """Send a call from blocking code and return its decoded answer.

        Raises:
            DaemonUnavailable: nothing listens at the address.
            ApiError: the daemon refused the request (a subclass per status).
        """
        try:
            response = self._sync_client().request(
                call.method,
                call.path,
                content=call.body,
                params=self._params(call),
                timeout=call.timeout_s or self.settings.timeout_s,
            )
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as exc:
            raise self._unavailable(exc) from exc
        return self._decode(call, response)

    async def events(self, params: Mapping[str, Any] | None = None) -> AsyncIterator[Event]:
        """Stream run changes and log lines as they happen (server-sent events).

        Raises:
            DaemonUnavailable: nothing listens at the address, or it went away.
        """
        query = dict(params or {})
        try:
            async with self._async_client().stream(
                "GET", "/api/v1/events", params=query, timeout=httpx.Timeout(None)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._error(response)
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        yield _event_decoder.decode(line[6:])
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        """Close the connections opened from the current event loop."""
        loop = asyncio.get_running_loop()
        keep = []
        for slot in self._state.async_slots:
            if slot.loop is loop:
                await slot.client.aclose()
            else:
                keep.append(slot)
        self._state.async_slots[:] = keep

    def close(self) -> None:
        """Close the blocking connection."""
        with self._state.lock:
            if self._state.sync is not None:
                self._state.sync.close()
                self._state.sync = None


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
