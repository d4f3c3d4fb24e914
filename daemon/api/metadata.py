"""The metadata route: ``PUT /api/v1/runs/{run_id}/metadata``, operations from a running task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._errors import NotFound
from ember._metadata import MAX_METADATA_BYTES, MetadataResponse, MetadataUpdate
from ember.daemon.api.routing import RouteSpec, check_run_env, read_body, read_json
from ember.daemon.store import metadata as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


async def update_metadata(daemon: ApiDaemon, request: Request, env: str) -> MetadataResponse:
    run_id: str = request.path_params["run_id"]
    await check_run_env(daemon, request, env, run_id)
    # Operations may be many small ones; a body this size would not fit the 256 KB anyway.
    body = await read_body(request, 4 * MAX_METADATA_BYTES)
    update: MetadataUpdate = read_json(body, MetadataUpdate)
    now = daemon.engine.clock()
    changed = await daemon.db.write(lambda conn: store.apply_update(conn, run_id, update, now))
    if changed is None:
        raise NotFound(404, f"run {run_id} does not exist")
    daemon.engine.metadata_changed(changed)
    return MetadataResponse(metadata=changed[run_id])


METADATA_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "PUT",
        "/api/v1/runs/{run_id}/metadata",
        update_metadata,
        "Apply metadata operations to a run, its parent and its root, in order, at once",
        request=MetadataUpdate,
        response=MetadataResponse,
    ),
)
