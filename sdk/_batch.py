"""``batch``: batches across tasks, of any size, as Trigger.dev's ``batch`` SDK.

Up to ``CHUNK_ITEMS`` items without an idempotency key go in one request (one commit).
Larger batches, and batches with a key, are created first and their items then streamed
in chunks of ``CHUNK_ITEMS``, in order (Trigger.dev v4's two-phase batch): each chunk is one
commit, and a chunk sent again (a retry after a lost answer, or the same key again) gets
the runs it made the first time, so the batch holds each item exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from ember._client import Call, Client, default_client, request_key
from ember._task import RunHandle, trigger_options
from ember._types import (
    BatchInfo,
    BatchItem,
    BatchItemsRequest,
    BatchItemsResponse,
    BatchTriggerRequest,
    BatchTriggerResponse,
    CreateBatchRequest,
    Duration,
    TriggerResponse,
)

if TYPE_CHECKING:
    from ember._task import Task

R = TypeVar("R")

CHUNK_ITEMS = 1000
_encoder = msgspec.json.Encoder()
# How often Batch.wait looks at the batch, growing to the last value.
_POLL_S = (0.05, 0.1, 0.2, 0.5, 1.0)

# A plan sends calls and receives their answers; the async and blocking drivers share it.
_Plan = Generator[Call[Any], Any, tuple[str, list[TriggerResponse], bool]]


def plan_batch(
    items: Sequence[BatchItem],
    idempotency_key: str | None = None,
    idempotency_key_ttl: Duration | None = None,
) -> _Plan:
    """The calls that make a batch of these items; returns (id, handles, is_cached)."""
    if not items:
        raise ValueError("a batch needs at least one item")
    if len(items) <= CHUNK_ITEMS and idempotency_key is None:
        body = _encoder.encode(BatchTriggerRequest(items=list(items)))
        one: BatchTriggerResponse = yield Call(
            "POST",
            "/api/v1/tasks/batch",
            BatchTriggerResponse,
            body=body,
            request_key=request_key(),
        )
        return one.batch_id, one.runs, False
    create = CreateBatchRequest(
        run_count=len(items),
        idempotency_key=idempotency_key,
        idempotency_key_ttl=idempotency_key_ttl,
    )
    info: BatchInfo = yield Call(
        "POST",
        "/api/v2/batches",
        BatchInfo,
        body=_encoder.encode(create),
        request_key=request_key(),
    )
    runs: list[TriggerResponse] = []
    # A cached batch sends its items again: it answers with the runs it already has.
    for start in range(0, len(items), CHUNK_ITEMS):
        chunk = BatchItemsRequest(start_index=start, items=list(items[start : start + CHUNK_ITEMS]))
        answer: BatchItemsResponse = yield Call(
            "POST",
            f"/api/v2/batches/{info.id}/items",
            BatchItemsResponse,
            body=_encoder.encode(chunk),
            request_key=request_key(),
        )
        runs.extend(answer.runs)
    return info.id, runs, info.is_cached


async def send_batch(client: Client, plan: _Plan) -> tuple[str, list[TriggerResponse], bool]:
    """Drive a plan from async code."""
    try:
        call = next(plan)
        while True:
            call = plan.send(await client.request(call))
    except StopIteration as done:
        result: tuple[str, list[TriggerResponse], bool] = done.value
        return result


def send_batch_sync(client: Client, plan: _Plan) -> tuple[str, list[TriggerResponse], bool]:
    """Drive a plan from blocking code."""
    try:
        call = next(plan)
        while True:
            call = plan.send(client.request_sync(call))
    except StopIteration as done:
        result: tuple[str, list[TriggerResponse], bool] = done.value
        return result


class Batch(list[RunHandle[R]], Generic[R]):
    """A triggered batch: the handles of its runs in order, and the batch's id.

    Attributes:
        id: the batch id (``batch.retrieve(id)``, ``runs.list(batch=id)``).
        is_cached: True when the idempotency key named an existing batch.
    """

    def __init__(
        self,
        batch_id: str,
        runs: Iterable[TriggerResponse],
        client: Client,
        output_type: type[Any] = object,
        is_cached: bool = False,
    ) -> None:
        super().__init__(RunHandle(r, client, output_type) for r in runs)
        self.id = batch_id
        self.is_cached = is_cached
        self._client = client

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r}, runs={len(self)})"

    async def retrieve(self) -> BatchInfo:
        """The batch record: status, counts per run status, created and finished."""
        return await Batches(self._client).retrieve(self.id)

    def retrieve_sync(self) -> BatchInfo:
        """Blocking twin of :meth:`retrieve`."""
        return Batches(self._client).retrieve_sync(self.id)

    async def wait(self, *, timeout_s: float = 3600.0) -> BatchInfo:
        """Wait until every run of the batch is final; returns the batch record.

        Raises:
            TimeoutError: the batch did not complete within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        for i in itertools.count():
            info = await self.retrieve()
            if info.status == "COMPLETED":
                return info
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(_POLL_S[min(i, len(_POLL_S) - 1)])
        raise TimeoutError(f"batch {self.id} did not complete within {timeout_s}s")


def batch_items(entries: Iterable[Any]) -> list[BatchItem]:
    """Wire items from ``(task, payload)`` or ``(task, payload, options)`` tuples.

    ``task`` is a task id or a :class:`~ember.Task` (whose payload type is then checked).
    """
    items = []
    for entry in entries:
        target, payload = entry[0], entry[1]
        options = trigger_options(**(entry[2] if len(entry) > 2 else {}))
        if isinstance(target, str):
            task_id, data = target, _encoder.encode(payload)
        else:
            task_id, data = target.id, target.encode_payload(payload)
        items.append(BatchItem(task=task_id, payload=msgspec.Raw(data), options=options))
    return items


class Batches:
    """Batches of the client's environment: ``from ember import batch``."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    async def trigger(
        self,
        items: Iterable[tuple[str | Task[Any, ..., Any], Any] | tuple[Any, Any, dict[str, Any]]],
        *,
        idempotency_key: str | None = None,
        idempotency_key_ttl: Duration | None = None,
    ) -> Batch[Any]:
        """Trigger runs of several tasks as one batch, of any size.

        Args:
            items: ``(task, payload)`` or ``(task, payload, options)``; ``task`` is a task id
                or a task.
            idempotency_key: the same key again (within its TTL) returns the same batch.
            idempotency_key_ttl: how long the key holds (default 30 days).
        """
        plan = plan_batch(batch_items(items), idempotency_key, idempotency_key_ttl)
        batch_id, runs, cached = await send_batch(self.client, plan)
        return Batch(batch_id, runs, self.client, is_cached=cached)

    def trigger_sync(
        self,
        items: Iterable[tuple[str | Task[Any, ..., Any], Any] | tuple[Any, Any, dict[str, Any]]],
        *,
        idempotency_key: str | None = None,
        idempotency_key_ttl: Duration | None = None,
    ) -> Batch[Any]:
        """Blocking twin of :meth:`trigger`."""
        plan = plan_batch(batch_items(items), idempotency_key, idempotency_key_ttl)
        batch_id, runs, cached = send_batch_sync(self.client, plan)
        return Batch(batch_id, runs, self.client, is_cached=cached)

    async def retrieve(self, batch_id: str) -> BatchInfo:
        """A batch: status, run counts per status, created and finished."""
        return await self.client.request(Call("GET", f"/api/v1/batches/{batch_id}", BatchInfo))

    def retrieve_sync(self, batch_id: str) -> BatchInfo:
        """Blocking twin of :meth:`retrieve`."""
        return self.client.request_sync(Call("GET", f"/api/v1/batches/{batch_id}", BatchInfo))


batch = Batches()
"""Batches through the default client."""
