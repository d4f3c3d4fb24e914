"""``runs.bulk``: cancel or replay runs by filter or by ids, executed by the daemon.

The daemon records the action and works through it in chunks; these calls start it, watch
its progress and stop it, as Trigger.dev's ``runs.bulk``.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import time
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from ember._client import Call, Client, default_client
from ember._types import BulkAction, BulkActionList, CreateBulkActionRequest, RunsFilter

_POLL_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def _create(
    action: Literal["cancel", "replay"],
    filter: RunsFilter | dict[str, Any] | None,
    run_ids: Iterable[str] | None,
) -> Call[BulkAction]:
    if isinstance(filter, dict):
        filter = msgspec.convert(filter, RunsFilter)
    req = CreateBulkActionRequest(action=action, filter=filter, run_ids=list(run_ids or ()))
    return Call("POST", "/api/v1/bulk-actions", BulkAction, body=msgspec.json.encode(req))


def _one(action_id: str, abort: bool = False) -> Call[BulkAction]:
    path = f"/api/v1/bulk-actions/{action_id}"
    if abort:
        return Call("POST", path + "/abort", BulkAction, body=b"{}")
    return Call("GET", path, BulkAction)


class BulkActions:
    """Bulk actions of the client's environment: ``runs.bulk``."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    async def cancel(
        self,
        *,
        filter: RunsFilter | dict[str, Any] | None = None,
        run_ids: Iterable[str] | None = None,
    ) -> BulkAction:
        """Cancel every run the filter matches (created before now), or the listed runs.

        Args:
            filter: e.g. ``{"status": ["QUEUED"], "task": ["send-email"], "tag": ["x"]}``.
            run_ids: the runs, instead of a filter.
        """
        return await self.client.request(_create("cancel", filter, run_ids))

    async def replay(
        self,
        *,
        filter: RunsFilter | dict[str, Any] | None = None,
        run_ids: Iterable[str] | None = None,
    ) -> BulkAction:
        """Replay every run the filter matches (created before now), or the listed runs."""
        return await self.client.request(_create("replay", filter, run_ids))

    async def retrieve(self, action_id: str) -> BulkAction:
        """An action and its progress."""
        return await self.client.request(_one(action_id))

    async def list(self) -> builtins.list[BulkAction]:
        """The environment's bulk actions, newest first."""
        call = Call("GET", "/api/v1/bulk-actions", BulkActionList)
        return (await self.client.request(call)).data

    async def abort(self, action_id: str) -> BulkAction:
        """Stop an action after the chunk under way."""
        return await self.client.request(_one(action_id, abort=True))

    async def poll(self, action_id: str, *, timeout_s: float = 3600.0) -> BulkAction:
        """Wait until the action is no longer running and return it.

        Raises:
            TimeoutError: it still runs after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        for i in itertools.count():
            action = await self.retrieve(action_id)
            if action.status != "RUNNING":
                return action
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(_POLL_S[min(i, len(_POLL_S) - 1)])
        raise TimeoutError(f"bulk action {action_id} still runs after {timeout_s}s")

    def cancel_sync(
        self,
        *,
        filter: RunsFilter | dict[str, Any] | None = None,
        run_ids: Iterable[str] | None = None,
    ) -> BulkAction:
        """Blocking twin of :meth:`cancel`."""
        return self.client.request_sync(_create("cancel", filter, run_ids))

    def replay_sync(
        self,
        *,
        filter: RunsFilter | dict[str, Any] | None = None,
        run_ids: Iterable[str] | None = None,
    ) -> BulkAction:
        """Blocking twin of :meth:`replay`."""
        return self.client.request_sync(_create("replay", filter, run_ids))

    def retrieve_sync(self, action_id: str) -> BulkAction:
        """Blocking twin of :meth:`retrieve`."""
        return self.client.request_sync(_one(action_id))
