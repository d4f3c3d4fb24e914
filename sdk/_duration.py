"""Durations and instants as users write them: ``30``, ``"90s"``, ``"1h52m18s"``, a datetime."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from ember._errors import ConfigError

# A hundred years: longer is a mistake (``inf``, a unit slip), and instants beyond the year
# 9999 cannot be shown as dates, which broke every page that listed such a run.
MAX_DURATION_S = 100 * 365.25 * 86400
# 9999-12-31T23:59:59Z, the last instant a datetime holds.
MAX_INSTANT = 253402300799.0
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration_s(value: float | int | str | timedelta) -> float:
    """Return a duration in seconds.

    Args:
        value: seconds as a number, a ``timedelta``, or a string of number-unit parts
            (``ms``, ``s``, ``m``, ``h``, ``d``, ``w``) such as ``"1h30m"``; a bare number
            string means seconds.

    Raises:
        ConfigError: the string is not a duration, or the duration is negative, not a number,
            or longer than a hundred years.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ConfigError(
                    f"{value!r} is not a duration: write seconds (30), or number-unit parts "
                    "with units ms, s, m, h, d, w (e.g. '90s', '1h30m')"
                ) from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"duration {value!r} must be a finite number of seconds, zero or more")
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"duration {value!r} is over a hundred years ({MAX_DURATION_S:.0f} s)")
    return seconds


def resolve_instant(value: float | int | str | timedelta | datetime, now: float) -> float:
    """Return an epoch time: a datetime or ISO 8601 string as is, a duration from ``now``.

    Raises:
        ConfigError: not a date-time or a duration, or a date-time before 1970 or after
            the year 9999 (in UTC).
    """
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        try:
            instant = moment.timestamp()
        except (OverflowError, ValueError):
            instant = math.inf
        if not 0 <= instant <= MAX_INSTANT:
            raise ConfigError(f"{value.isoformat()} is outside 1970-01-01 to 9999-12-31 (UTC)")
        return instant
    if isinstance(value, str) and ("T" in value or value.count("-") >= 2):
        try:
            return resolve_instant(datetime.fromisoformat(value), now)
        except ValueError:
            raise ConfigError(
                f"{value!r} is not an ISO 8601 date-time (e.g. '2026-11-21T09:00:00Z')"
            ) from None
    return now + parse_duration_s(value)
