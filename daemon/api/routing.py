"""What every API module shares: the route declaration, body reading, and run scoping.

Routes are declared as :class:`RouteSpec` rows (in :mod:`ember.daemon.api.routes` and the modules
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
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One API route: what it accepts and returns, for the app and for OpenAPI."""

    method: str
    path: str
    handler: Callable[[ApiDaemon, Request, str], Awaitable[Any]]
    summary: str
    request: type[Any] | None = None
    response: type[Any] | None = None
    # (name, description) or (name, description, JSON schema); the schema defaults to a string.
    query: tuple[tuple[str, str] | tuple[str, str, dict[str, Any]], ...] = ()
    content_type: str = "application/json"
    # Served without an API key over TCP: the route checks a secret of its own.
    public: bool = False


async def read_body(request: Request, limit: int, setting: str = "") -> bytes:
    """The request's body, read as it streams in and refused as soon as it is over ``limit``.

    A chunked body declares no length: it is counted while it arrives, so a client cannot
    make the daemon hold more than ``limit`` bytes of it.

    Args:
        request: the request.
        limit: the most bytes accepted.
        setting: the ``[tool.ember]`` key that sets ``limit``, named in the refusal.

    Raises:
        PayloadTooLarge: it is over ``limit`` bytes.
    """
    named = f" ({setting})" if setting else ""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            413, f"request body of {declared} bytes is over the limit of {limit}{named}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(413, f"request body is over the limit of {limit} bytes{named}")
    return bytes(body)


PAGE_LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}
# JSON framing around a payload or output in a body: options, keys, escaping.
BODY_OVERHEAD = 300 * 1024


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within ``[low, high]``.

    Raises:
        BadRequest: it is not a plain decimal number, or out of range.
    """
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # isascii: str.isdigit() accepts digits such as "²" that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(400, f"query parameter {name}={raw!r}: a whole number {low}-{high}")
    return int(raw)


def read_json(data: bytes, type_: type[Any]) -> Any:
    """Decode a JSON body into ``type_``.

    Raises:
        BadRequest: it is not JSON, not UTF-8 (payloads are kept raw, so msgspec alone
            would let invalid bytes into the store), nested deeper than the decoder goes,
            or does not match (the message names the field).
    """
    try:
        value = msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise BadRequest(400, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(
            400, "request body is JSON nested too deep (about 1,000 levels at most)"
        ) from None
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(
                400,
                f"request body is not valid UTF-8 at byte {exc.start}: JSON, the payload "
                "included, must be UTF-8 text",
            ) from None
    return value


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


async def check_run_env(daemon: ApiDaemon, request: Request, env: str, run_id: str) -> None:
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


def image_options(request: Request) -> tuple[bool, str | None]:
    """A deploy's ``?image=true`` (build its Docker image) and ``?push=REGISTRY``."""
    push = request.query_params.get("push") or None
    return request.query_params.get("image", "false") == "true" or push is not None, push
