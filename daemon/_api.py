"""The HTTP API: REST/JSON on the Unix socket and, when configured, on TCP with API keys.

Routes are declared once in ``ROUTES`` with their request and response types; the ASGI app
(:class:`Router`) and the OpenAPI document (:mod:`ember.daemon._openapi`) are both built from
that table.

The environment of a request comes from the ``x-ember-env`` header on the Unix socket (its
owner may name any environment); over TCP the API key decides it and a header naming
another environment is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

import ember
from ember._duration import parse_duration_s
from ember._errors import ApiError, BadRequest, ConfigError, EmberError, Unauthorized
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
from ember.daemon import _store as store
from ember.daemon._admin_api import ADMIN_ROUTES
from ember.daemon._bundles import BUNDLE_ROUTES
from ember.daemon._environments import check_env_name
from ember.daemon._routing import RouteSpec, check_run_env, over_tcp
from ember.daemon._routing import read_body as _body
from ember.daemon._routing import read_json as _decode
from ember.daemon._sync_api import FORWARDED, SYNC_ROUTES

if TYPE_CHECKING:
    from ember.daemon._server import Daemon

_json = msgspec.json.Encoder()
log = logging.getLogger("ember.daemon")
MAX_BATCH_ITEMS = 1000
MAX_REQUEST_KEY_CHARS = 200
MAX_VERSION_BYTES = 256 * 1024 * 1024
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
        return float(raw)
    except ValueError:
        raise BadRequest(400, f"query parameter {name}={raw!r} is not a number") from None


def _time_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise BadRequest(
            400, f"query parameter {name}={raw!r} is not an ISO 8601 date-time or epoch seconds"
        ) from None


# -- handlers ----------------------------------------------------------------------------


async def health(daemon: Daemon, request: Request, env: str) -> Health:
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


async def list_processes(daemon: Daemon, request: Request, env: str) -> ProcessList:
    found = daemon.supervisor.processes()
    if over_tcp(request):
        found = [p for p in found if p.env == env]
    return ProcessList(data=found)


async def pause_queue(daemon: Daemon, request: Request, env: str) -> QueueInfo:
    await daemon.engine.pause_queue(env, request.path_params["name"], True)
    return _queue_info(daemon, env, request.path_params["name"])


async def resume_queue(daemon: Daemon, request: Request, env: str) -> QueueInfo:
    await daemon.engine.pause_queue(env, request.path_params["name"], False)
    return _queue_info(daemon, env, request.path_params["name"])


async def queue_limit(daemon: Daemon, request: Request, env: str) -> QueueInfo:
    req: QueueLimitRequest = _decode(await _body(request, 4096), QueueLimitRequest)
    name = request.path_params["name"]
    await daemon.engine.override_queue_limit(env, name, req.concurrency_limit, reset=False)
    return _queue_info(daemon, env, name)


async def reset_queue_limit(daemon: Daemon, request: Request, env: str) -> QueueInfo:
    name = request.path_params["name"]
    await daemon.engine.override_queue_limit(env, name, None, reset=True)
    return _queue_info(daemon, env, name)


def _queue_info(daemon: Daemon, env: str, name: str) -> QueueInfo:
    queue = daemon.engine.queue
    running, queued = queue.stats(env).get(name, (0, 0))
    return QueueInfo(
        name=name,
        env=env,
        concurrency_limit=queue.limit(env, name),
        running=running,
        queued=queued,
        paused=queue.is_paused(env, name),
    )


async def trigger(daemon: Daemon, request: Request, env: str) -> TriggerResponse:
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


async def batch_trigger(daemon: Daemon, request: Request, env: str) -> BatchTriggerResponse:
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


async def list_runs(daemon: Daemon, request: Request, env: str) -> RunPage:
    statuses = _csv(request, "status")
    for status in statuses:
        if status not in RunStatus.__members__:
            raise BadRequest(
                400,
                f"status={status!r} is not a run status; use one of "
                + ", ".join(RunStatus.__members__),
            )
    limit = int(_float_param(request, "limit", 50) or 50)
    if not 1 <= limit <= 1000:
        raise BadRequest(400, "limit must be between 1 and 1000")
    flt = store.RunFilter(
        env=env,
        statuses=statuses,
        tasks=_csv(request, "task"),
        tags=_csv(request, "tag"),
        version=request.query_params.get("version") or None,
        parent=request.query_params.get("parent") or None,
        created_from=_time_param(request, "from"),
        created_to=_time_param(request, "to"),
        updated_from=_time_param(request, "updated_from"),
    )
    cursor = request.query_params.get("cursor") or None
    page, next_cursor = await daemon.db.read(lambda conn: store.list_runs(conn, flt, limit, cursor))
    return RunPage(data=page, next_cursor=next_cursor)


async def _run_id(daemon: Daemon, request: Request, env: str) -> str:
    run_id: str = request.path_params["run_id"]
    await check_run_env(daemon, request, env, run_id)
    return run_id


async def get_run(daemon: Daemon, request: Request, env: str) -> Run:
    return await daemon.engine.get_run(await _run_id(daemon, request, env))


async def wait_run(daemon: Daemon, request: Request, env: str) -> Run:
    timeout_s = _float_param(request, "timeout_s", 30.0) or 0.0
    history = request.query_params.get("history", "true") != "false"
    run_id = await _run_id(daemon, request, env)
    return await daemon.engine.wait_final(run_id, min(timeout_s, 3600.0), history)


async def run_logs(daemon: Daemon, request: Request, env: str) -> LogPage:
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.get_run(run_id)  # 404 for an unknown run, not an empty list
    return LogPage(data=await daemon.db.read(lambda conn: store.get_logs(conn, run_id)))


async def cancel_run(daemon: Daemon, request: Request, env: str) -> Run:
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.cancel(run_id)
    return await daemon.engine.get_run(run_id)


async def replay_run(daemon: Daemon, request: Request, env: str) -> TriggerResponse:
    req: ReplayRequest = _decode(await _body(request, 64 * 1024) or b"{}", ReplayRequest)
    return await daemon.engine.replay(env, await _run_id(daemon, request, env), req.version)


async def reschedule_run(daemon: Daemon, request: Request, env: str) -> Run:
    req: RescheduleRequest = _decode(await _body(request, 64 * 1024), RescheduleRequest)
    run_id = await _run_id(daemon, request, env)
    await daemon.engine.reschedule(run_id, req.delay)
    return await daemon.engine.get_run(run_id)


async def register_version(daemon: Daemon, request: Request, env: str) -> VersionInfo:
    archive = await _body(request, MAX_VERSION_BYTES)
    promote = request.query_params.get("promote", "true") != "false"
    wait = request.query_params.get("wait", "true") != "false"
    return await daemon.register_version(env, archive, promote=promote, wait=wait)


async def list_versions(daemon: Daemon, request: Request, env: str) -> VersionList:
    building = daemon.builder.building(env)
    return VersionList(data=building + daemon.engine.version_list(env))


async def promote_version(daemon: Daemon, request: Request, env: str) -> VersionInfo:
    return await daemon.promote(env, request.path_params["version"])


async def list_tasks(daemon: Daemon, request: Request, env: str) -> TaskList:
    current = daemon.engine.current.get(env)
    if current is None:
        return TaskList(version=None, data=[])
    record = daemon.engine.versions[(env, current)]
    return TaskList(version=current, data=sorted(record.tasks.values(), key=lambda t: t.id))


async def list_queues(daemon: Daemon, request: Request, env: str) -> QueueList:
    names = sorted(daemon.engine.queue.stats(env))
    return QueueList(data=[_queue_info(daemon, env, name) for name in names])


async def create_token(daemon: Daemon, request: Request, env: str) -> WaitToken:
    req: CreateTokenRequest = _decode(await _body(request, 64 * 1024), CreateTokenRequest)
    try:
        timeout_s = parse_duration_s(req.timeout) if req.timeout is not None else None
        key_ttl_s = (
            parse_duration_s(req.idempotency_key_ttl)
            if req.idempotency_key_ttl is not None
            else None
        )
    except ConfigError as exc:
        raise BadRequest(400, f"timeout: {exc}") from None
    if len(req.tags) > 10:
        raise BadRequest(400, "tags: at most 10 tags per token")
    return await daemon.engine.waits.create_token(
        env, timeout_s, req.idempotency_key, key_ttl_s, req.tags, req.run_id
    )


async def complete_token(daemon: Daemon, request: Request, env: str) -> TokenInfo:
    limit = daemon.config.max_output_bytes + _BODY_OVERHEAD
    req: CompleteTokenRequest = _decode(await _body(request, limit), CompleteTokenRequest)
    token_id = request.path_params["token_id"]
    await daemon.engine.waits.complete_token(env, token_id, bytes(req.data))
    return await daemon.engine.waits.retrieve_token(env, token_id)


async def retrieve_token(daemon: Daemon, request: Request, env: str) -> TokenInfo:
    return await daemon.engine.waits.retrieve_token(env, request.path_params["token_id"])


async def list_tokens(daemon: Daemon, request: Request, env: str) -> TokenPage:
    status = request.query_params.get("status") or None
    if status not in (None, "WAITING", "COMPLETED", "TIMED_OUT"):
        raise BadRequest(400, f"status={status!r}: use WAITING, COMPLETED or TIMED_OUT")
    limit = int(_float_param(request, "limit", 50) or 50)
    if not 1 <= limit <= 1000:
        raise BadRequest(400, "limit must be between 1 and 1000")
    cursor = request.query_params.get("cursor") or None
    page, next_cursor = await daemon.engine.waits.list_tokens(env, status, limit, cursor)
    return TokenPage(data=page, next_cursor=next_cursor)


async def events(daemon: Daemon, request: Request, env: str) -> StreamingResponse:
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
    ("from", "created at or after (ISO 8601 or epoch seconds)"),
    ("to", "created before (ISO 8601 or epoch seconds)"),
    ("updated_from", "changed at or after (ISO 8601 or epoch seconds): a mirror's catch-up"),
    ("limit", "page size, 1-1000 (default 50)"),
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
            ("timeout_s", "seconds to wait at most (default 30, max 3600)"),
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
        query=(("status", "WAITING, COMPLETED or TIMED_OUT"), ("limit", "1-1000"), ("cursor", "")),
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
    RouteSpec("GET", "/api/v1/events", events, "Run changes as server-sent events"),
    *ADMIN_ROUTES,
    *SYNC_ROUTES,
    *BUNDLE_ROUTES,
)


Endpoint = Callable[[Request], Awaitable[Response]]


def build_app(daemon: Daemon) -> Router:
    """The ASGI app serving ``ROUTES`` and ``/openapi.json``."""
    from ember.daemon._openapi import openapi_document

    document = _json.encode(openapi_document(ROUTES))

    def endpoint(spec: RouteSpec) -> Endpoint:
        forwarded = FORWARDED.get((spec.method, spec.path))

        async def handle(request: Request) -> Response:
            try:
                env = await _authorize(daemon, request)
                handler = spec.handler
                # A forwarded environment's runs live in the outbox and the mirror.
                if forwarded is not None and daemon.sync is not None and daemon.sync.forwards(env):
                    handler = forwarded
                result = await handler(daemon, request, env)
            except ApiError as exc:
                return _error_response(exc.status, exc.detail)
            except EmberError as exc:
                return _error_response(400, str(exc))
            except Exception as exc:
                log.exception("%s %s failed", spec.method, request.url.path)
                return _error_response(500, f"internal error ({type(exc).__name__}: {exc})")
            if isinstance(result, Response):
                return result
            return _json_response(result)

        return handle

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    routes = [(s.method, s.path, endpoint(s)) for s in ROUTES]
    routes.append(("GET", "/openapi.json", openapi))
    return Router(routes)


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
        other_method = False
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
                other_method = True
                continue
            scope["path_params"] = params
            return await handler(Request(scope, receive))
        if other_method:
            return _error_response(405, f"{method} is not allowed on {path}")
        return _error_response(404, f"no such endpoint: {method} {path} (see /openapi.json)")


async def _authorize(daemon: Daemon, request: Request) -> str:
    """The request's environment, checking the API key on TCP.

    Raises:
        Unauthorized: TCP without a valid key, or a key used for another environment.
    """
    named = request.headers.get("x-ember-env") or None
    if named is not None:
        check_env_name(named)
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
