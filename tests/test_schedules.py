"""Cron schedules on a real daemon whose clock stands just before a tick.

The daemon's clock is injectable: these tests move it next to a tick (it then advances in
real time), so a tick comes within a second or two, restarts can skip hours, and a DST
change can be crossed without waiting for November.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock, Harness, eventually, running_daemon

from ember import BadRequest, Conflict, NotFound, Runs, ScheduledPayload, Schedules

PROJECT = {
    "tasks/__init__.py": "",
    "tasks/s.py": """
        from ember import ScheduledPayload, schedules, task

        @schedules.task(id="hourly", cron="0 * * * *")
        async def hourly(payload: ScheduledPayload) -> ScheduledPayload:
            return payload

        @schedules.task(id="nightly", cron="30 1 * * *", timezone="America/New_York")
        async def nightly(payload: ScheduledPayload) -> ScheduledPayload:
            return payload

        @schedules.task(id="early", cron="30 2 * * *", timezone="America/New_York")
        async def early(payload: ScheduledPayload) -> ScheduledPayload:
            return payload

        @schedules.task(id="prod-report", cron="0 9 * * *", environments=["prod"])
        async def prod_report(payload: ScheduledPayload) -> None:
            return None

        @schedules.task(id="per-customer")
        async def per_customer(payload: ScheduledPayload) -> ScheduledPayload:
            return payload

        @task(id="plain")
        async def plain(payload: dict) -> None:
            return None
    """,
}


def clock_at(moment: datetime) -> Callable[[], float]:
    """A clock that reads ``moment`` now and advances in real time."""
    offset = moment.timestamp() - time.time()
    return lambda: time.time() + offset


async def register_then_jump(h: Harness, clock: Clock, moment: datetime) -> None:
    """Register the project (however long that takes), then set the clock to ``moment``."""
    await h.register(PROJECT)
    clock.set(moment)
    h.daemon.scheduler.changed()  # the loop would notice the jump within a minute anyway


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


async def finished_runs(h: Harness, task: str, count: int) -> list[ScheduledPayload]:
    """Wait until ``count`` runs of ``task`` completed; return their payloads, oldest first."""
    runs = Runs(h.client)

    async def done() -> bool:
        page = await runs.list(task=task, status="COMPLETED")
        return len(page.data) >= count

    await eventually(done)
    page = await runs.list(task=task)
    assert len(page.data) == count, [r.status for r in page.data]
    full = [await runs.retrieve(r.id) for r in reversed(page.data)]
    return [r.output_as(ScheduledPayload) for r in full]


def by_task(h: Harness, task: str) -> Any:
    rows = [r for r in h.daemon.scheduler.table.rows.values() if r.task_id == task]
    assert len(rows) == 1
    return rows[0]


async def test_declared_schedules_sync_with_the_current_version(harness: Harness) -> None:
    await harness.register(PROJECT)
    listed = (await Schedules(harness.client).list()).data
    assert {(s.task, s.cron, s.timezone, s.type) for s in listed} == {
        ("hourly", "0 * * * *", "UTC", "DECLARATIVE"),
        ("nightly", "30 1 * * *", "America/New_York", "DECLARATIVE"),
        ("early", "30 2 * * *", "America/New_York", "DECLARATIVE"),
    }  # prod-report is for prod only; per-customer declares no cron
    hourly = next(s for s in listed if s.task == "hourly")
    assert hourly.active and hourly.next_run is not None and hourly.next_run.minute == 0
    changed = dict(PROJECT)
    changed["tasks/s.py"] = PROJECT["tasks/s.py"].replace('cron="0 * * * *"', 'cron="15 * * * *"')
    await harness.register(changed)
    again = await Schedules(harness.client).retrieve(hourly.id)
    assert again.cron == "15 * * * *" and again.id == hourly.id
    await harness.register({"tasks/__init__.py": "", "tasks/s.py": "X = 1\n"})
    assert (await Schedules(harness.client).list()).data == []
    await harness.register(PROJECT, env="prod")
    prod = await Schedules(harness.client).list()  # the client is in dev: prod's are apart
    assert prod.data == []
    assert {r.task_id for r in harness.daemon.scheduler.table.rows.values()} == {
        "hourly",
        "nightly",
        "early",
        "prod-report",
    }


async def test_a_tick_fires_once_with_its_payload_and_once_across_restarts(
    state_dir: Path,
) -> None:
    tick = utc(2026, 6, 1, 12)
    clock = Clock(tick - timedelta(minutes=30))
    async with running_daemon(state_dir, clock=clock) as h:
        await register_then_jump(h, clock, tick - timedelta(seconds=0.5))
        (first,) = await finished_runs(h, "hourly", 1)
        schedule_id = by_task(h, "hourly").id
        assert first.timestamp == tick and first.last_timestamp is None
        assert first.schedule_id == schedule_id and first.type == "DECLARATIVE"
        assert first.upcoming == [tick + timedelta(hours=n) for n in range(1, 6)]
    # Restart within the same hour: the tick that fired does not fire again.
    async with running_daemon(state_dir, clock=clock_at(tick + timedelta(seconds=20))) as h:
        assert h.daemon.scheduler.table.next_at[schedule_id] == tick + timedelta(hours=1)
        assert len((await Runs(h.client).list(task="hourly")).data) == 1
    # A crash after the run was committed but before the tick was recorded: the run is
    # found by its idempotency key and the tick is not fired a second time.
    with sqlite3.connect(state_dir / "ember.db") as db:
        db.execute("UPDATE schedules SET last_tick_at = NULL")
    async with running_daemon(state_dir, clock=clock_at(tick + timedelta(seconds=30))) as h:
        await eventually(lambda: by_task(h, "hourly").last_tick_at == tick.timestamp())
        assert len((await Runs(h.client).list(task="hourly")).data) == 1
    # Down for three and a half hours: only the latest missed tick runs, once.
    later = tick + timedelta(hours=3, minutes=30)
    async with running_daemon(state_dir, clock=clock_at(later)) as h:
        _, missed = await finished_runs(h, "hourly", 2)
        assert missed.timestamp == tick + timedelta(hours=3)
        assert missed.last_timestamp == tick
        assert h.daemon.scheduler.table.next_at[schedule_id] == tick + timedelta(hours=4)
        run = (await Runs(h.client).list(task="hourly")).data[0]
        assert run.idempotency_key == f"{schedule_id}:2026-06-01T15:00:00Z"


async def test_fall_back_fires_a_repeated_time_once(state_dir: Path) -> None:
    first_pass = utc(2026, 11, 1, 5, 30)  # 01:30 EDT; 01:30 EST follows an hour later
    clock = Clock(first_pass - timedelta(minutes=10))
    async with running_daemon(state_dir, clock=clock) as h:
        await register_then_jump(h, clock, first_pass - timedelta(seconds=0.5))
        (payload,) = await finished_runs(h, "nightly", 1)
        assert payload.timestamp == first_pass and payload.timezone == "America/New_York"
        schedule_id = by_task(h, "nightly").id
        assert h.daemon.scheduler.table.next_at[schedule_id] == utc(2026, 11, 2, 6, 30)
    second_pass = utc(2026, 11, 1, 6, 30, 5)
    async with running_daemon(state_dir, clock=clock_at(second_pass)) as h:
        assert h.daemon.scheduler.table.next_at[schedule_id] == utc(2026, 11, 2, 6, 30)
        assert len((await Runs(h.client).list(task="nightly")).data) == 1


async def test_spring_forward_fires_a_skipped_time_after_the_change(state_dir: Path) -> None:
    after_change = utc(2026, 3, 8, 7, 30)  # 02:30 does not exist: 03:30 EDT
    clock = Clock(after_change - timedelta(minutes=10))
    async with running_daemon(state_dir, clock=clock) as h:
        await register_then_jump(h, clock, after_change - timedelta(seconds=0.5))
        (payload,) = await finished_runs(h, "early", 1)
        assert payload.timestamp == after_change
        assert payload.upcoming[0] == utc(2026, 3, 9, 6, 30)


async def test_imperative_schedules(harness: Harness) -> None:
    await harness.register(PROJECT)
    schedules = Schedules(harness.client)
    made = await schedules.create(
        "per-customer",
        "0 8 * * 1",
        timezone="Europe/Paris",
        external_id="customer-42",
        deduplication_key="customer-42-weekly",
    )
    assert made.type == "IMPERATIVE" and made.active and made.external_id == "customer-42"
    assert made.next_run is not None and made.next_run.weekday() == 0
    # The same deduplication key updates the schedule instead of making another.
    again = await schedules.create(
        "per-customer", "0 9 * * 1", timezone="Europe/Paris", deduplication_key="customer-42-weekly"
    )
    assert again.id == made.id and again.cron == "0 9 * * 1"
    assert len((await schedules.list(task="per-customer")).data) == 1
    updated = await schedules.update(made.id, cron="*/5 * * * *", timezone="UTC")
    assert updated.cron == "*/5 * * * *" and updated.timezone == "UTC"
    off = await schedules.deactivate(made.id)
    assert not off.active and off.next_run is None
    on = await schedules.activate(made.id)
    assert on.active and on.next_run is not None
    await schedules.delete(made.id)
    with pytest.raises(NotFound):
        await schedules.retrieve(made.id)


async def test_schedule_requests_are_checked(harness: Harness) -> None:
    await harness.register(PROJECT)
    schedules = Schedules(harness.client)
    with pytest.raises(BadRequest, match="5-field"):
        await schedules.create("per-customer", "every monday")
    with pytest.raises(BadRequest, match="IANA"):
        await schedules.create("per-customer", "0 9 * * *", timezone="Moon/Base")
    with pytest.raises(BadRequest, match="not a scheduled task"):
        await schedules.create("plain", "0 9 * * *")
    with pytest.raises(NotFound, match="scheduled tasks: early, hourly"):
        await schedules.create("nope", "0 9 * * *")
    declared = (await schedules.list(task="hourly")).data[0]
    with pytest.raises(Conflict, match="declared in code"):
        await schedules.delete(declared.id)
    with pytest.raises(Conflict, match="declared in code"):
        await schedules.update(declared.id, cron="0 0 * * *")
    assert not (await schedules.deactivate(declared.id)).active


def test_declaring_a_bad_schedule_fails_at_import() -> None:
    from ember import ConfigError, schedules

    with pytest.raises(ConfigError, match="5-field"):
        schedules.task(id="x", cron="0 9 * *")
    with pytest.raises(ConfigError, match="not dev, staging, prod"):
        schedules.task(id="x", cron="0 9 * * *", environments=["production"])
