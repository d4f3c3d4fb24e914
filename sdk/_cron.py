"""Cron ticks in a timezone, correct across daylight-saving changes.

croniter walks the expression over *wall-clock* times (naive datetimes: plain calendar
arithmetic); each wall time is then placed in the schedule's timezone. Two cases need a rule,
and these are cron's own (Vixie cron, systemd timers agree):

- a wall time the clocks skip (02:30 on the night they spring forward) fires at the same
  distance after the change (03:30 local), once;
- a wall time the clocks repeat (01:30 on the night they fall back) fires once, the first
  time, for an expression with fixed hours (``30 1 * * *``); an expression that runs every
  hour (hour field ``*``) fires in both passes, so it keeps its real-time rhythm.

Ticks are UTC datetimes. Only standard 5-field expressions are accepted (no seconds), with
croniter's extensions (``L``, ``#``, names of days and months).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from ember._errors import ConfigError

# Offsets change by at most this much at one transition: wall times this far on either side
# of an instant are enough to find the ticks around it.
_WINDOW = timedelta(hours=3)
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "GMT", "Etc/GMT"})


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The timezone of an IANA name.

    Raises:
        ConfigError: no such timezone.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"timezone {name!r} is not an IANA timezone name (e.g. 'UTC', 'Europe/Paris', "
            "'America/New_York')"
        ) from None


@lru_cache(maxsize=256)
def _every_hour(cron: str) -> bool:
    return bool(croniter.expand(cron)[0][1] == ["*"])


def validate(cron: str, timezone: str) -> None:
    """Check a cron expression and a timezone.

    Raises:
        ConfigError: the expression is not 5 valid fields, never fires, or the timezone is
            unknown; the message says which.
    """
    zone(timezone)
    fields = cron.split()
    if len(fields) != 5 or not croniter.is_valid(cron):
        raise ConfigError(
            f"cron {cron!r} is not a 5-field cron expression (minute hour day-of-month month "
            "day-of-week, e.g. '0 9 * * *' for 09:00 every day)"
        )
    try:
        next_after(cron, timezone, datetime.now(UTC))
    except CroniterError:
        raise ConfigError(f"cron {cron!r} never fires (no such date)") from None


def _instants(wall: datetime, tz: ZoneInfo, every_hour: bool) -> list[datetime]:
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first >= second:
        # The same instant, or a skipped wall time: fold=0 reads it with the offset from
        # before the change, which is as far after the change as the wall time was into it.
        return [first]
    return [first, second] if every_hour else [first]


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def next_after(cron: str, timezone: str, instant: datetime) -> datetime:
    """The first tick strictly after ``instant`` (an aware datetime), in UTC."""
    tz = zone(timezone)
    if timezone in _UTC_NAMES:
        start = instant.astimezone(UTC).replace(tzinfo=None)
        return croniter(cron, start).get_next(datetime).replace(tzinfo=UTC)
    every_hour = _every_hour(cron)
    walls = croniter(cron, _wall(instant, tz) - _WINDOW)
    best: datetime | None = None
    best_wall = datetime.min
    while True:
        wall: datetime = walls.get_next(datetime)
        if best is not None and wall > best_wall + _WINDOW:
            return best
        for tick in _instants(wall, tz, every_hour):
            if tick > instant and (best is None or tick < best):
                best, best_wall = tick, wall


def latest_at_or_before(cron: str, timezone: str, instant: datetime) -> datetime:
    """The last tick at or before ``instant`` (an aware datetime), in UTC."""
    tz = zone(timezone)
    if timezone in _UTC_NAMES:
        start = instant.astimezone(UTC).replace(tzinfo=None) + timedelta(microseconds=1)
        return croniter(cron, start).get_prev(datetime).replace(tzinfo=UTC)
    every_hour = _every_hour(cron)
    walls = croniter(cron, _wall(instant, tz) + _WINDOW)
    best: datetime | None = None
    best_wall = datetime.max
    while True:
        wall: datetime = walls.get_prev(datetime)
        if best is not None and wall < best_wall - _WINDOW:
            return best
        for tick in _instants(wall, tz, every_hour):
            if tick <= instant and (best is None or tick > best):
                best, best_wall = tick, wall


def upcoming(cron: str, timezone: str, after: datetime, count: int = 5) -> list[datetime]:
    """The next ``count`` ticks after ``after``, in UTC."""
    ticks: list[datetime] = []
    for _ in range(count):
        after = next_after(cron, timezone, after)
        ticks.append(after)
    return ticks
