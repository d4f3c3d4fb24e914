"""Ember: durable background tasks for Python on one machine.

Write tasks as decorated functions, trigger them from any process over the daemon's local
socket, and let the daemon queue, run, retry and record them::

    from ember import task, logger

    @task(id="send-welcome")
    async def send_welcome(user: User) -> None:
        logger.info("sending", user=user.id)

    handle = await send_welcome.trigger(User(id=1))

Importing ``ember`` is cheap: names load on first use, and nothing of the daemon, the TUI
or the HTTP server is imported by user code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ember._client import Call, Client, configure, default_client
    from ember._config import ClientSettings
    from ember._envvars import EnvVars, envvars
    from ember._errors import (
        AbortTaskRunError,
        ApiError,
        BadRequest,
        ConfigError,
        Conflict,
        DaemonUnavailable,
        EmberError,
        InsufficientStorage,
        NonDeterminismError,
        NotFound,
        PayloadTooLarge,
        PayloadValidationError,
        RunFailedError,
        SubtaskUnwrapError,
        TaskNotFoundError,
        Unauthorized,
        WaitOutsideRunError,
    )
    from ember._logger import logger
    from ember._runs import Runs, Tasks, runs, tasks
    from ember._runtime import Context
    from ember._schedule_types import Schedule, ScheduledPayload, ScheduleList
    from ember._schedules import ScheduledTask, Schedules, schedules
    from ember._task import Queue, Retry, RunHandle, Task, TriggerItem, task
    from ember._types import (
        Attempt,
        ExecutionSnapshot,
        LogEvent,
        LogLine,
        Run,
        RunError,
        RunEvent,
        RunStatus,
        RunSummary,
        TokenInfo,
        TriggerOptions,
        WaitToken,
    )
    from ember._wait import TaskRunResult, TokenResult, Wait, idempotency_keys, wait

_EXPORTS: dict[str, str] = {
    "AbortTaskRunError": "ember._errors",
    "ApiError": "ember._errors",
    "Attempt": "ember._types",
    "BadRequest": "ember._errors",
    "Call": "ember._client",
    "Client": "ember._client",
    "ClientSettings": "ember._config",
    "ConfigError": "ember._errors",
    "Conflict": "ember._errors",
    "Context": "ember._runtime",
    "DaemonUnavailable": "ember._errors",
    "EmberError": "ember._errors",
    "EnvVars": "ember._envvars",
    "ExecutionSnapshot": "ember._types",
    "InsufficientStorage": "ember._errors",
    "LogEvent": "ember._types",
    "LogLine": "ember._types",
    "NonDeterminismError": "ember._errors",
    "NotFound": "ember._errors",
    "PayloadTooLarge": "ember._errors",
    "PayloadValidationError": "ember._errors",
    "Queue": "ember._task",
    "Retry": "ember._task",
    "Run": "ember._types",
    "RunError": "ember._types",
    "RunEvent": "ember._types",
    "RunFailedError": "ember._errors",
    "RunHandle": "ember._task",
    "RunStatus": "ember._types",
    "RunSummary": "ember._types",
    "Runs": "ember._runs",
    "Schedule": "ember._schedule_types",
    "ScheduleList": "ember._schedule_types",
    "ScheduledPayload": "ember._schedule_types",
    "ScheduledTask": "ember._schedules",
    "Schedules": "ember._schedules",
    "SubtaskUnwrapError": "ember._errors",
    "Task": "ember._task",
    "TaskNotFoundError": "ember._errors",
    "TaskRunResult": "ember._wait",
    "Tasks": "ember._runs",
    "TokenInfo": "ember._types",
    "TokenResult": "ember._wait",
    "TriggerItem": "ember._task",
    "TriggerOptions": "ember._types",
    "Unauthorized": "ember._errors",
    "Wait": "ember._wait",
    "WaitOutsideRunError": "ember._errors",
    "WaitToken": "ember._types",
    "configure": "ember._client",
    "default_client": "ember._client",
    "envvars": "ember._envvars",
    "idempotency_keys": "ember._wait",
    "logger": "ember._logger",
    "runs": "ember._runs",
    "schedules": "ember._schedules",
    "task": "ember._task",
    "tasks": "ember._runs",
    "wait": "ember._wait",
}

__all__ = [
    "AbortTaskRunError",
    "ApiError",
    "Attempt",
    "BadRequest",
    "Call",
    "Client",
    "ClientSettings",
    "ConfigError",
    "Conflict",
    "Context",
    "DaemonUnavailable",
    "EmberError",
    "EnvVars",
    "ExecutionSnapshot",
    "InsufficientStorage",
    "LogEvent",
    "LogLine",
    "NonDeterminismError",
    "NotFound",
    "PayloadTooLarge",
    "PayloadValidationError",
    "Queue",
    "Retry",
    "Run",
    "RunError",
    "RunEvent",
    "RunFailedError",
    "RunHandle",
    "RunStatus",
    "RunSummary",
    "Runs",
    "Schedule",
    "ScheduleList",
    "ScheduledPayload",
    "ScheduledTask",
    "Schedules",
    "SubtaskUnwrapError",
    "Task",
    "TaskNotFoundError",
    "TaskRunResult",
    "Tasks",
    "TokenInfo",
    "TokenResult",
    "TriggerItem",
    "TriggerOptions",
    "Unauthorized",
    "Wait",
    "WaitOutsideRunError",
    "WaitToken",
    "__version__",
    "configure",
    "default_client",
    "envvars",
    "idempotency_keys",
    "logger",
    "runs",
    "schedules",
    "task",
    "tasks",
    "wait",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
