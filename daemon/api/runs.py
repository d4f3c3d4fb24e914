"""The run routes' handlers: trigger, batch trigger, list, retrieve, wait, logs, cancel,
replay and reschedule."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request

from ember._duration import MAX_INSTANT
from ember._errors import BadRequest
from ember._types import (
    REQUEST_KEY_HEADER,
    BatchItem,
    BatchTriggerRequest,
    BatchTriggerResponse,
    LogPage,
    ReplayRequest,
    RescheduleRequest,
    Run,
    RunPage,
    RunStatus,
    TriggerRequest,
    TriggerResponse,
)
from ember.daemon.api.routing import BODY_OVERHEAD, check_run_env, int_param
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode
from ember.daemon.store import listing as listing_store
from ember.daemon.store import logs as logs_store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

MAX_BATCH_ITEMS = 1000
MAX_REQUEST_KEY_CHARS = 200
# Epoch seconds in a query (an ISO date otherwise): digits, an optional fraction, exponent.
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


MAX_BATCH_ITEMS = 1000


MAX_REQUEST_KEY_CHARS = 200


# Epoch seconds in a query (an ISO date otherwise): digits, an optional fraction, exponent.
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _csv(request: Request, name: str) -> tuple[str, ...]:
    raw = request.query_params.get(name)
    return tuple(v for v in raw.split(",") if v) if raw else ()


def _float_param(request: Request, name: str, default: float | None = None) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan, inf and 1e400 are no answer to "how many seconds"
        raise BadRequest(400, f"query parameter {name}={raw!r} is not a finite number")
    return value


def _time_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        # A naive date-time is local time, as datetime.timestamp() has always read it.
        instant = float(raw) if _NUMBER.fullmatch(raw) else datetime.fromisoformat(raw).timestamp()
    except (ValueError, OverflowError, OSError):
        instant = math.nan
    if not 0 <= instant <= MAX_INSTANT:
        raise BadRequest(
            400,
            f"query parameter {name}={raw!r} is not an ISO 8601 date-time or epoch seconds "
            "between 1970 and the year 9999",
        )
    return instant


async def trigger(daemon: ApiDaemon, request: Request, env: str) -> TriggerResponse:
    body = await _body(request, daemon.config.max_payload_bytes + BODY_OVERHEAD)
    req: TriggerRequest = _decode(body, TriggerRequest)
    item = BatchItem(task=request.path_params["task_id"], payload=req.payload, options=req.options)
    _, responses = await daemon.engine.trigger(env, [item], request_key=_request_key(request))
    return responses[0]


def _request_key(request: Request) -> str | None:
    """The client's key for a trigger request: a retry of it gets the first answer back."""
    key = request.headers.get(REQUEST_KEY_HEADER) or None
    if key is not None and len(key) > MAX_REQUEST_KEY_CHARS:
        raise BadRequest(400, f"{REQUEST_KEY_HEADER}: at most {MAX_REQUEST_KEY_CHARS} characters")
    return key


async def batch_trigger(daemon: ApiDaemon, request: Request, env: str) -> BatchTriggerResponse:
    limit = MAX_BATCH_ITEMS * (daemon.config.max_payload_bytes + BODY_OVERHEAD)
    req: BatchTriggerRequest = _decode(await _body(request, limit), BatchTriggerRequest)
    if not 1 <= len(req.items) <= MAX_BATCH_ITEMS:
        raise BadRequest(
            400, f"items: a batch holds 1 to {MAX_BATCH_ITEMS} runs, got {len(req.items)}"
        )
    # group=false: many runs in one commit that form no batch (a sync link's push).
    grouped = request.query_params.get("group") != "false"
    batch_id, responses = await daemon.engine.trigger(
        env, req.items, batch=grouped, request_key=_request_key(request)
    )
    return BatchTriggerResponse(batch_id=batch_id or "", runs=responses)


async def list_runs(daemon: ApiDaemon, request: Request, env: str) -> RunPage:
    statuses = _csv(request, "status")
    for status in statuses:
        if status not in RunStatus.__members__:
            raise BadRequest(
                400,
                f"status={status!r} is not a run status; use one of "
                + ", ".join(RunStatus.__members__),
            )
    limit = int_param(request, "limit", 50, 1, 1000)
    flt = listing_store.RunFilter(
        env=env,
        statuses=statuses,
        tasks=_csv(request, "task"),
        tags=_csv(request, "tag"),
        version=request.query_params.get("version") or None,
        parent=request.query_params.get("parent") or None,
        batch=request.query_params.get("batch") or None,
        created_from=_time_param(request, "from"),
        created_to=_time_param(request, "to"),
        updated_from=_time_param(request, "updated_from"),
    )
    cursor = request.query_params.get("cursor") or None
    page, next_cursor = await daemon.db.read(
        lambda conn: listing_store.list_runs(conn, flt, limit, cursor)
    )
    return RunPage(data=page, next_cursor=next_cursor)


async def _run_id(daemon: ApiDaemon, request: Request, env: str) -> str:
    run_id: str = request.path_params["run_id"]
    await check_run_env(daemon, request, env, run_id)
    return run_id


async def get_run(daemon: ApiDaemon, request: Request, env: str) -> Run:
    return await daemon.engine.get_run(await _run_id(daemon, request, env))


async def wait_run(daemon: ApiDaemon, request: Request, env: str) -> Run:
    timeout_s = max(_float_param(request, "timeout_s", 30.0) or 0.0, 0.0)
    history = request.query_params.get("history", "true") != "false"
    run_id = await _run_id(daemon, request, env)
    return await daemon.engine.wait_final(run_id, min(timeout_s, 3600.0), history)


async def run_logs(daemon: ApiDaemon, request: Request, env: str) -> LogPage:
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.get_run(run_id)  # 404 for an unknown run, not an empty list
    return LogPage(data=await daemon.db.read(lambda conn: logs_store.get_logs(conn, run_id)))


async def cancel_run(daemon: ApiDaemon, request: Request, env: str) -> Run:
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.cancel(run_id)
    return await daemon.engine.get_run(run_id)


async def replay_run(daemon: ApiDaemon, request: Request, env: str) -> TriggerResponse:
    req: ReplayRequest = _decode(await _body(request, 64 * 1024) or b"{}", ReplayRequest)
    return await daemon.engine.replay(
        env,
        await _run_id(daemon, request, env),
        req.version,
        payload=None if req.payload is msgspec.UNSET else bytes(req.payload),
        tags=req.tags,
        metadata=req.metadata,
    )


async def reschedule_run(daemon: ApiDaemon, request: Request, env: str) -> Run:
    req: RescheduleRequest = _decode(await _body(request, 64 * 1024), RescheduleRequest)
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.reschedule(run_id, req.delay)
    return await daemon.engine.get_run(run_id)
