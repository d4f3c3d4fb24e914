"""``ember login``, ``ember whoami`` and ``ember logout``: profiles of remote daemons.

``login`` checks the key against the remote before storing anything (the key decides the
environment, which the remote names), so a saved profile is one that worked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from ember._admin_types import WhoAmI
from ember._client import Call, Client
from ember._errors import EmberError
from ember.cli._common import JsonFlag, fail, print_json


def _ask(client: Client) -> WhoAmI:
    async def go() -> WhoAmI:
        try:
            return await client.request(Call("GET", "/api/v1/whoami", WhoAmI, timeout_s=15))
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except EmberError as exc:
        fail(str(exc))


def login(
    profile: Annotated[str, typer.Option("--profile", help="A name for this daemon.")] = "default",
    api_url: Annotated[
        str,
        typer.Option("--api-url", "-a", help="The daemon's URL, e.g. https://ember.example.com."),
    ] = "",
    api_key: Annotated[
        str | None, typer.Option(help="An API key of the environment (asked when omitted).")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="Certificates to trust instead of the system store.")
    ] = None,
    make_default: Annotated[
        bool, typer.Option("--default/--no-default", help="Use it when --profile is left out.")
    ] = True,
) -> None:
    """Check an API key against a remote daemon and save it as a profile (mode 0600)."""
    from ember.sync import (
        Profile,
        plain_http_warning,
        profiles_path,
        save_profile,
        set_default_profile,
        settings_of,
    )

    if not api_url:
        fail("give the daemon's URL: `ember login --profile NAME -a https://HOST:PORT`")
    if ca_file is not None and not ca_file.is_file():
        fail(f"--ca-file {ca_file} does not exist")
    if warning := plain_http_warning(api_url):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    key = api_key or typer.prompt("API key", hide_input=True)
    trial = Profile(
        name=profile,
        url=api_url.rstrip("/"),
        api_key=key,
        ca_file=str(ca_file.resolve()) if ca_file else None,
    )
    try:
        settings = settings_of(trial)
    except EmberError as exc:
        fail(str(exc))
    who = _ask(Client(settings))
    saved = Profile(name=trial.name, url=trial.url, api_key=key, env=who.env, ca_file=trial.ca_file)
    try:
        save_profile(saved)
        if make_default:
            set_default_profile(profile)
    except EmberError as exc:
        fail(str(exc))
    default = " (the default)" if make_default else ""
    typer.echo(f"○ logged in to {saved.url} as environment {who.env}: profile {profile}{default}")
    typer.echo(f"  saved in {profiles_path()}; forward runs with `ember daemon --sync {profile}`")


def _chosen(profile: str | None) -> str:
    from ember.sync import default_profile

    try:
        name = profile or default_profile()
    except EmberError as exc:
        fail(str(exc))
    if name is None:
        fail("no profile named and no default one: `ember login --profile NAME -a URL` adds one")
    return name


def whoami(
    profile: Annotated[
        str | None, typer.Option("--profile", help="The profile (default: the default one).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show which daemon and environment a profile reaches, checking its key."""
    from ember.sync import profile_settings

    name = _chosen(profile)
    try:
        settings = profile_settings(name)
    except EmberError as exc:
        fail(str(exc))
    who = _ask(Client(settings))
    if as_json:
        print_json({"profile": name, "url": settings.url, "env": who.env})
        return
    tls = "TLS" if (settings.url or "").startswith("https://") else "plain HTTP"
    typer.echo(f"profile {name}: {settings.url} ({tls}), environment {who.env}")
    typer.echo(f"  remote daemon Ember {who.daemon_version}")


def logout(
    profile: Annotated[
        str | None, typer.Option("--profile", help="The profile (default: the default one).")
    ] = None,
) -> None:
    """Forget a profile and its key."""
    from ember.sync import delete_profile

    name = _chosen(profile)
    try:
        delete_profile(name)
    except EmberError as exc:
        fail(str(exc))
    typer.echo(f"○ logged out of profile {name}")
