"""How the dashboard writes statuses, instants, durations and sizes.

Every function that shows time takes ``now`` from the app's clock rather than reading the
system clock, so that a screen renders the same way twice (snapshot tests freeze the clock).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from rich.style import Style
from textual.color import Color

from ember._types import RunStatus

Clock = Callable[[], datetime]
"""The dashboard's idea of now: an aware UTC datetime."""


def system_clock() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


# Symbols are single-cell on every terminal we tried (no emoji), so columns stay aligned.
STATUS_SYMBOLS: dict[RunStatus, str] = {
    RunStatus.PENDING_VERSION: "◌",
    RunStatus.DELAYED: "◷",
    RunStatus.QUEUED: "○",
    RunStatus.DEQUEUED: "◔",
    RunStatus.EXECUTING: "●",
    RunStatus.WAITING: "◑",
    RunStatus.COMPLETED: "✔",
    RunStatus.CANCELED: "⊘",
    RunStatus.FAILED: "✖",
    RunStatus.CRASHED: "✖",
    RunStatus.SYSTEM_FAILURE: "▲",
    RunStatus.EXPIRED: "⊗",
    RunStatus.TIMED_OUT: "⧗",
}

# Which theme colour each status takes; resolved against the live theme, so that the light
# theme gets readable shades rather than fixed ANSI colours.
STATUS_COLOURS: dict[RunStatus, str] = {
    RunStatus.PENDING_VERSION: "warning",
    RunStatus.DELAYED: "secondary",
    RunStatus.QUEUED: "foreground-muted",
    RunStatus.DEQUEUED: "primary",
    RunStatus.EXECUTING: "primary",
    RunStatus.WAITING: "accent",
    RunStatus.COMPLETED: "success",
    RunStatus.CANCELED: "foreground-muted",
    RunStatus.FAILED: "error",
    RunStatus.CRASHED: "error",
    RunStatus.SYSTEM_FAILURE: "error",
    RunStatus.EXPIRED: "warning",
    RunStatus.TIMED_OUT: "error",
}


def status_label(status: RunStatus) -> str:
    """``Timed out`` for TIMED_OUT: the words Trigger.dev's dashboard uses."""
    return status.value.replace("_", " ").capitalize()


def status_cell(status: RunStatus) -> str:
    """Symbol and label, e.g. ``✖ Failed``."""
    return f"{STATUS_SYMBOLS[status]} {status_label(status)}"


def status_styles(variables: dict[str, str]) -> dict[RunStatus, Style]:
    """Rich styles per status from a theme's CSS variables (``App.theme_variables``)."""
    background = Color.parse(variables.get("background", "black"))
    styles = {}
    for status, name in STATUS_COLOURS.items():
        # Muted colours carry an alpha channel, which Rich styles cannot: blend it away.
        colour = background + Color.parse(variables.get(name) or variables["foreground"])
        bold = status in (RunStatus.EXECUTING, RunStatus.FAILED, RunStatus.CRASHED)
        styles[status] = Style(color=colour.rich_color, bold=bold)
    return styles


def status_markup(status: RunStatus) -> str:
    """Textual markup for a status, coloured by the current theme."""
    return f"[${STATUS_COLOURS[status]}]{status_cell(status)}[/]"


def ago(moment: datetime | None, now: datetime) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``; ``01-15 12:00`` (UTC) past a day; ``—`` for None."""
    if moment is None:
        return "—"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return "in " + duration(-seconds)
    if seconds < 60:
        return f"{int(seconds)}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return moment.astimezone(UTC).strftime("%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    """``350ms``, ``4.2s``, ``3m 05s``, ``2h 10m``, ``3d 4h``; ``—`` for None."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"


def span(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    """Seconds from ``start`` to ``end``, or to ``now`` while ``end`` is None."""
    if start is None:
        return None
    return max(0.0, ((end or now) - start).total_seconds())


def stamp(moment: datetime | None) -> str:
    """An absolute UTC time with milliseconds, ``2025-01-15 12:00:01.250``."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def size(n_bytes: int | None) -> str:
    """``512 B``, ``1.5 MB``; ``—`` for None."""
    if n_bytes is None:
        return "—"
    value = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
