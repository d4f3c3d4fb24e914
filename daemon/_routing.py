"""What every API module shares: the route declaration, body reading, and run scoping.

Routes are declared as :class:`RouteSpec` rows (in :mod:`ember.daemon._api` and the modules
of versions, environments and schedules); the app and the OpenAPI document are built from
them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request

from ember._errors import BadRequest, NotFound, PayloadTooLarge, Unauthorized
from ember.daemon import _store as store

if TYPE_CHECKING:
    from ember.daemon._server import Daemon


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One API route: what it accepts and returns, for the app and for OpenAPI."""

    method: str
    path: str
    handler: Callable[[Daemon, Request, str], Awaitable[Any]]
    summary: str
    request: type[Any] | None = None
    response: type[Any] | None = None
    query: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"
    # Served without an API key over TCP: the route checks a secret of its own.
    public: bool = False


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body.

    Raises:
        PayloadTooLarge: it is over ``limit`` bytes.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(413, f"request body of {declared} bytes is over the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(
            413, f"request body of {len(body)} bytes is over the limit of {limit}"
        )
    return body


def read_json(data: bytes, type_: type[Any]) -> Any:
    """Decode a JSON body into ``type_``.

    Raises:
        BadRequest: it is not JSON or does not match (the message names the field).
    """
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise BadRequest(400, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None


def over_tcp(request: Request) -> bool:
    """True for a request that came over TCP (where an API key decided its environment)."""
    server = request.scope.get("server")
    return not (server is None or server[1] is None)


def socket_only(request: Request, what: str) -> None:
    """Refuse an action that only the owner of the daemon's Unix socket may take.

    Raises:
        Unauthorized: the request came over TCP.
    """
    if over_tcp(request):
        raise Unauthorized(
            403, f"{what} is only possible on the daemon's machine, over its Unix socket"
        )


async def check_run_env(daemon: Daemon, request: Request, env: str, run_id: str) -> None:
    """Over TCP, refuse a run of another environment as if it did not exist.

    Over the Unix socket run ids reach runs of every environment: ids are unique, and the
    socket's owner may name any environment anyway.

    Raises:
        NotFound: the run does not exist in the key's environment.
    """
    if not over_tcp(request):
        return
    summary = await daemon.db.read(lambda conn: store.get_summary(conn, run_id))
    if summary is None or summary.env != env:
        raise NotFound(404, f"run {run_id} does not exist")
