"""The queue routes' handlers: list, retrieve, pause, resume, override the limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._errors import NotFound
from ember._types import QueueInfo, QueueLimitRequest, QueueList
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode
from ember.daemon.store.columns import opt_ts

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


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
        rate_limited_until=opt_ts(until),
    )


async def list_queues(daemon: ApiDaemon, request: Request, env: str) -> QueueList:
    names = sorted(daemon.engine.queue.stats(env))
    return QueueList(data=[_queue_info(daemon, env, name) for name in names])
