"""The ``ember`` command (also installed as ``trigger``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from ember._client import Call, Client
from ember._errors import ConfigError, EmberError
from ember._runs import Runs, Tasks
from ember._types import Run, RunSummary
from ember.cli import _output as out
from ember.cli._alerts import alerts_app
from ember.cli._common import EnvOption, JsonFlag, ProfileOption, fail, project_config
from ember.cli._common import make_client as _client
from ember.cli._common import print_json as _print_json
from ember.cli._common import run_async as _run_async
from ember.cli._deploy import deploy, promote, versions
from ember.cli._environments import env_app, keys_app
from ember.cli._login import login, logout, whoami
from ember.cli._project import find_project, init_project
from ember.cli._queues import queues_app
from ember.cli._schedules import schedules_app
from ember.cli._service import backup_command, service_app
from ember.cli._settings import client_settings, daemon_config

app = typer.Typer(
    name="ember",
    help="Durable background tasks for Python on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Inspect and steer runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

profiles_app = typer.Typer(help="Remote daemons: URL and API key by name.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
tokens_app = typer.Typer(help="Wait tokens: list and complete them.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
) -> None:
    """Add \\[tool.ember] to pyproject.toml and a starter task."""
    try:
        done = init_project(path)
    except EmberError as exc:
        fail(str(exc))
    for line in done or ["already set up: nothing to do"]:
        typer.echo(f"○ {line}")
    typer.echo('Next: `ember dev`, then `ember trigger hello-world --payload \'{"name": "Ada"}\'`')


@app.command()
def dev(
    project_dir: Annotated[Path, typer.Option("--project", "-p", help="Project folder.")] = Path(
        "."
    ),
    max_concurrent_runs: Annotated[
        int | None, typer.Option("--max-concurrent-runs", help="Runs executing at once.")
    ] = None,
    watch: Annotated[bool, typer.Option(help="Register a new version on code changes.")] = True,
) -> None:
    """Run your tasks locally: embedded daemon, hot reload, one line per run."""
    from ember.cli._dev import run_dev

    try:
        project = find_project(project_dir)
        config = daemon_config(project, max_concurrent_runs=max_concurrent_runs)
    except EmberError as exc:
        fail(str(exc))
    sys.exit(run_dev(project, config, watch=watch))


@app.command()
def daemon(
    state_dir: Annotated[Path | None, typer.Option(help="State directory.")] = None,
    socket: Annotated[Path | None, typer.Option(help="API Unix socket path.")] = None,
    tcp: Annotated[
        str | None, typer.Option(help="Also serve the API on HOST:PORT, with API keys.")
    ] = None,
    durability: Annotated[
        str | None, typer.Option(help="normal (WAL) or fsync (survives power loss).")
    ] = None,
    max_concurrent_runs: Annotated[int | None, typer.Option(help="Runs executing at once.")] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="How long waits are held: auto, criu, park or replay.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: the TCP listener speaks HTTPS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's PEM key.")] = None,
    sync: Annotated[
        list[str] | None,
        typer.Option(
            "--sync",
            help="Forward an environment to a profile: ENV=PROFILE, or PROFILE (repeatable).",
        ),
    ] = None,
    shutdown_grace_s: Annotated[
        float | None, typer.Option(help="On SIGTERM, seconds executing runs get to finish.")
    ] = None,
    socket_group: Annotated[
        str | None, typer.Option(help="Group allowed to use the API socket (mode 0660).")
    ] = None,
    retention: Annotated[
        str | None, typer.Option(help='Prune finished runs older than this, e.g. "30d".')
    ] = None,
    min_free_bytes: Annotated[
        int | None, typer.Option(help="Refuse new runs (507) below this much free disk.")
    ] = None,
    log_format: Annotated[
        str, typer.Option(help="auto (journal under journald, else text), text, journal, json.")
    ] = "auto",
    tracing: Annotated[
        bool | None,
        typer.Option("--tracing/--no-tracing", help="Record OpenTelemetry spans of runs."),
    ] = None,
    otlp_endpoint: Annotated[
        str | None, typer.Option(help="Export spans with OTLP/HTTP to this traces URL.")
    ] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from ember._config import SystemdEnv
    from ember.daemon import serve
    from ember.daemon.ops.logging import LOG_FORMATS, LogFormat, configure

    try:
        project = find_project(Path.cwd())
    except ConfigError:
        project = None
    try:
        config = daemon_config(
            project,
            state_dir=state_dir,
            socket_path=socket,
            tcp=tcp,
            durability=durability,
            max_concurrent_runs=max_concurrent_runs,
            checkpoint=checkpoint,
            tls_cert=tls_cert,
            tls_key=tls_key,
            sync=sync,
            shutdown_grace_s=shutdown_grace_s,
            socket_group=socket_group,
            retention=retention,
            min_free_bytes=min_free_bytes,
            tracing=tracing,
            otlp_endpoint=otlp_endpoint,
            systemd=SystemdEnv.from_env(),
        )
    except EmberError as exc:
        fail(str(exc))
    if log_format not in LOG_FORMATS:
        fail(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    configure(cast(LogFormat, log_format), config.systemd.journal_stream)
    try:
        serve(config)
    except EmberError as exc:
        fail(str(exc))


def _payload(raw: str | None, option: str = "--payload") -> Any:
    if raw is None:
        return None
    text = raw
    if raw.startswith("@"):
        try:
            text = Path(raw[1:]).read_text()
        except OSError as exc:
            fail(f"cannot read the payload file {raw[1:]}: {exc.strerror}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{option} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")


@app.command()
def trigger(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    payload: Annotated[
        str | None, typer.Option("--payload", help="JSON payload, or @file.json.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish.")] = False,
    delay: Annotated[str | None, typer.Option(help="Start after e.g. 30s, 1h, or a date.")] = None,
    ttl: Annotated[str | None, typer.Option(help="Expire if not started within.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Dedupe key.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue name.")] = None,
    concurrency_key: Annotated[str | None, typer.Option(help="Per-key concurrency.")] = None,
    priority: Annotated[float, typer.Option(help="Seconds of head start.")] = 0.0,
    max_attempts: Annotated[int | None, typer.Option(help="Override the retry budget.")] = None,
    version: Annotated[str | None, typer.Option(help="Lock to this version.")] = None,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Trigger a run of a task."""
    data = _payload(payload)
    client = _client(env, profile)

    async def go() -> None:
        handle = await Tasks(client).trigger(
            task_id,
            data,
            delay=delay,
            ttl=ttl,
            idempotency_key=idempotency_key,
            tags=tag or (),
            queue=queue,
            concurrency_key=concurrency_key,
            priority=priority,
            max_attempts=max_attempts,
            version=version,
        )
        if not wait:
            if as_json:
                _print_json(
                    {"id": handle.id, "task_id": handle.task_id, "is_cached": handle.is_cached}
                )
            else:
                cached = " (existing run: idempotency key matched)" if handle.is_cached else ""
                typer.echo(f"○ triggered {handle.task_id} -> {handle.id}{cached}")
            return
        run = await Runs(client).poll(handle.id)
        if as_json:
            _print_json(run)
        else:
            out.print_run(run)
        if run.status.value != "COMPLETED":
            raise typer.Exit(1)

    _run_async(go())


@runs_app.command("list")
def runs_list(
    status: Annotated[
        list[str] | None, typer.Option("--status", "-s", help="Status (repeatable).")
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Task id (repeatable).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    version: Annotated[str | None, typer.Option(help="Locked version.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    client = _client(env, profile)
    statuses = [s.upper() for s in status or []]

    async def go() -> None:
        page = await Runs(client).list(
            status=statuses or None, task=task, tag=tag, version=version, limit=limit
        )
        if as_json:
            _print_json(page)
        else:
            out.print_run_table(page.data)

    _run_async(go())


def _one_run(run_id: str, env: str | None, profile: str | None, action: str, as_json: bool) -> None:
    client = _client(env, profile)
    runs = Runs(client)

    async def go() -> None:
        result: Run | RunSummary | Any
        if action == "show":
            result = await runs.retrieve(run_id)
        elif action == "cancel":
            result = await runs.cancel(run_id)
        else:
            logs = await runs.logs(run_id)
            if as_json:
                _print_json(logs)
            else:
                out.print_logs(logs.data)
            return
        if as_json:
            _print_json(result)
        else:
            out.print_run(result)

    _run_async(go())


@runs_app.command("show")
def runs_show(
    run_id: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Show a run: status, payload, output, error, attempts, history."""
    _one_run(run_id, env, profile, "show", as_json)


@runs_app.command("logs")
def runs_logs(
    run_id: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Print a run's log lines."""
    _one_run(run_id, env, profile, "logs", as_json)


@runs_app.command("trace")
def runs_trace(
    run_id: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Print a run's OpenTelemetry spans as a tree, with offsets and durations."""
    from ember.cli._trace import print_trace

    client = _client(env, profile)

    async def go() -> None:
        trace = await Runs(client).trace(run_id)
        if as_json:
            _print_json(trace)
        else:
            print_trace(trace)

    _run_async(go())


@runs_app.command("cancel")
def runs_cancel(
    run_id: str, env: EnvOption = None, profile: ProfileOption = None, as_json: JsonFlag = False
) -> None:
    """Cancel a run that has not finished."""
    _one_run(run_id, env, profile, "cancel", as_json)


@runs_app.command("replay")
def runs_replay(
    run_id: str,
    payload: Annotated[
        str | None,
        typer.Option("--payload", help="A new JSON payload, or @file.json (default: the run's)."),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="New tags instead of the run's (repeatable).")
    ] = None,
    version: Annotated[str | None, typer.Option(help="Run on this version.")] = None,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a task again like a previous run, optionally with a new payload or tags."""
    changes: dict[str, Any] = {"version": version, "tags": tag or None}
    if payload is not None:
        changes["payload"] = _payload(payload)
    client = _client(env, profile)

    async def go() -> None:
        replay = await Runs(client).replay(run_id, **changes)
        if as_json:
            _print_json(replay)
        else:
            typer.echo(f"○ replayed {run_id} -> {replay.id}")

    _run_async(go())


@app.command()
def openapi(env: EnvOption = None, profile: ProfileOption = None) -> None:
    """Print the daemon's OpenAPI document."""
    client = _client(env, profile)
    document = _run_async(client.request(Call("GET", "/openapi.json", dict[str, Any])))
    _print_json(document)


@profiles_app.command("add")
def profiles_add(
    name: Annotated[str, typer.Argument(help="Profile name, e.g. prod.")],
    url: Annotated[str, typer.Option(help="The daemon's URL, e.g. https://ember.example.com.")],
    api_key: Annotated[str, typer.Option(help="An API key of the environment to use.")],
    env: Annotated[str, typer.Option(help="The key's environment.")] = "prod",
) -> None:
    """Save a remote daemon under a name."""
    from ember.sync import Profile, profiles_path, save_profile

    try:
        save_profile(Profile(name=name, url=url, api_key=api_key, env=env))
    except EmberError as exc:
        fail(str(exc))
    typer.echo(f"○ saved profile {name} in {profiles_path()}")


@profiles_app.command("list")
def profiles_list(as_json: JsonFlag = False) -> None:
    """List saved profiles (keys are not shown)."""
    from ember.sync import load_profiles

    try:
        profiles = load_profiles()
    except EmberError as exc:
        fail(str(exc))
    rows = [{"name": p.name, "url": p.url, "env": p.env} for p in profiles.values()]
    if as_json:
        _print_json(rows)
        return
    for row in rows or [{"name": "no profiles", "url": "", "env": ""}]:
        typer.echo(f"{row['name']:16} {row['env']:12} {row['url']}")


@profiles_app.command("remove")
def profiles_remove(name: str) -> None:
    """Forget a saved profile."""
    from ember.sync import delete_profile

    try:
        delete_profile(name)
    except EmberError as exc:
        fail(str(exc))
    typer.echo(f"○ removed profile {name}")


@tokens_app.command("list")
def tokens_list(
    status: Annotated[str | None, typer.Option(help="WAITING, COMPLETED or TIMED_OUT.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List wait tokens, newest first."""
    from ember._wait import Wait

    client = _client(env, profile)
    chosen = status.upper() if status else None
    page = _run_async(Wait(client).list_tokens(status=chosen, limit=limit))  # type: ignore[arg-type]
    if as_json:
        _print_json(page)
        return
    for token in page.data or []:
        waiting = f" waiting: {', '.join(token.waiting_runs)}" if token.waiting_runs else ""
        typer.echo(f"{token.id:40} {token.status:10} {token.idempotency_key or '-':24}{waiting}")
    if not page.data:
        typer.echo("no tokens")


@tokens_app.command("complete")
def tokens_complete(
    token_id: str,
    data: Annotated[
        str, typer.Option("--data", help="JSON to resume the run with, or @file.")
    ] = "null",
    env: EnvOption = None,
    profile: ProfileOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Complete a wait token; the runs waiting on it resume with the data."""
    from ember._wait import Wait

    value = _payload(data, "--data")
    client = _client(env, profile)
    info = _run_async(Wait(client).complete_token(token_id, value))
    if as_json:
        _print_json(info)
    else:
        typer.echo(f"○ completed {token_id}")


@app.command()
def doctor(env: EnvOption = None) -> None:
    """Check this machine: CRIU checkpoints, and the daemon if one runs."""
    from ember._types import Health
    from ember.daemon.procs.checkpoint.kdat import kdat_cache_problem
    from ember.daemon.procs.checkpoint.support import detect

    config = project_config()
    support = detect(config)
    mark = "✓" if support.ok else "✗"
    typer.echo(f"{mark} CRIU checkpoints: {support.reason}")
    if support.ok:
        typer.echo(f"  smoke test: dump {support.dump_ms} ms, restore {support.restore_ms} ms")
        problem = kdat_cache_problem(support.check_ms)
        typer.echo(
            f"✗ {problem}" if problem else "✓ criu keeps its kernel-feature cache (/run is a tmpfs)"
        )
    else:
        typer.echo("  long waits park their process (or use checkpoint = 'replay' to free it)")
    _check_machine_limits(config.machine_limits)
    _check_state_modes(config.state_dir)
    client = Client(client_settings(config, env))
    try:
        health = asyncio.run(client.request(Call("GET", "/healthz", Health)))
    except EmberError as exc:
        typer.echo(f"✗ daemon: {exc}")
        return
    typer.echo(
        f"✓ daemon {health.pid} ({health.version}) on {client.settings.where}: long waits held "
        f"by {health.checkpoint_strategy}; {health.active_runs} active runs, "
        f"{health.processes} processes"
    )
    counts = health.checkpoint_counters
    if health.checkpoint_strategy == "criu" or counts:
        mark = "✗" if counts.get("fallbacks_park") or counts.get("fallbacks_replay") else "✓"
        typer.echo(
            f"{mark} checkpoints since the daemon started: {counts.get('dumps', 0)} dumped "
            f"({counts.get('dumps_not_needed', 0)} not needed: their wait was over; "
            f"{counts.get('dumps_declined', 0)} not made: their restore could not be back "
            "before the deadline, held by park or replay), "
            f"{counts.get('dump_failures', 0)} dumps failed, "
            f"{counts.get('dump_retries_ok', 0)} of them worked when retried; "
            f"fell back to park {counts.get('fallbacks_park', 0)}, "
            f"to replay {counts.get('fallbacks_replay', 0)} (reasons in each run's history)"
        )


def _check_machine_limits(want: str) -> None:
    """Say how run processes are held to their machine presets here: cgroups, or rlimits."""
    from ember.daemon.procs.cgroups import MachineLimits

    try:
        limits = MachineLimits(want)
    except RuntimeError as exc:
        typer.echo(f"✗ machine limits: {exc}")
        return
    limits.close()  # (the probe made this process's own cgroup folder: it goes now)
    typer.echo(f"{'✓' if limits.uses_cgroups else '✗'} machine limits: {limits.reason}")
    if limits.mode == "rlimit":
        typer.echo(
            "  memory is capped by RLIMIT_DATA and CPU is not limited; run the daemon as root "
            "in a cgroup it may write (systemd: Delegate=yes) for real limits"
        )


def _check_state_modes(state: Path) -> None:
    """Warn about state files others may read: the database, tokens, a process's memory."""
    from ember.daemon.store.modes import loose_entries

    if not state.is_dir():
        return
    try:
        loose = list(loose_entries(state))
    except PermissionError as exc:
        typer.echo(f"✗ state files: cannot check {state} ({exc.strerror}); run doctor as its owner")
        return
    if not loose:
        typer.echo(f"✓ state files: private under {state} (files 0600, folders 0700)")
        return
    typer.echo(
        f"✗ state files: {len(loose)} under {state} are open to the group or others, and they "
        "hold run data, tokens and checkpointed memory:"
    )
    for path, mode in loose[:5]:
        typer.echo(f"  {mode:04o} {path}")
    typer.echo(f"  make them private with: chmod -R go-rwx {state}")


@app.command()
def tui(env: EnvOption = None, profile: ProfileOption = None) -> None:
    """Open the dashboard: runs, tasks, queues, versions and processes, live.

    With --profile it shows the remote daemon itself; with --env of a forwarded environment,
    the local daemon's mirror of it (offline too).
    """
    from ember.tui import DaemonLauncher, EmberApp

    config = project_config()
    settings = _client(env, profile).settings if profile else client_settings(config, env)
    launcher = None
    if settings.url is None:
        launcher = DaemonLauncher(
            socket_path=settings.socket_path,
            state_dir=config.state_dir,
            log_path=config.state_dir / "daemon.log",
        )
    EmberApp(settings, launcher=launcher).run()


# Versions, environments and schedules (their bodies live in their own modules).
app.add_typer(service_app, name="service")
app.command("backup")(backup_command)
app.command()(deploy)
app.command()(promote)
app.command()(versions)
app.command()(login)
app.command()(whoami)
app.command()(logout)
app.add_typer(keys_app, name="keys")
app.add_typer(env_app, name="env")
app.add_typer(schedules_app, name="schedules")
app.add_typer(queues_app, name="queues")
app.add_typer(alerts_app, name="alerts")
