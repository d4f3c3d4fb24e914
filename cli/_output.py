"""Human-readable output of the CLI: run lines, tables and details."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
import typer

from ember._types import LogLine, Run, RunStatus, RunSummary, SyncMark

STATUS_COLOURS = {
    RunStatus.COMPLETED: typer.colors.GREEN,
    RunStatus.FAILED: typer.colors.RED,
    RunStatus.CRASHED: typer.colors.RED,
    RunStatus.SYSTEM_FAILURE: typer.colors.RED,
    RunStatus.TIMED_OUT: typer.colors.RED,
    RunStatus.EXPIRED: typer.colors.YELLOW,
    RunStatus.CANCELED: typer.colors.YELLOW,
    RunStatus.EXECUTING: typer.colors.BLUE,
    RunStatus.WAITING: typer.colors.CYAN,
}


def status_text(status: RunStatus) -> str:
    """A status, coloured."""
    return typer.style(status.value, fg=STATUS_COLOURS.get(status))


def duration_text(start: datetime | None, end: datetime | None) -> str:
    """``1.2s`` or ``35ms`` between two instants, or ``-``."""
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def print_run_table(runs: Sequence[RunSummary]) -> None:
    """One line per run."""
    if not runs:
        typer.echo("no runs match")
        return
    typer.echo(
        f"{'RUN':32} {'TASK':24} {'STATUS':16} {'VERSION':12} {'ATT':>3}  {'CREATED':19} DURATION"
    )
    for run in runs:
        status = status_text(run.status) + " " * (16 - len(run.status.value))
        typer.echo(
            f"{run.id:32} {run.task_id[:24]:24} {status} {run.version or '-':12} "
            f"{run.attempt_count:>3}  {run.created_at.astimezone():%Y-%m-%d %H:%M:%S} "
            f"{duration_text(run.started_at, run.finished_at)}"
        )
    if runs[0].sync is not None:
        typer.echo(sync_text(runs[0].sync, with_ids=False))


def sync_text(mark: SyncMark, *, with_ids: bool = True) -> str:
    """Where a forwarded run lives and how fresh the local view of it is."""
    if mark.live:
        fresh = "live"
    elif mark.as_of is not None:
        fresh = f"offline, as of {mark.as_of.astimezone():%Y-%m-%d %H:%M:%S}"
    else:
        fresh = "not reached yet"
    where = f"mirror of {mark.profile} ({mark.url}): {fresh}"
    if mark.error and not mark.live:
        where += f"; last problem: {mark.error}"
    if not with_ids:
        return where
    remote = f"remote {mark.remote_id}" if mark.remote_id else "not sent yet"
    return f"  sync {mark.state}, {remote}; {where}"


def _json(raw: msgspec.Raw) -> str:
    return msgspec.json.format(bytes(raw), indent=2).decode()


def print_run(run: Run) -> None:
    """A run in full."""
    typer.echo(f"{run.id}  {run.task_id}  {status_text(run.status)}")
    attempts = f"{run.attempt_count}/{run.max_attempts}"
    typer.echo(f"  version {run.version or '-'}  env {run.env}  attempts {attempts}")
    if run.sync is not None:
        typer.echo(sync_text(run.sync))
    if run.tags:
        typer.echo(f"  tags {', '.join(run.tags)}")
    created = f"{run.created_at.astimezone():%Y-%m-%d %H:%M:%S}"
    typer.echo(f"  created {created}  duration {duration_text(run.started_at, run.finished_at)}")
    typer.echo("  payload " + _json(run.payload).replace("\n", "\n  "))
    if run.metadata is not None:
        typer.echo("  metadata " + msgspec.json.encode(run.metadata).decode())
    if run.status is RunStatus.COMPLETED:
        typer.echo("  output " + _json(run.output).replace("\n", "\n  "))
    if run.error is not None:
        typer.secho(f"  error {run.error.name}: {run.error.message}", fg=typer.colors.RED)
        if run.error.stack:
            typer.echo("  " + run.error.stack.rstrip().replace("\n", "\n  "))
    for attempt in run.attempts:
        cpu = f" cpu {attempt.cpu_s * 1000:.1f}ms" if attempt.cpu_s is not None else ""
        rss = f" rss {attempt.peak_rss_bytes / 1e6:.1f}MB" if attempt.peak_rss_bytes else ""
        typer.echo(
            f"  attempt {attempt.number} {attempt.status} pid {attempt.pid} "
            f"{duration_text(attempt.started_at, attempt.finished_at)}{cpu}{rss}"
        )
    typer.echo("  history " + " -> ".join(s.status for s in run.snapshots))


def print_logs(lines: Sequence[LogLine]) -> None:
    """A run's log lines."""
    if not lines:
        typer.echo("no log lines")
    for line in lines:
        attrs = " ".join(f"{k}={v}" for k, v in line.attrs.items())
        typer.echo(
            f"{line.ts.astimezone():%H:%M:%S.%f}"[:-3]
            + f" #{line.attempt} {line.level.upper():5} {line.message} {attrs}".rstrip()
        )
