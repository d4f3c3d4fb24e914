"""The schedules API: ``/api/v1/schedules``, as Trigger.dev's ``schedules`` SDK calls it.

Imperative schedules are made, changed and deleted here; declarative ones come from code
(``@schedules.task(cron=...)``) and can only be (de)activated: to change one, change the code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from ember import _cron as cron
from ember._errors import BadRequest, ConfigError, Conflict, NotFound
from ember._schedule_types import (
    CreateScheduleRequest,
    Schedule,
    ScheduleList,
    UpdateScheduleRequest,
)
from ember.daemon.api.routing import RouteSpec, read_body, read_json
from ember.daemon.engine.ids import ulid
from ember.daemon.store.admin import ScheduleRow

if TYPE_CHECKING:
    from ember.daemon.api.host import ApiDaemon

MAX_ID_CHARS = 256


def _check_task(daemon: ApiDaemon, env: str, task_id: str) -> None:
    """Refuse a task that no version of the environment declares as a scheduled task."""
    scheduled: set[str] = set()
    other: set[str] = set()
    for (e, _), record in daemon.engine.versions.items():
        if e == env:
            for task in record.tasks.values():
                (scheduled if task.schedule is not None else other).add(task.id)
    if task_id in scheduled:
        return
    if task_id in other:
        raise BadRequest(
            400, f"task {task_id!r} is not a scheduled task: declare it with @schedules.task"
        )
    known = ", ".join(sorted(scheduled)) or "none"
    raise NotFound(
        404,
        f"task {task_id!r} is not defined in any version of environment {env}; "
        f"scheduled tasks: {known}",
    )


def _check(cron_expr: str, timezone: str, *extra: tuple[str, str | None]) -> None:
    try:
        cron.validate(cron_expr, timezone)
    except ConfigError as exc:
        raise BadRequest(400, str(exc)) from None
    for name, value in extra:
        if value is not None and not 0 < len(value) <= MAX_ID_CHARS:
            raise BadRequest(400, f"{name} must be 1-{MAX_ID_CHARS} characters")


def _row(daemon: ApiDaemon, env: str, schedule_id: str) -> ScheduleRow:
    row = daemon.scheduler.table.rows.get(schedule_id)
    if row is None or row.env != env:
        raise NotFound(404, f"schedule {schedule_id} does not exist in environment {env}")
    return row


def _imperative(row: ScheduleRow) -> None:
    if row.type == "DECLARATIVE":
        raise Conflict(
            409,
            f"schedule {row.id} is declared in code (@schedules.task on {row.task_id}): "
            "change or remove it there",
        )


async def create_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    req: CreateScheduleRequest = read_json(
        await read_body(request, 64 * 1024), CreateScheduleRequest
    )
    _check(
        req.cron,
        req.timezone,
        ("external_id", req.external_id),
        ("deduplication_key", req.deduplication_key),
    )
    _check_task(daemon, env, req.task)
    table = daemon.scheduler.table
    now = daemon.clock()
    row = next(
        (
            r
            for r in table.rows.values()
            if req.deduplication_key is not None
            and r.env == env
            and r.deduplication_key == req.deduplication_key
        ),
        None,
    )
    if row is None:
        row = ScheduleRow(
            id=f"sched_{ulid()}",
            env=env,
            task_id=req.task,
            type="IMPERATIVE",
            cron=req.cron,
            timezone=req.timezone,
            external_id=req.external_id,
            deduplication_key=req.deduplication_key,
            active=True,
            created_at=now,
            updated_at=now,
            armed_at=now,
        )
        await daemon.scheduler.save(row, rearm=True)
    elif (row.task_id, row.cron, row.timezone, row.external_id) != (
        req.task,
        req.cron,
        req.timezone,
        req.external_id,
    ):
        changed = (row.cron, row.timezone) != (req.cron, req.timezone)
        row.task_id, row.cron, row.timezone = req.task, req.cron, req.timezone
        row.external_id, row.updated_at = req.external_id, now
        await daemon.scheduler.save(row, rearm=changed)
    return table.view(row)


async def list_schedules(daemon: ApiDaemon, request: Request, env: str) -> ScheduleList:
    task = request.query_params.get("task") or None
    table = daemon.scheduler.table
    rows = [
        r
        for r in sorted(table.rows.values(), key=lambda r: (r.created_at, r.id))
        if r.env == env and (task is None or r.task_id == task)
    ]
    return ScheduleList(data=[table.view(r) for r in rows])


async def get_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    row = _row(daemon, env, request.path_params["schedule_id"])
    return daemon.scheduler.table.view(row)


async def update_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    req: UpdateScheduleRequest = read_json(
        await read_body(request, 64 * 1024), UpdateScheduleRequest
    )
    row = _row(daemon, env, request.path_params["schedule_id"])
    _imperative(row)
    expr, timezone = req.cron or row.cron, req.timezone or row.timezone
    _check(expr, timezone, ("external_id", req.external_id))
    if req.task is not None:
        _check_task(daemon, env, req.task)
        row.task_id = req.task
    changed = (expr, timezone) != (row.cron, row.timezone)
    row.cron, row.timezone, row.updated_at = expr, timezone, daemon.clock()
    if req.external_id is not None:
        row.external_id = req.external_id
    await daemon.scheduler.save(row, rearm=changed)
    return daemon.scheduler.table.view(row)


async def _set_active(daemon: ApiDaemon, request: Request, env: str, active: bool) -> Schedule:
    row = _row(daemon, env, request.path_params["schedule_id"])
    if row.active != active:
        row.active, row.updated_at = active, daemon.clock()
        # Ticks missed while inactive are not run: counting starts again now.
        await daemon.scheduler.save(row, rearm=active)
    return daemon.scheduler.table.view(row)


async def activate_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    return await _set_active(daemon, request, env, True)


async def deactivate_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    return await _set_active(daemon, request, env, False)


async def delete_schedule(daemon: ApiDaemon, request: Request, env: str) -> Schedule:
    row = _row(daemon, env, request.path_params["schedule_id"])
    _imperative(row)
    view = daemon.scheduler.table.view(row)
    await daemon.scheduler.delete(row.id)
    return view


_ONE = "/api/v1/schedules/{schedule_id}"

SCHEDULE_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "POST",
        "/api/v1/schedules",
        create_schedule,
        "Create a schedule (or update the one holding its deduplication key)",
        request=CreateScheduleRequest,
        response=Schedule,
    ),
    RouteSpec(
        "GET",
        "/api/v1/schedules",
        list_schedules,
        "Schedules of the environment",
        response=ScheduleList,
        query=(("task", "only the schedules of this task"),),
    ),
    RouteSpec("GET", _ONE, get_schedule, "Retrieve a schedule", response=Schedule),
    RouteSpec(
        "PUT",
        _ONE,
        update_schedule,
        "Change an imperative schedule",
        request=UpdateScheduleRequest,
        response=Schedule,
    ),
    RouteSpec(
        "POST", _ONE + "/activate", activate_schedule, "Activate a schedule", response=Schedule
    ),
    RouteSpec(
        "POST",
        _ONE + "/deactivate",
        deactivate_schedule,
        "Deactivate a schedule",
        response=Schedule,
    ),
    RouteSpec("DELETE", _ONE, delete_schedule, "Delete an imperative schedule", response=Schedule),
)
