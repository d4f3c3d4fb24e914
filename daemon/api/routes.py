"""The HTTP API: REST/JSON on the Unix socket and, when configured, on TCP with API keys.

Routes are declared once in ``ROUTES`` with their request and response types; the ASGI app
(:mod:`ember.daemon.api.app`) and the OpenAPI document (:mod:`ember.daemon.api.openapi`) are
both built from that table. Its handlers live by area: runs (:mod:`.runs`), queues
(:mod:`.queues`), tokens (:mod:`.tokens`), and the modules whose tables it joins; the health,
processes, versions, tasks and events handlers are here.

The environment of a request comes from the ``x-ember-env`` header on the Unix socket (its
owner may name any environment); over TCP the API key decides it and a header naming
another environment is refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import StreamingResponse

import ember
from ember._types import (
    BatchTriggerRequest,
    BatchTriggerResponse,
    CompleteTokenRequest,
    CreateTokenRequest,
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
from ember.daemon.api import queues, runs, tokens
from ember.daemon.api.admin import ADMIN_ROUTES
from ember.daemon.api.alerts import ALERT_ROUTES
from ember.daemon.api.batches import BATCH_ROUTES
from ember.daemon.api.bulk import BULK_ROUTES
from ember.daemon.api.bundles import BUNDLE_ROUTES
from ember.daemon.api.callbacks import CALLBACK_ROUTES
from ember.daemon.api.metadata import METADATA_ROUTES
from ember.daemon.api.realtime import REALTIME_ROUTES
from ember.daemon.api.routing import PAGE_LIMIT, RouteSpec, image_options, over_tcp
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.streams import STREAM_ROUTES
from ember.daemon.api.sync import SYNC_ROUTES
from ember.daemon.api.traces import TRACE_ROUTES
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

_json = msgspec.json.Encoder()
log = logging.getLogger("ember.daemon")


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
        checkpoint_counters=(
            dict(daemon.engine.checkpointer.counters) if daemon.engine.checkpointer else {}
        ),
    )


async def list_processes(daemon: ApiDaemon, request: Request, env: str) -> ProcessList:
    found = daemon.supervisor.processes()
    if over_tcp(request):
        found = [p for p in found if p.env == env]
    return ProcessList(data=found)


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
        runs.trigger,
        "Trigger a run of a task",
        request=TriggerRequest,
        response=TriggerResponse,
    ),
    RouteSpec(
        "POST",
        "/api/v1/tasks/batch",
        runs.batch_trigger,
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
        runs.list_runs,
        "List runs, newest first",
        response=RunPage,
        query=_RUN_FILTERS,
    ),
    RouteSpec("GET", "/api/v3/runs/{run_id}", runs.get_run, "Retrieve a run", response=Run),
    RouteSpec(
        "GET",
        "/api/v1/runs/{run_id}/wait",
        runs.wait_run,
        "Wait until a run is final (long poll)",
        response=Run,
        query=(
            ("timeout_s", "seconds to wait at most (default 30, max 3600)", {"type": "number"}),
            ("history", "false to leave out attempts and snapshots (default true)"),
        ),
    ),
    RouteSpec(
        "GET", "/api/v1/runs/{run_id}/logs", runs.run_logs, "A run's log lines", response=LogPage
    ),
    RouteSpec(
        "POST", "/api/v2/runs/{run_id}/cancel", runs.cancel_run, "Cancel a run", response=Run
    ),
    RouteSpec(
        "POST",
        "/api/v1/runs/{run_id}/replay",
        runs.replay_run,
        "Replay a run with the same payload",
        request=ReplayRequest,
        response=TriggerResponse,
    ),
    RouteSpec(
        "POST",
        "/api/v1/runs/{run_id}/reschedule",
        runs.reschedule_run,
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
    RouteSpec(
        "GET", "/api/v1/queues", queues.list_queues, "Queues and their load", response=QueueList
    ),
    RouteSpec(
        "GET",
        "/api/v1/queues/{name:path}",
        queues.get_queue,
        "A queue and its load",
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/pause",
        queues.pause_queue,
        "Pause a queue",
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/resume",
        queues.resume_queue,
        "Resume a queue",
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/concurrency",
        queues.queue_limit,
        "Override a queue's concurrency limit",
        request=QueueLimitRequest,
        response=QueueInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/queues/{name:path}/concurrency/reset",
        queues.reset_queue_limit,
        "Go back to the concurrency limit in the code",
        response=QueueInfo,
    ),
    RouteSpec("GET", "/api/v1/processes", list_processes, "Run processes", response=ProcessList),
    RouteSpec(
        "POST",
        "/api/v1/waitpoints/tokens",
        tokens.create_token,
        "Create a wait token",
        request=CreateTokenRequest,
        response=WaitToken,
    ),
    RouteSpec(
        "GET",
        "/api/v1/waitpoints/tokens",
        tokens.list_tokens,
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
        tokens.retrieve_token,
        "Retrieve a wait token",
        response=TokenInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/waitpoints/tokens/{token_id}/complete",
        tokens.complete_token,
        "Complete a wait token with JSON data",
        request=CompleteTokenRequest,
        response=TokenInfo,
    ),
    RouteSpec(
        "POST",
        "/api/v1/idempotency-keys/reset",
        tokens.reset_idempotency_key,
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
    *TRACE_ROUTES,
    *METADATA_ROUTES,
    *REALTIME_ROUTES,
    *STREAM_ROUTES,
    *SYNC_ROUTES,
    *BUNDLE_ROUTES,
)
