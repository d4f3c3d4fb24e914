"""The ASGI app of the API: a request authorized, routed to its handler, answered.

:func:`build_app` serves :data:`ember.daemon.api.routes.ROUTES` and ``/openapi.json`` with
:class:`Router`; each handler's errors become a 4xx that names the problem, a 507 for a full
disk, or a 500 whose body holds no internals (the log has them, under a reference).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from ember._errors import ApiError, EmberError, Unauthorized
from ember._types import ErrorBody
from ember.daemon.api.routes import ROUTES
from ember.daemon.api.routing import RouteSpec, over_tcp
from ember.daemon.api.sync import FORWARDED
from ember.daemon.engine.environments import check_env_name
from ember.daemon.store import keys as keys_store

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon
    from ember.daemon.store.db import Database

_json = msgspec.json.Encoder()
log = logging.getLogger("ember.daemon")


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(_json.encode(value), status, media_type="application/json")


def _error_response(status: int, message: str) -> Response:
    return _json_response(ErrorBody(error=message), status)


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
    env = await daemon.db.read(lambda conn: keys_store.key_env(conn, key_hash))
    if env is None:
        raise Unauthorized(401, "the API key is unknown or revoked")
    if named is not None and named != env:
        raise Unauthorized(403, f"this API key belongs to environment {env}, not {named}")
    return env


async def ensure_api_key(db: Database, clock: Callable[[], float], state_dir: Path) -> None:
    """Over TCP a key is required: make one for ``dev`` if none exists yet (in ``dev.key``)."""
    if await db.read(keys_store.has_keys):
        return
    key = "em_" + secrets.token_urlsafe(32)
    now = clock()
    await db.write(lambda conn: keys_store.insert_key(conn, hash_key(key), "dev", "first", now))
    key_file = state_dir / "dev.key"
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    log.warning("created an API key for environment dev in %s", key_file)
