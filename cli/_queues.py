"""``ember queues``: list queues, pause and resume them, override their concurrency limit."""

from __future__ import annotations

from typing import Annotated

import typer

from ember._queues import Queues
from ember._types import QueueInfo
from ember.cli._common import EnvOption, JsonFlag, ProfileOption, make_client, print_json, run_async

queues_app = typer.Typer(help="Queues of an environment.", no_args_is_help=True)


def _api(env: str | None, profile: str | None) -> Queues:
    return Queues(make_client(env, profile))


def _limit(queue: QueueInfo) -> str:
    return "∞" if queue.concurrency_limit is None else str(queue.concurrency_limit)


def _rate(queue: QueueInfo) -> str:
    if queue.rate_limit is None:
        return "-"
    per = "/key" if queue.rate_limit.per_key else ""
    return f"{queue.rate_limit.limit}/{queue.rate_limit.period}s{per}"


def _print(queue: QueueInfo, as_json: bool) -> None:
    if as_json:
        print_json(queue)
        return
    state = "paused" if queue.paused else "running"
    typer.echo(
        f"{queue.name}  {state}  limit {_limit(queue)}  rate {_rate(queue)}  "
        f"{queue.running} running, {queue.queued} queued"
    )


@queues_app.command("list")
def queues_list(
    env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """List queues with their limits and load."""
    listed = run_async(_api(env, profile).list())
    if as_json:
        print_json(listed)
        return
    if not listed:
        typer.echo("no queues yet: a task's queue appears when its version is registered")
        return
    typer.echo(f"{'QUEUE':32} {'STATE':8} {'LIMIT':>6} {'RATE':>14} {'RUNNING':>8} {'QUEUED':>8}")
    for q in listed:
        state = "paused" if q.paused else "running"
        typer.echo(
            f"{q.name[:32]:32} {state:8} {_limit(q):>6} {_rate(q):>14} {q.running:>8} {q.queued:>8}"
        )


@queues_app.command("pause")
def queues_pause(
    name: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Stop starting runs of a queue (executing runs carry on)."""
    _print(run_async(_api(env, profile).pause(name)), as_json)


@queues_app.command("resume")
def queues_resume(
    name: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Start runs of a paused queue again."""
    _print(run_async(_api(env, profile).resume(name)), as_json)


@queues_app.command("limit")
def queues_limit(
    name: str,
    limit: Annotated[
        str, typer.Argument(help="Runs at once: a number, 'none' for unlimited, or 'reset'.")
    ],
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Override a queue's concurrency limit, or `reset` it to the code's."""
    api = _api(env, profile)
    if limit == "reset":
        _print(run_async(api.reset_concurrency_limit(name)), as_json)
        return
    if limit == "none":
        _print(run_async(api.override_concurrency_limit(name, None)), as_json)
        return
    try:
        value = int(limit)
    except ValueError:
        raise typer.BadParameter(
            f"{limit!r} is not a limit: give a whole number, 'none' or 'reset'", param_hint="LIMIT"
        ) from None
    _print(run_async(api.override_concurrency_limit(name, value)), as_json)
