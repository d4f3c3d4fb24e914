"""The token routes' handlers (Trigger.dev's waitpoint tokens) and the idempotency key reset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request

from ember._duration import parse_duration_s
from ember._errors import BadRequest, ConfigError
from ember._types import (
    CompleteTokenRequest,
    CreateTokenRequest,
    ResetIdempotencyKeyRequest,
    ResetIdempotencyKeyResponse,
    TokenInfo,
    TokenPage,
    WaitToken,
)
from ember.daemon.api.routing import BODY_OVERHEAD, int_param
from ember.daemon.api.routing import read_body as _body
from ember.daemon.api.routing import read_json as _decode

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


async def create_token(daemon: ApiDaemon, request: Request, env: str) -> WaitToken:
    req: CreateTokenRequest = _decode(await _body(request, 64 * 1024), CreateTokenRequest)
    timeout_s = _duration_field("timeout", req.timeout)
    key_ttl_s = _duration_field("idempotency_key_ttl", req.idempotency_key_ttl)
    if len(req.tags) > 10:
        raise BadRequest(400, "tags: at most 10 tags per token")
    token = await daemon.engine.waits.tokens.create(
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
    limit = daemon.config.max_output_bytes + BODY_OVERHEAD
    req: CompleteTokenRequest = _decode(await _body(request, limit), CompleteTokenRequest)
    token_id = request.path_params["token_id"]
    await daemon.engine.waits.tokens.complete(env, token_id, bytes(req.data))
    return await daemon.engine.waits.tokens.retrieve(env, token_id)


async def reset_idempotency_key(
    daemon: ApiDaemon, request: Request, env: str
) -> ResetIdempotencyKeyResponse:
    req: ResetIdempotencyKeyRequest = _decode(
        await _body(request, 16 * 1024), ResetIdempotencyKeyRequest
    )
    run_ids = await daemon.engine.reset_idempotency_key(env, req.task_id, req.key)
    return ResetIdempotencyKeyResponse(task_id=req.task_id, key=req.key, run_ids=run_ids)


async def retrieve_token(daemon: ApiDaemon, request: Request, env: str) -> TokenInfo:
    token = await daemon.engine.waits.tokens.retrieve(env, request.path_params["token_id"])
    return msgspec.structs.replace(token, url=daemon.engine.callbacks.url(token.id))


async def list_tokens(daemon: ApiDaemon, request: Request, env: str) -> TokenPage:
    status = request.query_params.get("status") or None
    if status not in (None, "WAITING", "COMPLETED", "TIMED_OUT"):
        raise BadRequest(400, f"status={status!r}: use WAITING, COMPLETED or TIMED_OUT")
    limit = int_param(request, "limit", 50, 1, 1000)
    cursor = request.query_params.get("cursor") or None
    page, next_cursor = await daemon.engine.waits.tokens.page(env, status, limit, cursor)
    return TokenPage(data=page, next_cursor=next_cursor)
