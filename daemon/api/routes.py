"""The HTTP API: REST/JSON on the Unix socket and, when configured, on TCP with API keys.

Routes are declared once in ``ROUTES`` with their request and response types; the ASGI app
(:class:`Router`) and the OpenAPI document (:mod:`ember.daemon.api.openapi`) are both built from
that table.

The environment of a request comes from the ``x-ember-env`` header on the Unix socket (its
owner may name any environment); over TCP the API key decides it and a header naming
another environment is refused.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

import ember
from ember._duration import MAX_INSTANT, parse_duration_s
from ember._errors import ApiError, BadRequest, ConfigError, EmberError, NotFound, Unauthorized
from ember._types import (
    REQUEST_KEY_HEADER,
    BatchItem,
    BatchTriggerRequest,
    BatchTriggerResponse,
    CompleteTokenRequest,
    CreateTokenRequest,
    ErrorBody,
    Health,
    LogPage,
    ProcessList,
    QueueInfo,
    QueueLimitRequest,
    QueueList,
    ReplayRequest,
    RescheduleRequest,
    ResetIdempotencyKeyRequest,
    ResetIdempotencyKeyResponse,
    Run,
    RunPage,
    RunStatus,
    TaskList,
    TokenInfo,
    TokenPage,
    TriggerRequest,
    TriggerResponse,
    VersionInfo,
    VersionList,
    WaitToken,
)
from ember.daemon.api.admin import ADMIN_ROUTES
from ember.daemon.api.alerts import ALERT_ROUTES
from ember.daemon.api.batches import BATCH_ROUTES
from ember.daemon.api.bulk import BULK_ROUTES
from ember.daemon.api.bundles import BUNDLE_ROUTES
from ember.daemon.api.callbacks import CALLBACK_ROUTES
from ember.daemon.api.routing import (
    PAGE_LIMIT,
    RouteSpec,
    check_run_env,
    image_options,
    int_param,
    over_tcp,
)
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode
from ember.daemon.api.sync import FORWARDED, SYNC_ROUTES
from ember.daemon.engine.environments import check_env_name
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

_json = msgspec.json.Encoder()
log = logging.getLogger("ember.daemon")
MAX_BATCH_ITEMS = 1000
MAX_REQUEST_KEY_CHARS = 200
# Epoch seconds in a query (an ISO date otherwise): digits, an optional fraction, exponent.
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")
# JSON framing around a payload: options, keys, escaping.
_BODY_OVERHEAD = 300 * 1024


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(_json.encode(value), status, media_type="application/json")


def _error_response(status: int, message: str) -> Response:
    return _json_response(ErrorBody(error=message), status)


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


# -- handlers ----------------------------------------------------------------------------


async def health(daemon: ApiDaemon, request: Request, env: str) -> Health:
    stats = daemon.engine.stats()
    processes = daemon.supervisor.stats()["processes"]
    if over_tcp(request):  # a key sees the load of its own environment only
        lanes = daemon.engine.queue.stats(env).values()
        active = [r for r in daemon.engine.active.values() if r.env == env]
        stats = {
            "active": len(active),
            "executing": sum(1 for r in active if r.status is RunStatus.EXECUTING),
            "queued": sum(queued for _, queued in lanes),
        }
        processes = sum(1 for p in daemon.supervisor.processes() if p.env == env)
    return Health(
        ok=True,
        version=ember.__version__,
        pid=daemon.pid,
        started_at=store.ts(daemon.started_at),
        checkpoint_strategy=daemon.checkpoint_strategy,
        checkpoint_reason=daemon.criu.reason if daemon.criu is not None else None,
        active_runs=stats["active"],
        executing_runs=stats["executing"],
        queued_runs=stats["queued"],
        processes=processes,
        max_concurrent_runs=daemon.config.max_concurrent_runs,
    )


async def list_processes(daemon: ApiDaemon, request: Request, env: str) -> ProcessList:
    found = daemon.supervisor.processes()
    if over_tcp(request):
        found = [p for p in found if p.env == env]
    return ProcessList(data=found)


async def pause_queue(daemon: ApiDaemon, request: Request, env: str) -> QueueInfo:
    await daemon.engine.pause_queue(env, request.path_params["name"], True)
    return _queue_info(daemon, env, request.path_params["name"])


async def resume_queue(daemon: ApiDaemon, request: Request, env: str) -> QueueInfo:
    await daemon.engine.pause_queue(env, request.path_params["name"], False)
    return _queue_info(daemon, env, request.path_params["name"])


async def queue_limit(daemon: ApiDaemon, request: Request, env: str) -> QueueInfo:
    req: QueueLimitRequest = _decode(await _body(request, 4096), QueueLimitRequest)
    name = request.path_params["name"]
    await daemon.engine.override_queue_limit(env, name, req.concurrency_limit, reset=False)
    return _queue_info(daemon, env, name)


async def reset_queue_limit(daemon: ApiDaemon, request: Request, env: str) -> QueueInfo:
    name = request.path_params["name"]
    await daemon.engine.override_queue_limit(env, name, None, reset=True)
    return _queue_info(daemon, env, name)


async def get_queue(daemon: ApiDaemon, request: Request, env: str) -> QueueInfo:
    name = request.path_params["name"]
    if name not in daemon.engine.queue.stats(env):
        raise NotFound(404, f"queue {name!r} does not exist in environment {env}")
    return _queue_info(daemon, env, name)


def _queue_info(daemon: ApiDaemon, env: str, name: str) -> QueueInfo:
    queue = daemon.engine.queue
    running, queued = queue.stats(env).get(name, (0, 0))
    until = queue.rate_blocked_until(env, name)
    return QueueInfo(
        name=name,
        env=env,
        concurrency_limit=queue.limit(env, name),
        running=running,
        queued=queued,
        paused=queue.is_paused(env, name),
        rate_limit=daemon.engine.rate_limit(env, name),
        rate_limited_until=store.opt_ts(until),
    )


async def trigger(daemon: ApiDaemon, request: Request, env: str) -> TriggerResponse:
    body = await _body(request, daemon.config.max_payload_bytes + _BODY_OVERHEAD)
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
    limit = MAX_BATCH_ITEMS * (daemon.config.max_payload_bytes + _BODY_OVERHEAD)
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
    flt = store.RunFilter(
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
    page, next_cursor = await daemon.db.read(lambda conn: store.list_runs(conn, flt, limit, cursor))
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
    return LogPage(data=await daemon.db.read(lambda conn: store.get_logs(conn, run_id)))


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


async def register_version(daemon: ApiDaemon, request: Request, env: str) -> VersionInfo:
    archive = await _body(request, daemon.config.max_archive_bytes, "max_archive_bytes")
    promote = request.query_params.get("promote", "true") != "false"
    wait = request.query_params.get("wait", "true") != "false"
    image, push = image_options(request)
    return await daemon.register_version(
        env, archive, promote=promote, wait=wait, image=image, push=push
    )


async def list_versions(daemon: ApiDaemon, request: Request, env: str) -> VersionList:
    building = daemon.builder.building(env)
    return VersionList(data=building + daemon.engine.version_list(env))


async def promote_version(daemon: ApiDaemon, request: Request, env: str) -> VersionInfo:
    return await daemon.promote(env, request.path_params["version"])


async def list_tasks(daemon: ApiDaemon, request: Request, env: str) -> TaskList:
    current = daemon.engine.current.get(env)
    if current is None:
        return TaskList(version=None, data=[])
    record = daemon.engine.versions[(env, current)]
    return TaskList(version=current, data=sorted(record.tasks.values(), key=lambda t: t.id))


async def list_queues(daemon: ApiDaemon, request: Request, env: str) -> QueueList:
    names = sorted(daemon.engine.queue.stats(env))
    return QueueList(data=[_queue_info(daemon, env, name) for name in names])


async def create_token(daemon: ApiDaemon, request: Request, env: str) -> WaitToken:
    req: CreateTokenRequest = _decode(await _body(request, 64 * 1024), CreateTokenRequest)
    timeout_s = _duration_field("timeout", req.timeout)
    key_ttl_s = _duration_field("idempotency_key_ttl", req.idempotency_key_ttl)
    if len(req.tags) > 10:
        raise BadRequest(400, "tags: at most 10 tags per token")
    token = await daemon.engine.waits.create_token(
        env, timeout_s, req.idempotency_key, key_ttl_s, req.tags, req.run_id
    )
    return msgspec.structs.replace(token, url=daemon.engine.callbacks.url(token.id))


def _duration_field(name: str, value: float | str | None) -> float | None:
    """A duration from a request body, or a 400 that names its field."""
    if value is None:
        return None
    try:
        return parse_duration_s(value)
    except ConfigError as exc:
        raise BadRequest(400, f"{name}: {exc}") from None


async def complete_token(daemon: ApiDaemon, request: Request, env: str) -> TokenInfo:
    limit = daemon.config.max_output_bytes + _BODY_OVERHEAD
    req: CompleteTokenRequest = _decode(await _body(request, limit), CompleteTokenRequest)
    token_id = request.path_params["token_id"]
    await daemon.engine.waits.complete_token(env, token_id, bytes(req.data))
    return await daemon.engine.waits.retrieve_token(env, token_id)


async def reset_idempotency_key(
    daemon: ApiDaemon, request: Request, env: str
) -> ResetIdempotencyKeyResponse:
    req: ResetIdempotencyKeyRequest = _decode(
        await _body(request, 16 * 1024), ResetIdempotencyKeyRequest
    )
    run_ids = await daemon.engine.reset_idempotency_key(env, req.task_id, req.key)
    return ResetIdempotencyKeyResponse(task_id=req.task_id, key=req.key, run_ids=run_ids)


async def retrieve_token(daemon: ApiDaemon, request: Request, env: str) -> TokenInfo:
    token = await daemon.engine.waits.retrieve_token(env, request.path_params["token_id"])
    return msgspec.structs.replace(token, url=daemon.engine.callbacks.url(token.id))


async def list_tokens(daemon: ApiDaemon, request: Request, env: str) -> TokenPage:
    status = request.query_params.get("status") or None
    if status not in (None, "WAITING", "COMPLETED", "TIMED_OUT"):
        raise BadRequest(400, f"status={status!r}: use WAITING, COMPLETED or TIMED_OUT")
    limit = int_param(request, "limit", 50, 1, 1000)
    cursor = request.query_params.get("cursor") or None
    page, next_cursor = await daemon.engine.waits.list_tokens(env, status, limit, cursor)
    return TokenPage(data=page, next_cursor=next_cursor)


async def events(daemon: ApiDaemon, request: Request, env: str) -> StreamingResponse:
    resume = request.query_params.get("resume") == "1"
    last_event_id = request.headers.get("last-event-id") or None
    return StreamingResponse(
        daemon.events.stream(env, resume=resume, last_event_id=last_event_id),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


_RUN_FILTERS = (
    ("status", "comma-separated statuses"),
    ("task", "comma-separated task ids"),
    ("tag", "comma-separated tags (any matches)"),
    ("version", "locked version"),
    ("parent", "the parent run's id: its child runs"),
    ("batch", "a batch id: the runs of that batch"),
    ("from", "created at or after (ISO 8601 or epoch seconds)"),
    ("to", "created before (ISO 8601 or epoch seconds)"),
    ("updated_from", "changed at or after (ISO 8601 or epoch seconds): a mirror's catch-up"),
    ("limit", "page size, 1-1000 (default 50)", PAGE_LIMIT),
    ("cursor", "next_cursor of the previous page"),
)

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", "/healthz", health, "Daemon health", response=Health),
    RouteSpec(
        "POST",
        "/api/v1/tasks/{task_id}/trigger",
        trigger,
        "Trigger a run of a task",
        request=TriggerRequest,
        response=TriggerResponse,
    ),
    RouteSpec(
        "POST",
        "/api/v1/tasks/batch",
        batch_trigger,
        "Trigger up to 1,000 runs in one commit",
        request=BatchTriggerRequest,
        response=BatchTriggerResponse,
    ),
    RouteSpec(
        "GET", "/api/v1/tasks", list_tasks, "Tasks of the current version", response=TaskList
    ),
    RouteSpec(
        "GET",
        "/api/v1/runs",
        list_runs,
        "List runs, newest first",
        response=RunPage,
        query=_RUN_FILTERS,
    ),
    RouteSpec("GET", "/api/v3/runs/{run_id}", get_run, "Retrieve a run", response=Run),
    RouteSpec(
        "GET",
        "/api/v1/runs/{run_id}/wait",
        wait_run,
        "Wait until a run is final (long poll)",
        response=Run,
        query=(
            ("timeout_s", "seconds to wait at most (default 30, max 3600)", {"type": "number"}),
            ("history", "false to leave out attempts and snapshots (default true)"),
        ),
    ),
    RouteSpec("GET", "/api/v1/runs/{run_id}/logs", run_logs, "A run's log lines", response=LogPage),
    RouteSpec("POST", "/api/v2/runs/{run_id}/cancel", cancel_run, "Cancel a run", response=Run),
    RouteSpec(
        "POST",
        "/api/v1/runs/{run_id}/replay",
        replay_run,
        "Replay a run with the same payload",
        request=ReplayRequest,
        response=TriggerResponse,
    ),
    RouteSpec(
        "POST",
        "/api/v1/runs/{run_id}/reschedule",
        reschedule_run,
        "Move a delayed run",
        request=RescheduleRequest,
        response=Run,
    ),
    RouteSpec(
        "POST",
        "/api/v1/versions",
        register_version,
        "Register a version from a gzipped tar of the project",
        response=VersionInfo,
        query=(
            ("promote", "make it current when it builds (default true)"),
            ("wait", "answer when READY or FAILED (default true); false: answer BUILDING"),
        ),
        content_type="application/gzip",
    ),
    RouteSpec(
        "GET", "/api/v1/versions", list_versions, "Versions, newest first", response=VersionList
    ),
    RouteSpec(
        "POST",
        "/api/v1/versions/{version}/promote",
        promote_version,
        "Make a version current",
        response=VersionInfo,
    ),
    RouteSpec("GET", "/api/v1/queues", list_queues, "Queues and their load", response=QueueList),
    RouteSpec(
        "GET", "/api/v1/queues/{name:path}", get_queue, "A queue and its load", response=QueueInfo
    ),
    RouteSpec(
        "POST", "/api/v1/queues/{name:path}/pause", pause_queue, "Pause a queue", response=QueueInfo
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/resume",
        resume_queue,
        "Resume a queue",
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/concurrency",
        queue_limit,
        "Override a queue's concurrency limit",
        request=QueueLimitRequest,
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/concurrency/reset",
        reset_queue_limit,
        "Go back to the concurrency limit in the code",
        response=QueueInfo,
    ),
    RouteSpec("GET", "/api/v1/processes", list_processes, "Run processes", response=ProcessList),
    RouteSpec(
        "POST",
        "/api/v1/waitpoints/tokens",
        create_token,
        "Create a wait token",
        request=CreateTokenRequest,
        response=WaitToken,
    ),
    RouteSpec(
        "GET",
        "/api/v1/waitpoints/tokens",
        list_tokens,
        "List wait tokens, newest first",
        response=TokenPage,
        query=(
            (
                "status",
                "only tokens in this state",
                {"enum": ["WAITING", "COMPLETED", "TIMED_OUT"]},
            ),
            ("limit", "page size, 1-1000 (default 50)", PAGE_LIMIT),
            ("cursor", "next_cursor of the previous page"),
        ),
    ),
    RouteSpec(
        "GET",
        "/api/v1/waitpoints/tokens/{token_id}",
        retrieve_token,
        "Retrieve a wait token",
        response=TokenInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/waitpoints/tokens/{token_id}/complete",
        complete_token,
        "Complete a wait token with JSON data",
        request=CompleteTokenRequest,
        response=TokenInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/idempotency-keys/reset",
        reset_idempotency_key,
        "Free a task's idempotency key: the next trigger with it makes a new run",
        request=ResetIdempotencyKeyRequest,
        response=ResetIdempotencyKeyResponse,
    ),
    RouteSpec("GET", "/api/v1/events", events, "Run changes as server-sent events"),
    *ADMIN_ROUTES,
    *BATCH_ROUTES,
    *BULK_ROUTES,
    *CALLBACK_ROUTES,
    *ALERT_ROUTES,
    *SYNC_ROUTES,
    *BUNDLE_ROUTES,
)


Endpoint = Callable[[Request], Awaitable[Response]]


def build_app(daemon: ApiDaemon) -> Router:
    """The ASGI app serving ``ROUTES`` and ``/openapi.json``."""
    from ember.daemon.api.openapi import openapi_document

    document = _json.encode(openapi_document(ROUTES))

    def endpoint(spec: RouteSpec) -> Endpoint:
        forwarded = FORWARDED.get((spec.method, spec.path))

        async def handle(request: Request) -> Response:
            try:
                env = "" if spec.public else await _authorize(daemon, request)
                handler = spec.handler
                # A forwarded environment's runs live in the outbox and the mirror.
                if forwarded is not None and daemon.sync is not None and daemon.sync.forwards(env):
                    handler = forwarded
                result = await handler(daemon, request, env)
            except ApiError as exc:
                return _error_response(exc.status, exc.detail)
            except EmberError as exc:
                return _error_response(400, str(exc))
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is left to read an answer
            except Exception as exc:
                return _server_error(daemon, spec, request, exc)
            if isinstance(result, Response):
                return result
            return _json_response(result)

        return handle

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    routes = [(s.method, s.path, endpoint(s)) for s in ROUTES]
    routes.append(("GET", "/openapi.json", openapi))
    return Router(routes)


def _server_error(daemon: ApiDaemon, spec: RouteSpec, request: Request, exc: Exception) -> Response:
    """A 507 for a full disk, else a 500 whose body holds no internals (the log has them)."""
    if is_disk_full(exc):
        log.error("%s %s: the disk is full (%s)", spec.method, request.url.path, exc)
        return _error_response(
            507,
            f"the disk is full: free space under {daemon.config.state_dir} (the daemon's "
            "database, blobs and logs), then retry; nothing of this request was kept",
        )
    reference = secrets.token_hex(4)
    log.exception("%s %s failed (error %s)", spec.method, request.url.path, reference)
    return _error_response(
        500, f"the daemon failed on this request: its log has the details under error {reference}"
    )


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it came from, is SQLite's or the OS's "no space left"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) == (
            sqlite3.SQLITE_FULL
        ):
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Router:
    """The ASGI app: each request goes straight to the first route that matches it.

    Starlette's app wraps every request in three middleware layers and a router built for
    mounts and websockets; with ``RouteSpec`` handlers catching their own errors none of it
    is needed. Requests and responses are still Starlette's.
    """

    def __init__(self, routes: list[tuple[str, str, Endpoint]]) -> None:
        self._routes: list[tuple[str, str | re.Pattern[str], dict[str, Any], Endpoint]] = []
        for method, path, handler in routes:
            if "{" in path:
                regex, _, convertors = compile_path(path)
                self._routes.append((method, regex, convertors, handler))
            else:
                self._routes.append((method, path, {}, handler))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; lifespan is off
        response = await self._respond(scope, receive)
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        method, path = scope["method"], scope["path"]
        allowed: list[str] = []
        for route_method, pattern, convertors, handler in self._routes:
            if isinstance(pattern, str):
                if pattern != path:
                    continue
                params: dict[str, Any] = {}
            else:
                match = pattern.match(path)
                if match is None:
                    continue
                params = {k: convertors[k].convert(v) for k, v in match.groupdict().items()}
            if route_method != method:
                allowed.append(route_method)
                continue
            scope["path_params"] = params
            return await handler(Request(scope, receive))
        if allowed:
            methods = ", ".join(dict.fromkeys(allowed))
            response = _error_response(
                405, f"{method} is not allowed on {path}; it accepts {methods}"
            )
            response.headers["allow"] = methods
            return response
        return _error_response(404, f"no such endpoint: {method} {path} (see /openapi.json)")


async def _authorize(daemon: ApiDaemon, request: Request) -> str:
    """The request's environment, checking the API key on TCP.

    Raises:
        Unauthorized: TCP without a valid key, or a key used for another environment.
    """
    named = request.headers.get("x-ember-env")
    if named is not None:
        check_env_name(named)  # an empty header is a mistake too, not "the default"
    if not over_tcp(request):
        return named or "dev"
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise Unauthorized(
            401,
            "this daemon needs an API key over TCP: send `Authorization: Bearer <key>` "
            "(set EMBER_API_KEY); `ember keys create` makes one",
        )
    key_hash = hash_key(header[7:].strip())
    env = await daemon.db.read(lambda conn: store.key_env(conn, key_hash))
    if env is None:
        raise Unauthorized(401, "the API key is unknown or revoked")
    if named is not None and named != env:
        raise Unauthorized(403, f"this API key belongs to environment {env}, not {named}")
    return env
