"""Forwarded environments: the local daemon's API answers for them from the outbox and the
mirror, and a :class:`ember.sync.SyncLink` per environment moves runs to and from the remote.

A trigger in a forwarded environment is committed to the outbox and answered at once with a
local run id, online or not; ``runs.retrieve`` of that id shows the remote run once the
mirror has it. Listing, retrieving, waiting and logs read the mirror (offline too, each row
marked with how fresh it is); cancel, replay and token completion go through the outbox.
``GET /api/v1/whoami`` (every daemon) tells a key's environment, for ``ember login``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

import ember
from ember._admin_types import WhoAmI
from ember._config import ClientSettings
from ember._duration import parse_duration_s
from ember._errors import BadRequest, ConfigError, Conflict, NotFound
from ember._types import (
    REQUEST_KEY_HEADER,
    BatchItem,
    BatchTriggerRequest,
    BatchTriggerResponse,
    CompleteTokenRequest,
    LogPage,
    ReplayRequest,
    Run,
    RunPage,
    RunStatus,
    TokenInfo,
    TriggerOptions,
    TriggerRequest,
    TriggerResponse,
)
from ember.daemon.api.routing import BODY_OVERHEAD, RouteSpec, over_tcp
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode
from ember.daemon.config import SyncTarget
from ember.daemon.engine.ids import new_batch_id, new_run_id
from ember.daemon.engine.mirror import MirrorDb
from ember.daemon.store import idempotency as requests
from ember.daemon.store import runs as store
from ember.daemon.store import sync as sync_store
from ember.daemon.store.sync import MirrorRow

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon as Daemon
    from ember.sync._link import SyncLink

_answer_encoder = msgspec.msgpack.Encoder()
_answer_decoder = msgspec.msgpack.Decoder(tuple[str | None, list[TriggerResponse]])
REQUEST_KEY_TTL_S = 600.0


class SyncService:
    """The forwarded environments of a daemon: their links, outbox and mirror."""

    def __init__(self, daemon: Daemon, targets: tuple[SyncTarget, ...]) -> None:
        self.daemon = daemon
        self.targets = {t.env: t for t in targets}
        self.db = MirrorDb(daemon.db, daemon.events, daemon.clock)
        self.links: dict[str, SyncLink] = {}

    def forwards(self, env: str) -> bool:
        """True when this environment's runs go to a remote daemon."""
        return env in self.targets

    async def start(self) -> None:
        """Start a link per forwarded environment (what the outbox holds goes out first); the
        daemon added the environments to the mirror before its API served them."""
        from ember.sync._link import SyncLink

        for env, target in self.targets.items():
            settings = ClientSettings(
                socket_path=self.daemon.config.api_socket,
                url=target.url,
                api_key=target.api_key,
                env=env,
                profile=target.profile,
                ca_file=target.ca_file,
            )
            link = self.links[env] = SyncLink(env, settings, self.db)
            link.start()

    async def close(self) -> None:
        """Stop the links; the outbox keeps what was not sent."""
        for link in self.links.values():
            await link.close()

    # -- reading the mirror -------------------------------------------------------------

    async def row(self, env: str, run_id: str) -> MirrorRow:
        """A run of a forwarded environment by any of its ids.

        Raises:
            NotFound: neither in the outbox nor in the mirror.
        """
        row = await self.daemon.db.read(lambda conn: sync_store.get(conn, env, run_id))
        if row is None:
            target = self.targets[env]
            raise NotFound(
                404,
                f"run {run_id} is not in the mirror of {env} (profile {target.profile}, "
                f"{target.url}); it may not have been synced yet",
            )
        return row

    def run_of(self, env: str, row: MirrorRow) -> Run:
        """The fullest view of a row: the remote run once final, else its summary's fields."""
        mark = self.db.mark(env, row)
        if row.run is not None:
            return msgspec.structs.replace(row.run, id=row.id, sync=mark)
        fields: dict[str, Any] = {
            f: getattr(row.summary, f)
            for f in Run.__struct_fields__
            if f not in ("sync", "id") and hasattr(row.summary, f)
        }
        return Run(id=row.id, **fields, sync=mark)


def _service(daemon: Daemon) -> SyncService:
    assert isinstance(daemon.sync, SyncService)
    return daemon.sync


def _check_options(options: TriggerOptions, where: str) -> None:
    """What can be checked without the remote: durations (the remote checks the rest)."""
    for name in ("delay", "ttl", "idempotency_key_ttl"):
        value = getattr(options, name)
        if isinstance(value, str):
            try:
                parse_duration_s(value)
            except ConfigError as exc:
                raise BadRequest(400, f"{where}options.{name}: {exc}") from None


async def _enqueue(
    daemon: Daemon, env: str, items: list[BatchItem], request_key: str | None, batch: bool
) -> tuple[str | None, list[TriggerResponse]]:
    for index, item in enumerate(items):
        _check_options(item.options, f"items[{index}]." if batch else "")
    now = daemon.clock()
    batch_id = new_batch_id() if batch else None

    def write(conn: Any) -> tuple[str | None, list[TriggerResponse]]:
        if request_key is not None:
            answer = requests.find_trigger_request(conn, env, request_key, now - REQUEST_KEY_TTL_S)
            if answer is not None:
                return _answer_decoder.decode(answer)
        responses = []
        for item in items:
            key = item.options.idempotency_key
            existing = sync_store.find_key(conn, env, item.task, key) if key else None
            if existing is not None:
                responses.append(TriggerResponse(id=existing, task_id=item.task, is_cached=True))
                continue
            local_id = new_run_id()
            options = item.options
            delayed = options.delay is not None
            summary = ember.RunSummary(
                id=local_id,
                task_id=item.task,
                status=RunStatus.DELAYED if delayed else RunStatus.QUEUED,
                env=env,
                created_at=store.ts(now),
                updated_at=store.ts(now),
                tags=list(options.tags),
                idempotency_key=key,
                queue=options.queue or "",
                concurrency_key=options.concurrency_key,
                priority=options.priority,
                batch_id=batch_id,
            )
            sync_store.enqueue_trigger(conn, summary, msgspec.json.encode(item), key)
            responses.append(TriggerResponse(id=local_id, task_id=item.task))
        if request_key is not None:
            requests.save_trigger_request(
                conn, env, request_key, now, _answer_encoder.encode((batch_id, responses))
            )
        return batch_id, responses

    result = await daemon.db.write(write)
    service = _service(daemon)
    await service.db.changed(env, [r.id for r in result[1] if not r.is_cached])
    service.links[env].wake()
    return result


def _request_key(request: Request) -> str | None:
    return request.headers.get(REQUEST_KEY_HEADER) or None


# -- handlers for forwarded environments ---------------------------------------------------


async def trigger(daemon: Daemon, request: Request, env: str) -> TriggerResponse:
    body = await _body(request, daemon.config.max_payload_bytes + BODY_OVERHEAD)
    req: TriggerRequest = _decode(body, TriggerRequest)
    item = BatchItem(task=request.path_params["task_id"], payload=req.payload, options=req.options)
    _, responses = await _enqueue(daemon, env, [item], _request_key(request), batch=False)
    return responses[0]


async def batch_trigger(daemon: Daemon, request: Request, env: str) -> BatchTriggerResponse:
    limit = 1000 * (daemon.config.max_payload_bytes + BODY_OVERHEAD)
    req: BatchTriggerRequest = _decode(await _body(request, limit), BatchTriggerRequest)
    if not 1 <= len(req.items) <= 1000:
        raise BadRequest(400, f"items: a batch holds 1 to 1000 runs, got {len(req.items)}")
    batch_id, responses = await _enqueue(daemon, env, req.items, _request_key(request), True)
    assert batch_id is not None
    return BatchTriggerResponse(batch_id=batch_id, runs=responses)


async def list_runs(daemon: Daemon, request: Request, env: str) -> RunPage:
    service = _service(daemon)
    raw = request.query_params
    statuses = tuple(s for s in (raw.get("status") or "").split(",") if s)
    for status in statuses:
        if status not in RunStatus.__members__:
            raise BadRequest(400, f"status={status!r} is not a run status")
    tasks = tuple(t for t in (raw.get("task") or "").split(",") if t)
    try:
        limit = int(raw.get("limit") or 50)
    except ValueError:
        raise BadRequest(400, f"limit={raw.get('limit')!r} is not a number") from None
    if not 1 <= limit <= 1000:
        raise BadRequest(400, "limit must be between 1 and 1000")
    cursor = raw.get("cursor") or None
    rows, next_cursor = await daemon.db.read(
        lambda conn: sync_store.list_rows(conn, env, statuses, tasks, limit, cursor)
    )
    return RunPage(data=[service.db.shown(env, r) for r in rows], next_cursor=next_cursor)


async def get_run(daemon: Daemon, request: Request, env: str) -> Run:
    service = _service(daemon)
    return service.run_of(env, await service.row(env, request.path_params["run_id"]))


async def wait_run(daemon: Daemon, request: Request, env: str) -> Run:
    service = _service(daemon)
    raw = request.query_params.get("timeout_s") or "30"
    try:
        timeout_s = min(float(raw), 3600.0)
    except ValueError:
        raise BadRequest(400, f"query parameter timeout_s={raw!r} is not a number") from None
    deadline = time.monotonic() + timeout_s
    while True:
        row = await service.row(env, request.path_params["run_id"])
        left = deadline - time.monotonic()
        # Final and held whole (output, attempts), or out of time: answer.
        if (row.summary.status.is_final and row.run is not None) or left <= 0:
            return service.run_of(env, row)
        await service.db.wait_change(env, min(left, 5.0))


async def run_logs(daemon: Daemon, request: Request, env: str) -> LogPage:
    service = _service(daemon)
    row = await service.row(env, request.path_params["run_id"])
    if row.logs is not None or row.remote_id is None:
        return LogPage(data=row.logs or [])
    # Not final yet: the remote's live lines when it answers, else none held so far.
    link = service.links[env]
    from ember._client import Call
    from ember._errors import EmberError

    try:
        return await link.client.request(
            Call("GET", f"/api/v1/runs/{row.remote_id}/logs", LogPage, timeout_s=5)
        )
    except EmberError:
        return LogPage(data=[])


async def cancel_run(daemon: Daemon, request: Request, env: str) -> Run:
    service = _service(daemon)
    row = await service.row(env, request.path_params["run_id"])
    if row.summary.status.is_final:
        raise Conflict(409, f"run {row.id} is already {row.summary.status.value}")
    now = daemon.clock()
    link = service.links[env]
    if row.remote_id is None and row.local_id is not None:
        local_id = row.local_id
        async with link.outbox_lock:
            dropped = await daemon.db.write(
                lambda conn: sync_store.drop_unsent(conn, local_id, now)
            )
        if dropped:
            await service.db.changed(env, [row.id])
            return service.run_of(env, await service.row(env, row.id))
    # Sent, or being sent: the cancel follows it, naming the run by the id shown here (the
    # outbox resolves it to the remote id when it gets there).
    await daemon.db.write(lambda c: sync_store.enqueue_action(c, env, "cancel", row.id, b"", now))
    link.wake()
    return service.run_of(env, row)


async def replay_run(daemon: Daemon, request: Request, env: str) -> TriggerResponse:
    service = _service(daemon)
    req: ReplayRequest = _decode(await _body(request, 64 * 1024) or b"{}", ReplayRequest)
    row = await service.row(env, request.path_params["run_id"])
    if row.run is None:
        raise Conflict(
            409,
            f"run {row.id} is not mirrored whole yet (its payload is on the remote): replay it "
            "once it is final here, or with --profile on the remote itself",
        )
    original = row.run
    options = TriggerOptions(
        tags=list(original.tags),
        queue=original.queue or None,
        concurrency_key=original.concurrency_key,
        priority=original.priority,
        version=req.version,
        metadata=original.metadata,
    )
    item = BatchItem(task=original.task_id, payload=original.payload, options=options)
    _, responses = await _enqueue(daemon, env, [item], _request_key(request), batch=False)
    return responses[0]


async def complete_token(daemon: Daemon, request: Request, env: str) -> Response:
    limit = daemon.config.max_output_bytes + BODY_OVERHEAD
    body = await _body(request, limit)
    _decode(body, CompleteTokenRequest)
    token_id = request.path_params["token_id"]
    now = daemon.clock()
    await daemon.db.write(
        lambda conn: sync_store.enqueue_action(conn, env, "complete_token", token_id, body, now)
    )
    _service(daemon).links[env].wake()
    # Accepted, not done: the remote completes it when the outbox reaches it.
    info = TokenInfo(id=token_id, env=env, status="WAITING", created_at=store.ts(now))
    return Response(msgspec.json.encode(info), 202, media_type="application/json")


async def read_through(daemon: Daemon, request: Request, env: str) -> Response:
    """A read the mirror does not hold (versions, tasks): asked of the remote, its answer
    kept; when the remote cannot be reached, the last answer, marked with its age."""
    from ember._client import Call
    from ember._errors import ApiError, DaemonUnavailable

    service = _service(daemon)
    path = request.url.path
    try:
        raw = await service.links[env].client.request(Call("GET", path, msgspec.Raw, timeout_s=5))
    except DaemonUnavailable as exc:
        cached = await daemon.db.read(lambda conn: sync_store.cached_answer(conn, env, path))
        if cached is None:
            raise ApiError(503, f"{exc}; nothing of it is kept here yet") from None
        body, fetched_at = cached
        headers = {"x-ember-as-of": store.ts(fetched_at).isoformat()}
        return Response(body, 200, media_type="application/json", headers=headers)
    body = bytes(raw)
    now = daemon.clock()
    await daemon.db.write(lambda conn: sync_store.save_answer(conn, env, path, body, now))
    return Response(body, 200, media_type="application/json")


FORWARDED = {
    ("POST", "/api/v1/tasks/{task_id}/trigger"): trigger,
    ("POST", "/api/v1/tasks/batch"): batch_trigger,
    ("GET", "/api/v1/runs"): list_runs,
    ("GET", "/api/v3/runs/{run_id}"): get_run,
    ("GET", "/api/v1/runs/{run_id}/wait"): wait_run,
    ("GET", "/api/v1/runs/{run_id}/logs"): run_logs,
    ("POST", "/api/v2/runs/{run_id}/cancel"): cancel_run,
    ("POST", "/api/v1/runs/{run_id}/replay"): replay_run,
    ("POST", "/api/v1/waitpoints/tokens/{token_id}/complete"): complete_token,
    ("GET", "/api/v1/versions"): read_through,
    ("GET", "/api/v1/tasks"): read_through,
}
"""The routes a forwarded environment answers from the outbox and mirror, by (method, path)."""


async def whoami(daemon: Daemon, request: Request, env: str) -> WhoAmI:
    sync = daemon.sync if isinstance(daemon.sync, SyncService) else None
    target = sync.targets.get(env) if sync is not None else None
    return WhoAmI(
        env=env,
        over_tcp=over_tcp(request),
        daemon_version=ember.__version__,
        forwarded_to=f"{target.profile} ({target.url})" if target is not None else None,
    )


SYNC_ROUTES = (
    RouteSpec(
        "GET", "/api/v1/whoami", whoami, "The environment of the caller's key", response=WhoAmI
    ),
)
