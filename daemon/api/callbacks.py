"""The route of wait tokens' callback URLs: a POST completes the token, with no API key.

The URL's secret is made and checked by ``engine/callbacks.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request

from ember._errors import BadRequest, NotFound
from ember._types import TokenInfo
from ember.daemon.api.routing import RouteSpec, read_body

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

_PATH = "/api/v1/waitpoints/tokens/{token_id}/callback/{secret}"


async def token_callback(daemon: ApiDaemon, request: Request, env: str) -> TokenInfo:
    """Complete a token through its URL: the body (JSON, or empty for null) is the output."""
    token_id = request.path_params["token_id"]
    waits = daemon.engine.waits
    if not daemon.engine.callbacks.check(token_id, request.path_params["secret"]):
        # The same answer as for a token that does not exist: the URL names no token.
        raise NotFound(404, f"no token answers at this URL ({token_id})")
    body = await read_body(request, daemon.config.max_output_bytes + 4096)
    data = body.strip() or b"null"
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"the body is not JSON ({exc}): post JSON, or nothing") from None
    owner = (await waits.tokens.env_of(token_id)) or env
    await waits.tokens.complete(owner, token_id, data)
    return await waits.tokens.retrieve(owner, token_id)


CALLBACK_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        _PATH,
        token_callback,
        "Complete a wait token through its callback URL (no API key: the URL is the secret)",
        response=TokenInfo,
        public=True,
    ),
)
