"""``ember keys`` (API keys, on the daemon's machine) and ``ember env`` (variables)."""

from __future__ import annotations

from typing import Annotated

import msgspec
import typer

from ember._admin_types import ApiKeyList, CreatedKey, CreateKeyRequest
from ember._client import Call
from ember._envvars import EnvVars
from ember.cli._common import (
    EnvOption,
    JsonFlag,
    ProfileOption,
    fail,
    make_client,
    print_json,
    run_async,
)

keys_app = typer.Typer(help="API keys: each opens one environment over TCP.", no_args_is_help=True)
env_app = typer.Typer(
    help="Variables injected into an environment's run processes.", no_args_is_help=True
)
_encoder = msgspec.json.Encoder()


@keys_app.command("create")
def keys_create(
    env: Annotated[str, typer.Option("--env", "-e", help="The key's environment.")],
    name: Annotated[str, typer.Option(help="What the key is for, e.g. ci.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Make an API key; it is shown once, so store it now."""
    body = _encoder.encode(CreateKeyRequest(env=env, name=name))
    created: CreatedKey = run_async(
        make_client(None).request(Call("POST", "/api/v1/keys", CreatedKey, body=body))
    )
    if as_json:
        print_json(created)
        return
    typer.echo(created.key)
    typer.secho(
        f"○ key {created.info.id} for {env}: shown only now. Use it as EMBER_API_KEY, or with "
        "`ember profiles add NAME --url URL --api-key KEY`",
        err=True,
    )


@keys_app.command("list")
def keys_list(env: EnvOption = None, as_json: JsonFlag = False) -> None:
    """List API keys (their ids, never the keys)."""
    call = Call("GET", "/api/v1/keys", ApiKeyList, params={"env": env})
    listed: ApiKeyList = run_async(make_client(None).request(call))
    if as_json:
        print_json(listed)
        return
    if not listed.data:
        typer.echo("no API keys: `ember keys create --env prod` makes one")
    for key in listed.data:
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "live"
        created = f"{key.created_at.astimezone():%Y-%m-%d %H:%M}"
        typer.echo(f"{key.id}  {key.env:16} {state:18} {created}  {key.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The id `keys list` shows.")]) -> None:
    """Revoke an API key at once."""
    call = Call("POST", f"/api/v1/keys/{key_id}/revoke", ApiKeyList, body=b"")
    run_async(make_client(None).request(call))
    typer.echo(f"○ revoked key {key_id}")


@env_app.command("set")
def env_set(
    assignments: Annotated[list[str], typer.Argument(help="NAME=VALUE pairs.")],
    env: EnvOption = None,
    profile: ProfileOption = None,
) -> None:
    """Set variables; the environment's run processes are replaced as they free up."""
    variables = {}
    for pair in assignments:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"{pair!r} is not NAME=VALUE")
        variables[name] = value
    client = make_client(env, profile)
    run_async(EnvVars(client).upload(variables))
    typer.echo(f"○ set {', '.join(variables)} in {client.settings.env}")


@env_app.command("list")
def env_list(
    show_values: Annotated[
        bool, typer.Option("--show-values", help="Print the values too (they are secrets).")
    ] = False,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List variables by name (values hidden unless --show-values)."""
    client = make_client(env, profile)
    listed = run_async(EnvVars(client).list(show_values=show_values))
    if as_json:
        print_json(listed)
        return
    if not listed.data:
        typer.echo(f"no variables in {client.settings.env}: `ember env set NAME=VALUE` sets one")
    for var in listed.data:
        source = " (.env)" if var.source == "dotenv" else ""
        value = f"={var.value}" if show_values else ""
        typer.echo(f"{var.name}{value}{source}")


@env_app.command("unset")
def env_unset(
    names: Annotated[list[str], typer.Argument(help="Variable names.")],
    env: EnvOption = None,
    profile: ProfileOption = None,
) -> None:
    """Remove variables."""
    client = make_client(env, profile)
    for name in names:
        run_async(EnvVars(client).delete(name))
    typer.echo(f"○ removed {', '.join(names)} from {client.settings.env}")
