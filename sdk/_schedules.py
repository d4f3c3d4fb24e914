"""Scheduled tasks and cron schedules: ``from ember import schedules``.

Declare a task that runs on a cron schedule; the schedule is synced to the daemon whenever
a version with it becomes current (`ember dev`, `ember deploy`)::

    @schedules.task(id="daily-report", cron="0 9 * * *", timezone="America/New_York")
    async def daily_report(payload: ScheduledPayload) -> None:
        logger.info("report for", day=payload.timestamp.date())

Or attach schedules at run time (one per customer, say) to a scheduled task declared
without ``cron``::

    await schedules.create(task=daily_report, cron="0 8 * * 1", timezone="Europe/Paris",
                           external_id="customer-42", deduplication_key="customer-42-weekly")

Each call has a blocking twin with the ``_sync`` suffix.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

import msgspec

from ember._client import Call, Client, default_client
from ember._errors import ConfigError
from ember._schedule_types import (
    CreateScheduleRequest,
    Schedule,
    ScheduledPayload,
    ScheduleList,
    UpdateScheduleRequest,
)
from ember._task import Queue, Task
from ember._types import RetryOptions, TaskSchedule

P = ParamSpec("P")
R = TypeVar("R")

_encoder = msgspec.json.Encoder()
_KINDS = ("dev", "staging", "prod", "preview")


class ScheduledTask(Task[ScheduledPayload, P, R]):
    """A task that cron schedules trigger, with a :class:`ScheduledPayload` at each tick.

    Attributes:
        schedule: the schedule declared in code (its ``cron`` is None when only imperative
            schedules trigger the task).
    """

    schedule: TaskSchedule


def _declared(cron: str | None, timezone: str, environments: Iterable[str]) -> TaskSchedule:
    envs = list(environments)
    for env in envs:
        if env not in _KINDS and not env.startswith("preview/"):
            raise ConfigError(
                f"schedule environments: {env!r} is not dev, staging, prod, preview or "
                "preview/<branch>"
            )
    # croniter loads only in processes that declare a schedule, not on `import ember`.
    from ember._cron import validate, zone

    if cron is not None:
        validate(cron, timezone)
    else:
        zone(timezone)
    return TaskSchedule(cron=cron, timezone=timezone, environments=envs)


class ScheduledTaskDecorator(Protocol):
    """What ``@schedules.task(...)`` returns: it turns a function into a scheduled task."""

    @overload
    def __call__(
        self, fn: Callable[Concatenate[ScheduledPayload, P], Coroutine[Any, Any, R]]
    ) -> ScheduledTask[P, R]: ...
    @overload
    def __call__(
        self, fn: Callable[Concatenate[ScheduledPayload, P], R]
    ) -> ScheduledTask[P, R]: ...


def _task_id(task: str | Task[Any, Any, Any]) -> str:
    return task if isinstance(task, str) else task.id


class Schedules:
    """Scheduled tasks and the schedules of the client's environment."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    def task(
        self,
        *,
        id: str | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        environments: Iterable[str] = (),
        retry: RetryOptions | None = None,
        queue: Queue | None = None,
        max_duration_s: float | None = None,
        ttl: float | str | None = None,
        machine: str | None = None,
        description: str = "",
    ) -> ScheduledTaskDecorator:
        """Declare a scheduled task; its function takes a :class:`ScheduledPayload`.

        Args:
            id: unique task id; the function's name with ``-`` for ``_`` when omitted.
            cron: a 5-field cron expression (``"0 9 * * *"``); None for a task that only
                imperative schedules (:meth:`create`) trigger.
            timezone: the IANA timezone the expression is read in, DST included.
            environments: where the declared schedule runs (``dev``, ``staging``, ``prod``,
                ``preview`` or ``preview/<branch>``); everywhere when empty.
            retry, queue, max_duration_s, ttl, machine, description: as for ``@task``.

        Raises:
            ConfigError: the expression, timezone or an environment is invalid (at import,
                so a bad schedule fails the version's build with this message).
        """
        declared = _declared(cron, timezone, environments)

        def wrap(fn: Callable[..., Any]) -> ScheduledTask[Any, Any]:
            scheduled: ScheduledTask[Any, Any] = ScheduledTask(
                fn,
                id=id or fn.__name__.replace("_", "-"),
                retry=retry or RetryOptions(),
                queue=queue,
                max_duration_s=max_duration_s,
                ttl=ttl,
                machine=machine,
                description=description,
            )
            scheduled.schedule = declared
            if scheduled.payload_type is None and scheduled.takes_payload:
                scheduled.payload_type = ScheduledPayload
            return scheduled

        return wrap

    # -- calls --------------------------------------------------------------------------

    def _create(
        self,
        task: str | Task[Any, Any, Any],
        cron: str,
        timezone: str,
        external_id: str | None,
        deduplication_key: str | None,
    ) -> Call[Schedule]:
        body = CreateScheduleRequest(
            task=_task_id(task),
            cron=cron,
            timezone=timezone,
            external_id=external_id,
            deduplication_key=deduplication_key,
        )
        return Call("POST", "/api/v1/schedules", Schedule, body=_encoder.encode(body))

    def _list(self, task: str | Task[Any, Any, Any] | None) -> Call[ScheduleList]:
        params = {"task": _task_id(task) if task is not None else None}
        return Call("GET", "/api/v1/schedules", ScheduleList, params=params)

    def _one(self, method: str, schedule_id: str, action: str = "") -> Call[Schedule]:
        suffix = f"/{action}" if action else ""
        body = b"{}" if method == "POST" else None
        return Call(method, f"/api/v1/schedules/{schedule_id}{suffix}", Schedule, body=body)

    def _update(self, schedule_id: str, changes: dict[str, Any]) -> Call[Schedule]:
        if isinstance(changes.get("task"), Task):
            changes["task"] = changes["task"].id
        body = _encoder.encode(UpdateScheduleRequest(**changes))
        return Call("PUT", f"/api/v1/schedules/{schedule_id}", Schedule, body=body)

    # -- async --------------------------------------------------------------------------

    async def create(
        self,
        task: str | Task[Any, Any, Any],
        cron: str,
        *,
        timezone: str = "UTC",
        external_id: str | None = None,
        deduplication_key: str | None = None,
    ) -> Schedule:
        """Attach a cron schedule to a scheduled task; with a ``deduplication_key`` that a
        schedule already holds, that schedule is updated instead."""
        call = self._create(task, cron, timezone, external_id, deduplication_key)
        return await self.client.request(call)

    async def list(self, *, task: str | Task[Any, Any, Any] | None = None) -> ScheduleList:
        """The environment's schedules, declarative and imperative, oldest first."""
        return await self.client.request(self._list(task))

    async def retrieve(self, schedule_id: str) -> Schedule:
        """One schedule, with its next and last run."""
        return await self.client.request(self._one("GET", schedule_id))

    async def update(self, schedule_id: str, **changes: Any) -> Schedule:
        """Change an imperative schedule's ``task``, ``cron``, ``timezone`` or ``external_id``."""
        return await self.client.request(self._update(schedule_id, changes))

    async def activate(self, schedule_id: str) -> Schedule:
        """Fire the schedule again (ticks missed while inactive are not run)."""
        return await self.client.request(self._one("POST", schedule_id, "activate"))

    async def deactivate(self, schedule_id: str) -> Schedule:
        """Stop firing the schedule until it is activated."""
        return await self.client.request(self._one("POST", schedule_id, "deactivate"))

    async def delete(self, schedule_id: str) -> Schedule:
        """Delete an imperative schedule (declarative ones go with their code)."""
        return await self.client.request(self._one("DELETE", schedule_id))

    # -- blocking twins -----------------------------------------------------------------

    def create_sync(
        self,
        task: str | Task[Any, Any, Any],
        cron: str,
        *,
        timezone: str = "UTC",
        external_id: str | None = None,
        deduplication_key: str | None = None,
    ) -> Schedule:
        """Blocking twin of :meth:`create`."""
        call = self._create(task, cron, timezone, external_id, deduplication_key)
        return self.client.request_sync(call)

    def list_sync(self, *, task: str | Task[Any, Any, Any] | None = None) -> ScheduleList:
        """Blocking twin of :meth:`list`."""
        return self.client.request_sync(self._list(task))

    def retrieve_sync(self, schedule_id: str) -> Schedule:
        """Blocking twin of :meth:`retrieve`."""
        return self.client.request_sync(self._one("GET", schedule_id))

    def update_sync(self, schedule_id: str, **changes: Any) -> Schedule:
        """Blocking twin of :meth:`update`."""
        return self.client.request_sync(self._update(schedule_id, changes))

    def activate_sync(self, schedule_id: str) -> Schedule:
        """Blocking twin of :meth:`activate`."""
        return self.client.request_sync(self._one("POST", schedule_id, "activate"))

    def deactivate_sync(self, schedule_id: str) -> Schedule:
        """Blocking twin of :meth:`deactivate`."""
        return self.client.request_sync(self._one("POST", schedule_id, "deactivate"))

    def delete_sync(self, schedule_id: str) -> Schedule:
        """Blocking twin of :meth:`delete`."""
        return self.client.request_sync(self._one("DELETE", schedule_id))


schedules = Schedules()
