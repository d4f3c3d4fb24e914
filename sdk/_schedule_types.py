"""Wire types of cron schedules: the schedule itself, its requests, and a tick's payload."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from ember._types import Request, Struct

ScheduleType = Literal["DECLARATIVE", "IMPERATIVE"]
"""``DECLARATIVE``: declared in code with ``@schedules.task(cron=...)`` and synced when a
version becomes current; ``IMPERATIVE``: made at run time with ``schedules.create``."""


class ScheduledPayload(Struct, frozen=True):
    """What a scheduled task receives at each tick.

    Attributes:
        type: how the schedule was made.
        timestamp: the tick this run is for (UTC), not the moment it started.
        last_timestamp: the schedule's previous tick that fired, if any.
        timezone: the timezone the cron expression is read in.
        schedule_id: the schedule's id (``sched_...``).
        external_id: the id you gave an imperative schedule (a user, a tenant), if any.
        upcoming: the next five ticks after this one (UTC).
    """

    type: ScheduleType
    timestamp: datetime
    schedule_id: str
    timezone: str = "UTC"
    last_timestamp: datetime | None = None
    external_id: str | None = None
    upcoming: list[datetime] = msgspec.field(default_factory=list)


class Schedule(Struct, frozen=True):
    """A cron schedule that triggers a task in one environment.

    Attributes:
        id: ``sched_...``.
        task: the scheduled task's id.
        type: ``DECLARATIVE`` (from code) or ``IMPERATIVE`` (from the API).
        cron: a 5-field cron expression.
        timezone: the IANA timezone it is read in.
        active: inactive schedules do not fire.
        env: its environment.
        external_id: your own id for it, if any.
        deduplication_key: creating again with this key updates this schedule.
        next_run: its next tick (UTC) while active.
        last_run: the latest tick that fired.
    """

    id: str
    task: str
    type: ScheduleType
    cron: str
    timezone: str
    active: bool
    env: str
    created_at: datetime
    updated_at: datetime
    external_id: str | None = None
    deduplication_key: str | None = None
    next_run: datetime | None = None
    last_run: datetime | None = None


class ScheduleList(Struct, frozen=True):
    """Schedules of an environment, oldest first."""

    data: list[Schedule]


class CreateScheduleRequest(Request, frozen=True):
    """Body of ``POST /api/v1/schedules``.

    A ``deduplication_key`` that an existing schedule of the environment holds updates that
    schedule instead of creating another (so creating one per user at sign-up is safe to
    retry).
    """

    task: str
    cron: str
    timezone: str = "UTC"
    external_id: str | None = None
    deduplication_key: str | None = None


class UpdateScheduleRequest(Request, frozen=True):
    """Body of ``PUT /api/v1/schedules/{id}``: the fields to change."""

    task: str | None = None
    cron: str | None = None
    timezone: str | None = None
    external_id: str | None = None
