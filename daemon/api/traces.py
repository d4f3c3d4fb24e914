"""The trace route: ``GET /api/v1/runs/{run_id}/trace``, a run's spans as a tree's rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._errors import NotFound
from ember._trace_types import RunTrace
from ember.daemon.api.routing import RouteSpec, check_run_env
from ember.daemon.store import traces as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


async def run_trace(daemon: ApiDaemon, request: Request, env: str) -> RunTrace:
    run_id: str = request.path_params["run_id"]
    await check_run_env(daemon, request, env, run_id)
    trace = await daemon.db.read(lambda conn: store.get_trace(conn, run_id))
    if trace is None:
        raise NotFound(404, f"run {run_id} does not exist (or was pruned by retention)")
    return trace


TRACE_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "GET",
        "/api/v1/runs/{run_id}/trace",
        run_trace,
        "A run's OpenTelemetry spans: the run's own span first, then by start time",
        response=RunTrace,
    ),
)
