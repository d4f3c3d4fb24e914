"""What the CLI's commands share: options, the client they talk through, output helpers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from ember._client import Client
from ember._errors import ConfigError, EmberError
from ember.cli._project import find_project
from ember.cli._settings import client_settings, daemon_config
from ember.daemon.config import DaemonConfig

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
EnvOption = Annotated[str | None, typer.Option("--env", "-e", help="Environment (default dev).")]
ProfileOption = Annotated[
    str | None, typer.Option("--profile", help="A remote daemon saved with `ember profiles add`.")
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def make_client(env: str | None, profile: str | None = None) -> Client:
    """A client for the project's daemon (or a profile's remote one) in ``env``."""
    try:
        if profile is not None:
            from ember.sync import profile_settings

            settings = profile_settings(profile)
            if env is not None and env != settings.env:
                fail(f"profile {profile} holds a key of environment {settings.env}, not {env}")
            return Client(settings)
        return Client(client_settings(project_config(), env))
    except EmberError as exc:
        fail(str(exc))


def project_config() -> DaemonConfig:
    """The daemon settings of the project around the current folder (defaults outside one).

    A bad ``[tool.ember]`` ends the command with its message, not a traceback.
    """
    try:
        project = find_project(Path.cwd())
    except ConfigError:
        project = None
    try:
        return daemon_config(project)
    except EmberError as exc:
        fail(str(exc))


def run_async(coro: Any) -> Any:
    """Run a coroutine, turning Ember's errors into a message and exit status 1."""
    try:
        return asyncio.run(coro)
    except EmberError as exc:
        fail(str(exc))


def print_json(value: Any) -> None:
    """Print a value as indented JSON."""
    typer.echo(msgspec.json.format(msgspec.json.encode(value), indent=2))
