"""The batches API: create a batch, stream its items in chunks, retrieve it.

``POST /api/v2/batches`` and ``POST /api/v2/batches/{id}/items`` follow Trigger.dev v4's
two-phase batch (create, then stream the items); ``GET /api/v1/batches/{id}`` is
``batch.retrieve``. The record and its completion live in ``_batches.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._types import BatchInfo, BatchItemsRequest, BatchItemsResponse, CreateBatchRequest
from ember.daemon.api.routing import RouteSpec, read_body, read_json
from ember.daemon.engine.batches import MAX_CHUNK_ITEMS

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

# Room for the JSON around each item's payload.
_ITEM_OVERHEAD = 64 * 1024


async def create_batch(daemon: ApiDaemon, request: Request, env: str) -> BatchInfo:
    req: CreateBatchRequest = read_json(await read_body(request, 8192), CreateBatchRequest)
    return await daemon.engine.batches.create(
        env, req.run_count, req.idempotency_key, req.idempotency_key_ttl
    )


async def add_batch_items(daemon: ApiDaemon, request: Request, env: str) -> BatchItemsResponse:
    limit = MAX_CHUNK_ITEMS * (daemon.config.max_payload_bytes + _ITEM_OVERHEAD)
    req: BatchItemsRequest = read_json(await read_body(request, limit), BatchItemsRequest)
    return await daemon.engine.batches.add_items(
        env, request.path_params["batch_id"], req.start_index, req.items
    )


async def get_batch(daemon: ApiDaemon, request: Request, env: str) -> BatchInfo:
    return await daemon.engine.batches.retrieve(env, request.path_params["batch_id"])


BATCH_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        "/api/v2/batches",
        create_batch,
        "Create a batch; its items follow in chunks",
        request=CreateBatchRequest,
        response=BatchInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v2/batches/{batch_id}/items",
        add_batch_items,
        f"Add the next chunk (up to {MAX_CHUNK_ITEMS:,}) of a batch's items",
        request=BatchItemsRequest,
        response=BatchItemsResponse,
    ),
    RouteSpec(
        "GET",
        "/api/v1/batches/{batch_id}",
        get_batch,
        "A batch with its run counts per status",
        response=BatchInfo,
    ),
)
