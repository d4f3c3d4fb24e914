"""The scheduler: cron schedules that trigger runs, each tick exactly once.

Schedules live in the ``schedules`` table and in memory; one loop sleeps until the earliest
next tick (at most a minute, so clock changes are noticed) and fires what is due through
:meth:`Engine.trigger`, with the idempotency key ``<schedule id>:<tick in UTC>``.

Exactly once: before firing, the scheduler looks for a run created with that key (the
``runs`` table is the truth, also for a run that failed and freed its key), and after firing
it records the tick as the schedule's last. A restart between the two finds the run and
does not fire again.

Missed ticks: a tick that passed while the daemon was down (or asleep) fires once at start,
and only the latest such tick: a daily report down for a week runs once, for the last day,
not seven times. Ticks count from the schedule's creation, activation or last change.

Declarative schedules (``@schedules.task(cron=...)``) are synced from the tasks of the
version that becomes current in an environment: created, changed, or deleted with their
task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ember import _cron as cron
from ember._errors import EmberError
from ember._schedule_types import Schedule, ScheduledPayload
from ember._types import BatchItem, TaskInfo, TriggerOptions
from ember.daemon.store import admin as admin
from ember.daemon.store.admin import ScheduleRow
from ember.daemon.store.db import Database
from ember.daemon.store.runs import opt_ts, ts

if TYPE_CHECKING:
    from ember.daemon.engine.core import Engine

log = logging.getLogger("ember.daemon")

# The loop wakes at least this often, so a wall-clock jump is noticed within it.
_MAX_SLEEP_S = 60.0
_encoder = msgspec.json.Encoder()


def applies_to(environments: Iterable[str], env: str) -> bool:
    """Whether a declared schedule's ``environments`` include ``env`` (all when empty)."""
    names = list(environments)
    return not names or env in names or env.split("/", 1)[0] in names


def _at(epoch: float) -> datetime:
    return ts(epoch)


class ScheduleTable:
    """Schedules in memory with their next tick, mirrored to the table by the scheduler."""

    def __init__(self) -> None:
        self.rows: dict[str, ScheduleRow] = {}
        self.next_at: dict[str, datetime] = {}

    def arm(self, row: ScheduleRow) -> None:
        """Compute the next tick of a schedule after its last tick or its arming."""
        self.rows[row.id] = row
        self.next_at.pop(row.id, None)
        if row.active:
            floor = max(row.armed_at, row.last_tick_at or 0.0)
            self.next_at[row.id] = cron.next_after(row.cron, row.timezone, _at(floor))

    def drop(self, schedule_id: str) -> None:
        """Forget a schedule."""
        self.rows.pop(schedule_id, None)
        self.next_at.pop(schedule_id, None)

    def view(self, row: ScheduleRow) -> Schedule:
        """A schedule as the API shows it."""
        return Schedule(
            id=row.id,
            task=row.task_id,
            type="DECLARATIVE" if row.type == "DECLARATIVE" else "IMPERATIVE",
            cron=row.cron,
            timezone=row.timezone,
            active=row.active,
            env=row.env,
            created_at=ts(row.created_at),
            updated_at=ts(row.updated_at),
            external_id=row.external_id,
            deduplication_key=row.deduplication_key,
            next_run=self.next_at.get(row.id),
            last_run=opt_ts(row.last_tick_at),
        )


class Scheduler:
    """Fires schedules' ticks as runs.

    Args:
        db: the state database.
        engine: triggers the runs.
        clock: wall-clock seconds (injectable, so tests can stand just before a tick).
    """

    def __init__(self, db: Database, engine: Engine, clock: Callable[[], float]) -> None:
        self.db = db
        self.engine = engine
        self.clock = clock
        self.table = ScheduleTable()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the schedules and start firing them (a missed tick fires once now)."""
        for row in await self.db.read(admin.load_schedules):
            self.table.arm(row)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop firing."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def changed(self) -> None:
        """Schedules changed: recompute when to wake."""
        self._wake.set()

    async def save(self, row: ScheduleRow, *, rearm: bool) -> None:
        """Write a schedule and take it into account (``rearm``: ticks count from now)."""
        if rearm:
            row.armed_at = self.clock()
        await self.db.write(lambda conn: admin.save_schedule(conn, row))
        self.table.arm(row)
        self.changed()

    async def delete(self, schedule_id: str) -> None:
        """Remove a schedule."""
        await self.db.write(lambda conn: admin.delete_schedule(conn, schedule_id))
        self.table.drop(schedule_id)
        self.changed()

    # -- firing -------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            now = _at(self.clock())
            for schedule_id, due in sorted(self.table.next_at.items(), key=lambda i: i[1]):
                if due > now:
                    break
                row = self.table.rows.get(schedule_id)
                if row is None or self.table.next_at.get(schedule_id) != due:
                    continue  # deleted or moved while an earlier schedule fired
                try:
                    await self._fire(row, now)
                except Exception:  # one bad schedule must not stop the others
                    log.exception("schedule %s failed to fire", schedule_id)
                    self.table.next_at[schedule_id] = cron.next_after(row.cron, row.timezone, now)
            self._wake.clear()
            pending = self.table.next_at.values()
            sleep_s = _MAX_SLEEP_S
            if pending:
                sleep_s = min(sleep_s, (min(pending) - _at(self.clock())).total_seconds())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, sleep_s)):
                    await self._wake.wait()

    async def _fire(self, row: ScheduleRow, now: datetime) -> None:
        """Trigger the latest due tick of a schedule (earlier missed ones are not run)."""
        tick = cron.latest_at_or_before(row.cron, row.timezone, now)
        key = f"{row.id}:{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        done = await self.db.read(lambda conn: admin.run_with_key(conn, row.env, row.task_id, key))
        if done is None:
            payload = ScheduledPayload(
                type="DECLARATIVE" if row.type == "DECLARATIVE" else "IMPERATIVE",
                timestamp=tick,
                schedule_id=row.id,
                timezone=row.timezone,
                last_timestamp=opt_ts(row.last_tick_at),
                external_id=row.external_id,
                upcoming=cron.upcoming(row.cron, row.timezone, tick),
            )
            item = BatchItem(
                task=row.task_id,
                payload=msgspec.Raw(_encoder.encode(payload)),
                options=TriggerOptions(idempotency_key=key),
            )
            try:
                await self.engine.trigger(row.env, [item])
            except EmberError as exc:  # e.g. no version of the environment has the task
                log.warning("schedule %s could not trigger %s: %s", row.id, row.task_id, exc)
        row.last_tick_at = tick.timestamp()
        await self.db.write(lambda conn: admin.set_last_tick(conn, row.id, tick.timestamp()))
        if self.table.rows.get(row.id) is row:  # unless deleted or replaced meanwhile
            self.table.arm(row)

    # -- declarative schedules ----------------------------------------------------------

    async def sync_declared(self, env: str, tasks: Iterable[TaskInfo]) -> None:
        """Make the environment's declarative schedules match its current version's tasks."""
        from ember.daemon.engine.ids import ulid

        declared = {
            t.id: (t.schedule.cron, t.schedule.timezone)
            for t in tasks
            if t.schedule is not None
            and t.schedule.cron is not None
            and applies_to(t.schedule.environments, env)
        }
        existing = {
            row.task_id: row
            for row in self.table.rows.values()
            if row.env == env and row.type == "DECLARATIVE"
        }
        now = self.clock()
        for task_id, row in existing.items():
            if task_id not in declared:
                await self.delete(row.id)
        for task_id, (expr, timezone) in declared.items():
            row = existing.get(task_id) or ScheduleRow(
                id=f"sched_{ulid()}",
                env=env,
                task_id=task_id,
                type="DECLARATIVE",
                cron="",
                timezone="",
                external_id=None,
                deduplication_key=None,
                active=True,
                created_at=now,
                updated_at=now,
                armed_at=now,
            )
            if (row.cron, row.timezone) == (expr, timezone):
                continue
            row.cron, row.timezone, row.updated_at = expr, timezone, now
            await self.save(row, rearm=True)
