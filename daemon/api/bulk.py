"""The bulk actions API: ``/api/v1/bulk-actions``, Trigger.dev's ``runs.bulk``.

The actions themselves run in the daemon (``_bulk.py``); these routes create, list,
retrieve and abort them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._types import BulkAction, BulkActionList, CreateBulkActionRequest
from ember.daemon.api.routing import RouteSpec, read_body, read_json

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

_ONE = "/api/v1/bulk-actions/{action_id}"


async def create_bulk_action(daemon: ApiDaemon, request: Request, env: str) -> BulkAction:
    body = await read_body(request, 2 * 1024 * 1024)
    req: CreateBulkActionRequest = read_json(body, CreateBulkActionRequest)
    return await daemon.engine.bulk.create(env, req)


async def list_bulk_actions(daemon: ApiDaemon, request: Request, env: str) -> BulkActionList:
    return BulkActionList(data=await daemon.engine.bulk.list(env))


async def get_bulk_action(daemon: ApiDaemon, request: Request, env: str) -> BulkAction:
    return await daemon.engine.bulk.retrieve(env, request.path_params["action_id"])


async def abort_bulk_action(daemon: ApiDaemon, request: Request, env: str) -> BulkAction:
    return await daemon.engine.bulk.abort(env, request.path_params["action_id"])


BULK_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        "/api/v1/bulk-actions",
        create_bulk_action,
        "Cancel or replay runs by filter or ids, in the daemon",
        request=CreateBulkActionRequest,
        response=BulkAction,
    ),
    RouteSpec(
        "GET",
        "/api/v1/bulk-actions",
        list_bulk_actions,
        "Bulk actions, newest first",
        response=BulkActionList,
    ),
    RouteSpec("GET", _ONE, get_bulk_action, "A bulk action and its progress", response=BulkAction),
    RouteSpec(
        "POST",
        _ONE + "/abort",
        abort_bulk_action,
        "Stop a bulk action after its current chunk",
        response=BulkAction,
    ),
)
