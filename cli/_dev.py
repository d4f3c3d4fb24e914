"""``ember dev``: an embedded daemon, hot reload, and one line per run event.

If a daemon already answers on the socket, ``ember dev`` uses it; otherwise it runs one in
its own event loop and stops it on exit. Every relevant code change registers a new version
(unchanged content registers nothing); a version that fails to import leaves the last good
one serving. Ctrl-C cancels the dev runs in flight (executing or waiting), then stops; a
second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

import typer

from ember._client import Call, Client
from ember._envvars import EnvVars
from ember._errors import DaemonUnavailable, EmberError
from ember._runs import Runs
from ember._types import RunEvent, RunStatus, RunSummary, VersionInfo
from ember.cli._dotenv import read_dotenv
from ember.cli._output import duration_text
from ember.cli._project import INCLUDE_SUFFIXES, SKIP_DIRS, Project, snapshot
from ember.cli._settings import client_settings
from ember.daemon import Daemon, loop_factory
from ember.daemon.config import DaemonConfig

# Runs that started and have not ended, like Trigger.dev's dev auto-cancel: executing,
# waiting (on a duration, a token or a child), and queued between attempts or to resume.
# A QUEUED run that never started stays for the next `ember dev`.
_IN_FLIGHT = (RunStatus.EXECUTING, RunStatus.DEQUEUED, RunStatus.WAITING, RunStatus.QUEUED)


def say(text: str, colour: str | None = None) -> None:
    """Print one dev line."""
    typer.secho(f"○ {text}", fg=colour)


def run_dev(project: Project, config: DaemonConfig, *, watch: bool) -> int:
    """Run ``ember dev`` until Ctrl-C; returns the exit status."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_dev(project, config, watch))


async def _dev(project: Project, config: DaemonConfig, watch: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            os._exit(130)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)

    daemon: Daemon | None = None
    client = Client(client_settings(config, "dev"))
    try:
        await client.request(Call("GET", "/healthz", dict[str, object]))
        say(f"Using the daemon on {config.api_socket}")
    except DaemonUnavailable:
        daemon = Daemon(config)
        try:
            await daemon.start()
        except EmberError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            return 1
        say(f"Started a daemon (state in {config.state_dir})")
    printer = loop.create_task(_print_events(client))
    tasks: list[asyncio.Task[None]] = [printer]
    try:
        await _sync_dotenv(client, project)
        say("Building local worker…")
        current = await _register(client, project, None)
        if watch:
            tasks.append(loop.create_task(_watch(project, client, stop, current)))
        await stop.wait()
        say("Stopping: canceling the dev runs in flight…")
        await _cancel_in_flight(client)
    except EmberError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        if daemon is not None:
            await daemon.stop()
    return 0


async def _sync_dotenv(client: Client, project: Project) -> None:
    """Send the project's ``.env`` as the dev environment's ``dotenv`` variables."""
    try:
        variables = read_dotenv(project.root)
    except EmberError as exc:
        say(f"Ignoring .env: {exc}", "red")
        return
    reserved = [name for name in variables if name.startswith("EMBER_")]
    if reserved:
        say(f"Not passing {', '.join(reserved)} from .env to tasks (EMBER_* are Ember's own)")
    variables = {k: v for k, v in variables.items() if k not in reserved}
    await EnvVars(client).upload(variables, source="dotenv")
    if variables:
        say(f"Loaded {len(variables)} variables from .env: {', '.join(variables)}")


async def _register(
    client: Client, project: Project, previous: VersionInfo | None
) -> VersionInfo | None:
    try:
        archive, count = snapshot(project)
    except EmberError as exc:
        say(f"Cannot build the worker: {exc}", "red")
        return None
    call = Call(
        "POST",
        "/api/v1/versions",
        VersionInfo,
        body=archive,
        params={"promote": "true"},
        timeout_s=300.0,
    )
    info = await client.request(call)
    if info.status == "FAILED":
        say(f"Build failed ({count} files); the last good version keeps serving:", "red")
        typer.echo(info.error or "", err=True)
    elif previous is not None and info.id == previous.id:
        say(f"No changes detected: {info.id} keeps serving")
    else:
        names = ", ".join(t.id for t in info.tasks) or "no tasks found"
        say(f"Local worker ready -> {info.id}  ({len(info.tasks)} tasks: {names})", "green")
        for task in info.tasks:
            if task.schedule is not None and task.schedule.cron is not None:
                say(f"Schedule {task.id}: {task.schedule.cron} ({task.schedule.timezone})")
    return info


def _relevant(path: str, root: Path) -> bool:
    """Whether a changed file is part of the snapshot (not an editor's temp file)."""
    name = Path(path).name
    # Editors write temp and swap files next to the real one; only source changes count.
    if name.startswith((".", "#")) or name.endswith(("~", ".swp", ".tmp")):
        return False
    try:
        folders = Path(path).relative_to(root).parts[:-1]
    except ValueError:
        return False
    # Folders the snapshot leaves out: hidden ones (.venv, .git, .ember), caches, builds.
    if any(f.startswith(".") or f in SKIP_DIRS or f.endswith(".egg-info") for f in folders):
        return False
    return Path(path).suffix in INCLUDE_SUFFIXES


async def _watch(
    project: Project, client: Client, stop: asyncio.Event, current: VersionInfo | None
) -> None:
    from watchfiles import awatch

    dotenv = str(project.root / ".env")
    async for changes in awatch(project.root, stop_event=stop, recursive=True):
        try:
            if any(path == dotenv for _, path in changes):
                await _sync_dotenv(client, project)
            if any(_relevant(path, project.root) for _, path in changes):
                say("Rebuilding local worker…")
                current = await _register(client, project, current) or current
        except EmberError as exc:
            say(f"Rebuild failed: {exc}", "red")


async def _cancel_in_flight(client: Client) -> None:
    runs = Runs(client)
    started = [
        run.id
        async for run in runs.iterate(status=list(_IN_FLIGHT), limit=1000)
        if run.status is not RunStatus.QUEUED or run.attempt_count > 0
    ]
    canceled = 0
    for run_id in started:
        # It may have finished meanwhile, or gone with its canceled parent.
        with contextlib.suppress(EmberError):
            await runs.cancel(run_id)
            canceled += 1
    if canceled:
        say(f"Canceled {canceled} run(s)")


def run_line(run: RunSummary) -> str | None:
    """Trigger.dev-style dev line for a run event, or None for events not worth a line."""
    now = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    head = f"{now} -> {run.version or '-'} | {run.task_id} | {run.id}.{run.attempt_count} | "
    status = run.status
    if status is RunStatus.EXECUTING:
        return head + "Executing"
    if status is RunStatus.COMPLETED:
        return (
            head
            + typer.style("Success", fg="green")
            + f" ({duration_text(run.started_at, run.finished_at)})"
        )
    if status is RunStatus.QUEUED and run.attempt_count > 0:
        if run.error is None:
            return head + "Resuming"
        return head + typer.style(f"Error (retrying…): {run.error.message}", fg="yellow")
    if status is RunStatus.WAITING:
        return head + typer.style("Waiting", fg="cyan")
    if status is RunStatus.CANCELED:
        return head + typer.style("Cancelled", fg="yellow")
    if status.is_final:
        reason = f": {run.error.name}: {run.error.message}" if run.error else ""
        return head + typer.style(f"{status.value.title()}{reason}", fg="red")
    if status is RunStatus.PENDING_VERSION:
        return head + typer.style("Pending version (no current version has this task)", fg="yellow")
    return None


async def _print_events(client: Client) -> None:
    lost = False
    while True:
        try:
            async for event in client.events():
                if lost:
                    say("Connection restored", "green")
                    lost = False
                if isinstance(event, RunEvent) and (line := run_line(event.run)):
                    typer.echo(f"○ {line}")
                    sys.stdout.flush()
        except DaemonUnavailable:
            if not lost:
                say("Connection to the daemon was lost; retrying…", "yellow")
                lost = True
        await asyncio.sleep(1.0)
