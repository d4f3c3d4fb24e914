"""The project-level API: version builds, environments, their variables and API keys.

API keys are managed over the Unix socket only: whoever holds a key may use its environment,
not mint or revoke keys. Variables are managed with a key of their environment too.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from starlette.requests import Request

from ember._admin_types import (
    ApiKeyList,
    BuildProgress,
    CreatedKey,
    CreateKeyRequest,
    EnvironmentInfo,
    EnvironmentList,
    EnvVar,
    EnvVarList,
    ImportEnvVarsRequest,
    SetEnvVarRequest,
)
from ember._errors import NotFound
from ember._types import VersionInfo
from ember.daemon.api.routing import (
    RouteSpec,
    int_param,
    over_tcp,
    read_body,
    read_json,
    socket_only,
)
from ember.daemon.api.schedules import SCHEDULE_ROUTES
from ember.daemon.engine.environments import check_env_name
from ember.daemon.store import admin

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

_SMALL_BODY = 1024 * 1024


# -- versions and environments -----------------------------------------------------------


async def get_version(daemon: ApiDaemon, request: Request, env: str) -> VersionInfo:
    return daemon.builder.get(env, request.path_params["version"])


async def version_build(daemon: ApiDaemon, request: Request, env: str) -> BuildProgress:
    start = int_param(request, "from", 0, 0, 10**9)
    return daemon.builder.progress(env, request.path_params["version"], start)


async def list_environments(daemon: ApiDaemon, request: Request, env: str) -> EnvironmentList:
    engine = daemon.engine
    names = {e for e, _ in engine.versions} | set(engine.current) | {env}
    if over_tcp(request):
        names = {env}
    return EnvironmentList(
        data=[
            EnvironmentInfo(
                name=name,
                current_version=engine.current.get(name),
                versions=sum(1 for e, _ in engine.versions if e == name),
            )
            for name in sorted(names)
        ]
    )


# -- variables ---------------------------------------------------------------------------


async def list_env_vars(daemon: ApiDaemon, request: Request, env: str) -> EnvVarList:
    show = request.query_params.get("show_values", "false") == "true"
    return EnvVarList(data=daemon.env_vars.listing(env, show))


async def set_env_var(daemon: ApiDaemon, request: Request, env: str) -> EnvVar:
    req: SetEnvVarRequest = read_json(await read_body(request, _SMALL_BODY), SetEnvVarRequest)
    name = request.path_params["name"]
    await daemon.env_vars.set_many(env, {name: req.value}, "user")
    return EnvVar(name=name, source="user", updated_at=_now(daemon))


async def import_env_vars(daemon: ApiDaemon, request: Request, env: str) -> EnvVarList:
    body = await read_body(request, _SMALL_BODY)
    req: ImportEnvVarsRequest = read_json(body, ImportEnvVarsRequest)
    await daemon.env_vars.set_many(env, req.variables, req.source)
    return EnvVarList(data=daemon.env_vars.listing(env, False))


async def unset_env_var(daemon: ApiDaemon, request: Request, env: str) -> EnvVar:
    name = request.path_params["name"]
    await daemon.env_vars.unset(env, name)
    return EnvVar(name=name, source="user", updated_at=_now(daemon))


def _now(daemon: ApiDaemon) -> datetime:
    from ember.daemon.store.runs import ts

    return ts(daemon.clock())


# -- API keys ----------------------------------------------------------------------------


async def create_key(daemon: ApiDaemon, request: Request, env: str) -> CreatedKey:
    socket_only(request, "creating API keys")
    req: CreateKeyRequest = read_json(await read_body(request, 64 * 1024), CreateKeyRequest)
    return await daemon.create_key(req.env, req.name)


async def list_keys(daemon: ApiDaemon, request: Request, env: str) -> ApiKeyList:
    socket_only(request, "listing API keys")
    wanted = request.query_params.get("env") or None
    if wanted is not None:
        check_env_name(wanted)
    return ApiKeyList(data=await daemon.db.read(lambda conn: admin.list_keys(conn, wanted)))


async def revoke_key(daemon: ApiDaemon, request: Request, env: str) -> ApiKeyList:
    socket_only(request, "revoking API keys")
    key_id = request.path_params["key_id"]
    now = daemon.clock()
    if not await daemon.db.write(lambda conn: admin.revoke_key(conn, key_id, now)):
        raise NotFound(404, f"no live API key has the id {key_id}; `ember keys list` shows them")
    keys = await daemon.db.read(lambda conn: admin.list_keys(conn, None))
    return ApiKeyList(data=[k for k in keys if k.id == key_id])


ADMIN_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "GET", "/api/v1/versions/{version}", get_version, "Retrieve a version", response=VersionInfo
    ),
    RouteSpec(
        "GET",
        "/api/v1/versions/{version}/build",
        version_build,
        "A version's build status and log",
        response=BuildProgress,
        query=(
            (
                "from",
                "first log line to return (default 0)",
                {"type": "integer", "minimum": 0, "maximum": 10**9},
            ),
        ),
    ),
    RouteSpec(
        "GET",
        "/api/v1/environments",
        list_environments,
        "Environments and their current versions",
        response=EnvironmentList,
    ),
    RouteSpec(
        "GET",
        "/api/v1/envvars",
        list_env_vars,
        "Variables of the environment",
        response=EnvVarList,
        query=(("show_values", "true to include the values (they are secrets)"),),
    ),
    RouteSpec(
        "POST",
        "/api/v1/envvars/import",
        import_env_vars,
        "Set many variables (source dotenv: replace the .env layer)",
        request=ImportEnvVarsRequest,
        response=EnvVarList,
    ),
    RouteSpec(
        "PUT",
        "/api/v1/envvars/{name}",
        set_env_var,
        "Set a variable",
        request=SetEnvVarRequest,
        response=EnvVar,
    ),
    RouteSpec(
        "DELETE", "/api/v1/envvars/{name}", unset_env_var, "Remove a variable", response=EnvVar
    ),
    RouteSpec(
        "POST",
        "/api/v1/keys",
        create_key,
        "Create an API key (Unix socket only)",
        request=CreateKeyRequest,
        response=CreatedKey,
    ),
    RouteSpec(
        "GET",
        "/api/v1/keys",
        list_keys,
        "API keys, without the keys (Unix socket only)",
        response=ApiKeyList,
        query=(("env", "only the keys of this environment"),),
    ),
    RouteSpec(
        "POST",
        "/api/v1/keys/{key_id}/revoke",
        revoke_key,
        "Revoke an API key (Unix socket only)",
        response=ApiKeyList,
    ),
    *SCHEDULE_ROUTES,
)
