"""``queues``: list, inspect, pause, resume and resize queues at run time (Trigger.dev's API).

Each call has a blocking twin with the ``_sync`` suffix, built from the same
:class:`~ember._client.Call`.
"""

from __future__ import annotations

import builtins
from urllib.parse import quote

import msgspec

from ember._client import Call, Client, default_client
from ember._types import QueueInfo, QueueLimitRequest, QueueList


def _path(name: str, action: str = "") -> str:
    # Task queues are named "task/<id>": the slash stays, anything else is escaped.
    return f"/api/v1/queues/{quote(name, safe='/')}{action}"


class Queues:
    """Queues of the client's environment: ``from ember import queues``."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    @staticmethod
    def _list() -> Call[QueueList]:
        return Call("GET", "/api/v1/queues", QueueList)

    @staticmethod
    def _retrieve(name: str) -> Call[QueueInfo]:
        return Call("GET", _path(name), QueueInfo)

    @staticmethod
    def _post(name: str, action: str, body: bytes = b"{}") -> Call[QueueInfo]:
        return Call("POST", _path(name, action), QueueInfo, body=body)

    @classmethod
    def _override(cls, name: str, limit: int | None) -> Call[QueueInfo]:
        body = msgspec.json.encode(QueueLimitRequest(concurrency_limit=limit))
        return cls._post(name, "/concurrency", body)

    async def list(self) -> list[QueueInfo]:
        """Every queue of the environment with its limits and load."""
        return (await self.client.request(self._list())).data

    async def retrieve(self, name: str) -> QueueInfo:
        """One queue (``"task/<id>"`` for a task's own queue)."""
        return await self.client.request(self._retrieve(name))

    async def pause(self, name: str) -> QueueInfo:
        """Stop starting runs of the queue; runs executing carry on, new ones wait QUEUED."""
        return await self.client.request(self._post(name, "/pause"))

    async def resume(self, name: str) -> QueueInfo:
        """Start runs of a paused queue again."""
        return await self.client.request(self._post(name, "/resume"))

    async def override_concurrency_limit(self, name: str, limit: int | None) -> QueueInfo:
        """Replace the code's concurrency limit (None: unlimited) until reset."""
        return await self.client.request(self._override(name, limit))

    async def reset_concurrency_limit(self, name: str) -> QueueInfo:
        """Go back to the concurrency limit the code declares."""
        return await self.client.request(self._post(name, "/concurrency/reset"))

    def list_sync(self) -> builtins.list[QueueInfo]:
        """Blocking twin of :meth:`list`."""
        return self.client.request_sync(self._list()).data

    def retrieve_sync(self, name: str) -> QueueInfo:
        """Blocking twin of :meth:`retrieve`."""
        return self.client.request_sync(self._retrieve(name))

    def pause_sync(self, name: str) -> QueueInfo:
        """Blocking twin of :meth:`pause`."""
        return self.client.request_sync(self._post(name, "/pause"))

    def resume_sync(self, name: str) -> QueueInfo:
        """Blocking twin of :meth:`resume`."""
        return self.client.request_sync(self._post(name, "/resume"))

    def override_concurrency_limit_sync(self, name: str, limit: int | None) -> QueueInfo:
        """Blocking twin of :meth:`override_concurrency_limit`."""
        return self.client.request_sync(self._override(name, limit))

    def reset_concurrency_limit_sync(self, name: str) -> QueueInfo:
        """Blocking twin of :meth:`reset_concurrency_limit`."""
        return self.client.request_sync(self._post(name, "/concurrency/reset"))


queues = Queues()
"""Queues through the default client."""
