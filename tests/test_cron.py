"""Cron ticks across daylight-saving changes (America/New_York, 2026)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ember import ConfigError
from ember._cron import latest_at_or_before, next_after, upcoming, validate

NY = "America/New_York"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_a_daily_time_keeps_its_local_hour_across_the_change() -> None:
    ticks = upcoming("0 9 * * *", NY, utc(2026, 10, 31, 12), 3)
    # 09:00 EDT (UTC-4), then 09:00 EST (UTC-5) once the clocks fall back on November 1st.
    assert ticks == [utc(2026, 10, 31, 13), utc(2026, 11, 1, 14), utc(2026, 11, 2, 14)]


def test_a_skipped_time_fires_once_as_far_after_the_change() -> None:
    # 02:30 does not exist on March 8th: the tick is at 03:30 EDT (07:30 UTC), once.
    ticks = upcoming("30 2 * * *", NY, utc(2026, 3, 7, 12), 3)
    assert ticks == [utc(2026, 3, 8, 7, 30), utc(2026, 3, 9, 6, 30), utc(2026, 3, 10, 6, 30)]


def test_a_repeated_time_fires_once_for_fixed_hours() -> None:
    # 01:30 happens twice on November 1st (EDT, then EST): a fixed-hour schedule fires once.
    ticks = upcoming("30 1 * * *", NY, utc(2026, 10, 31, 12), 2)
    assert ticks == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_every_hour_schedules_keep_their_real_time_rhythm() -> None:
    # Every 30 minutes through the repeated hour: both passes fire, none twice.
    ticks = upcoming("*/30 * * * *", NY, utc(2026, 11, 1, 4, 15), 6)
    assert ticks == [utc(2026, 11, 1, h, m) for h, m in ((4, 30), (5, 0), (5, 30), (6, 0))] + [
        utc(2026, 11, 1, 6, 30),
        utc(2026, 11, 1, 7, 0),
    ]
    # Hourly across the spring gap: 01:00 EST, then 03:00 EDT (02:00 does not exist).
    spring = upcoming("0 * * * *", NY, utc(2026, 3, 8, 5, 30), 3)
    assert spring == [utc(2026, 3, 8, 6), utc(2026, 3, 8, 7), utc(2026, 3, 8, 8)]


def test_latest_tick_is_at_or_before() -> None:
    assert latest_at_or_before("0 * * * *", "UTC", utc(2026, 1, 1, 9)) == utc(2026, 1, 1, 9)
    assert latest_at_or_before("0 * * * *", "UTC", utc(2026, 1, 1, 9, 59)) == utc(2026, 1, 1, 9)
    assert latest_at_or_before("30 1 * * *", NY, utc(2026, 11, 1, 7)) == utc(2026, 11, 1, 5, 30)
    assert next_after("0 * * * *", "UTC", utc(2026, 1, 1, 9)) == utc(2026, 1, 1, 10)


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("0 9 * *", "UTC", "not a 5-field cron expression"),
        ("0 0 9 * * *", "UTC", "not a 5-field cron expression"),
        ("61 * * * *", "UTC", "not a 5-field cron expression"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("0 9 * * *", "Mars/Olympus", "not an IANA timezone"),
    ],
)
def test_invalid_schedules_say_why(cron: str, timezone: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(cron, timezone)
