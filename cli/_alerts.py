"""``ember alerts``: webhook channels for failed runs, deployments and batches."""

from __future__ import annotations

from typing import Annotated, cast, get_args

import typer

from ember._alert_types import ALERT_EVENTS, AlertEvent
from ember._alerts import Alerts
from ember.cli._common import EnvOption, JsonFlag, ProfileOption, make_client, print_json, run_async

alerts_app = typer.Typer(help="Alert webhooks of an environment.", no_args_is_help=True)


def _api(env: str | None, profile: str | None) -> Alerts:
    return Alerts(make_client(env, profile))


def _events(text: str) -> list[AlertEvent]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = get_args(AlertEvent)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise typer.BadParameter(
            f"{', '.join(unknown) or 'nothing'} is not an event; give a comma-separated "
            f"list of {', '.join(ALERT_EVENTS)}",
            param_hint="--events",
        )
    return cast(list[AlertEvent], names)


@alerts_app.command("add")
def alerts_add(
    webhook: Annotated[str, typer.Option(help="The URL each alert is POSTed to.")],
    events: Annotated[
        str, typer.Option(help="Comma-separated: " + ",".join(ALERT_EVENTS) + ".")
    ] = "run.failed",
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Send alerts to a webhook, signed with a secret printed once here."""
    channel = run_async(_api(env, profile).create(webhook=webhook, events=_events(events)))
    if as_json:
        print_json(channel)
        return
    typer.echo(f"{channel.id}  {channel.webhook}  {','.join(channel.events)}")
    typer.echo(f"signing secret: {channel.secret}")
    typer.echo("check the x-ember-signature header with ember.verify_signature(secret, ...)")


@alerts_app.command("list")
def alerts_list(
    env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """List alert channels."""
    found = run_async(_api(env, profile).list())
    if as_json:
        print_json(found)
        return
    if not found:
        typer.echo("no alert channels: `ember alerts add --webhook URL --events run.failed`")
    for channel in found:
        typer.echo(f"{channel.id}  {channel.webhook}  {','.join(channel.events)}")


@alerts_app.command("remove")
def alerts_remove(channel_id: str, env: EnvOption = None, profile: ProfileOption = None) -> None:
    """Remove an alert channel."""
    channel = run_async(_api(env, profile).delete(channel_id))
    typer.echo(f"removed {channel.id} ({channel.webhook})")


@alerts_app.command("deliveries")
def alerts_deliveries(
    env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Recent deliveries: event, status, attempts and the last error."""
    found = run_async(_api(env, profile).deliveries())
    if as_json:
        print_json(found)
        return
    for d in found:
        error = f"  {d.last_error}" if d.last_error else ""
        typer.echo(f"{d.id}  {d.event:22} {d.subject}  {d.status}  {d.attempts} tries{error}")
