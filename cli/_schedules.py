"""``ember schedules``: list, create, change and remove cron schedules."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ember._schedule_types import Schedule
from ember._schedules import Schedules
from ember.cli._common import EnvOption, JsonFlag, ProfileOption, make_client, print_json, run_async

schedules_app = typer.Typer(help="Cron schedules of an environment.", no_args_is_help=True)


def _api(env: str | None, profile: str | None) -> Schedules:
    return Schedules(make_client(env, profile))


def _when(schedule: Schedule) -> str:
    if schedule.next_run is None:
        return "-"
    return f"{schedule.next_run.astimezone():%Y-%m-%d %H:%M}"


def _print(schedule: Schedule, as_json: bool) -> None:
    if as_json:
        print_json(schedule)
        return
    state = "active" if schedule.active else "inactive"
    typer.echo(
        f"{schedule.id}  {schedule.task}  {schedule.cron!r} {schedule.timezone}  {state}  "
        f"next {_when(schedule)}"
    )


@schedules_app.command("list")
def schedules_list(
    task: Annotated[str | None, typer.Option(help="Only this task's.")] = None,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List schedules with their next run."""
    listed = run_async(_api(env, profile).list(task=task))
    if as_json:
        print_json(listed)
        return
    if not listed.data:
        typer.echo("no schedules: declare one with @schedules.task(cron=...) or create one")
        return
    typer.echo(f"{'ID':32} {'TASK':20} {'TYPE':12} {'CRON':16} {'TIMEZONE':20} {'NEXT RUN':16}")
    for s in listed.data:
        cron = s.cron if s.active else f"{s.cron} (off)"
        typer.echo(
            f"{s.id:32} {s.task[:20]:20} {s.type:12} {cron:16} {s.timezone:20} {_when(s):16}"
        )


@schedules_app.command("show")
def schedules_show(
    schedule_id: str,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a schedule."""
    _print(run_async(_api(env, profile).retrieve(schedule_id)), as_json)


@schedules_app.command("create")
def schedules_create(
    task: Annotated[str, typer.Option(help="A scheduled task's id.")],
    cron: Annotated[str, typer.Option(help="5-field cron expression, e.g. '0 9 * * *'.")],
    timezone: Annotated[str, typer.Option(help="IANA timezone.")] = "UTC",
    external_id: Annotated[str | None, typer.Option(help="Your id for it.")] = None,
    deduplication_key: Annotated[
        str | None, typer.Option(help="Update the schedule holding this key instead.")
    ] = None,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Attach a cron schedule to a scheduled task."""
    made = run_async(
        _api(env, profile).create(
            task,
            cron,
            timezone=timezone,
            external_id=external_id,
            deduplication_key=deduplication_key,
        )
    )
    _print(made, as_json)


@schedules_app.command("update")
def schedules_update(
    schedule_id: str,
    task: Annotated[str | None, typer.Option(help="Another scheduled task.")] = None,
    cron: Annotated[str | None, typer.Option(help="A new cron expression.")] = None,
    timezone: Annotated[str | None, typer.Option(help="A new timezone.")] = None,
    external_id: Annotated[str | None, typer.Option(help="A new external id.")] = None,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Change an imperative schedule."""
    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "task": task,
            "cron": cron,
            "timezone": timezone,
            "external_id": external_id,
        }.items()
        if v is not None
    }
    _print(run_async(_api(env, profile).update(schedule_id, **changes)), as_json)


@schedules_app.command("activate")
def schedules_activate(
    schedule_id: str,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Fire a schedule again (ticks missed while inactive are not run)."""
    _print(run_async(_api(env, profile).activate(schedule_id)), as_json)


@schedules_app.command("deactivate")
def schedules_deactivate(
    schedule_id: str,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Stop firing a schedule."""
    _print(run_async(_api(env, profile).deactivate(schedule_id)), as_json)


@schedules_app.command("delete")
def schedules_delete(
    schedule_id: str,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Delete an imperative schedule."""
    _print(run_async(_api(env, profile).delete(schedule_id)), as_json)
