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
    from ember._alert_types import AlertChannel, AlertDelivery
    from ember._alerts import Alerts, alerts, verify_signature
    from ember._batch import Batch, Batches, batch
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
        OutsideRunError,
        PayloadTooLarge,
        PayloadValidationError,
        RunFailedError,
        SubtaskUnwrapError,
        TaskNotFoundError,
        Unauthorized,
        WaitOutsideRunError,
    )
    from ember._hooks import (
        CancelParams,
        CatchErrorParams,
        CatchErrorResult,
        CompleteParams,
        FailureParams,
        Local,
        Locals,
        MiddlewareParams,
        StartAttemptParams,
        SuccessParams,
        WaitInfo,
        WaitParams,
        locals,
    )
    from ember._logger import logger
    from ember._metadata import Metadata, metadata
    from ember._queues import Queues, queues
    from ember._realtime_types import RunUpdate
    from ember._retry import heartbeats, retry
    from ember._runs import BatchEntry, ReplayChanges, Runs, Tasks, runs, tasks
    from ember._runtime import Context
    from ember._schedule_types import Schedule, ScheduledPayload, ScheduleList
    from ember._schedules import ScheduledTask, Schedules, schedules
    from ember._streams import Streams, streams
    from ember._task import Queue, Retry, RunHandle, Task, TriggerItem, TriggerKwargs, task
    from ember._types import (
        Attempt,
        BatchInfo,
        BulkAction,
        Debounce,
        ExecutionSnapshot,
        LogEvent,
        LogLine,
        RateLimit,
        Run,
        RunError,
        RunEvent,
        RunsFilter,
        RunStatus,
        RunSummary,
        TokenInfo,
        TriggerOptions,
        WaitToken,
    )
    from ember._wait import TaskRunResult, TokenResult, Wait, idempotency_keys, wait

_EXPORTS: dict[str, str] = {
    "AbortTaskRunError": "ember._errors",
    "AlertChannel": "ember._alert_types",
    "AlertDelivery": "ember._alert_types",
    "Alerts": "ember._alerts",
    "ApiError": "ember._errors",
    "Attempt": "ember._types",
    "BadRequest": "ember._errors",
    "Batch": "ember._batch",
    "BatchInfo": "ember._types",
    "Batches": "ember._batch",
    "BulkAction": "ember._types",
    "BatchEntry": "ember._runs",
    "Call": "ember._client",
    "CancelParams": "ember._hooks",
    "CatchErrorParams": "ember._hooks",
    "CatchErrorResult": "ember._hooks",
    "Client": "ember._client",
    "ClientSettings": "ember._config",
    "CompleteParams": "ember._hooks",
    "ConfigError": "ember._errors",
    "Conflict": "ember._errors",
    "Context": "ember._runtime",
    "DaemonUnavailable": "ember._errors",
    "Debounce": "ember._types",
    "EmberError": "ember._errors",
    "EnvVars": "ember._envvars",
    "ExecutionSnapshot": "ember._types",
    "InsufficientStorage": "ember._errors",
    "FailureParams": "ember._hooks",
    "Local": "ember._hooks",
    "Locals": "ember._hooks",
    "LogEvent": "ember._types",
    "LogLine": "ember._types",
    "Metadata": "ember._metadata",
    "MiddlewareParams": "ember._hooks",
    "NonDeterminismError": "ember._errors",
    "NotFound": "ember._errors",
    "OutsideRunError": "ember._errors",
    "PayloadTooLarge": "ember._errors",
    "PayloadValidationError": "ember._errors",
    "Queue": "ember._task",
    "RateLimit": "ember._types",
    "ReplayChanges": "ember._runs",
    "Retry": "ember._task",
    "Run": "ember._types",
    "RunError": "ember._types",
    "RunEvent": "ember._types",
    "RunFailedError": "ember._errors",
    "RunHandle": "ember._task",
    "RunStatus": "ember._types",
    "RunSummary": "ember._types",
    "RunUpdate": "ember._realtime_types",
    "RunsFilter": "ember._types",
    "Queues": "ember._queues",
    "Runs": "ember._runs",
    "Schedule": "ember._schedule_types",
    "ScheduleList": "ember._schedule_types",
    "ScheduledPayload": "ember._schedule_types",
    "ScheduledTask": "ember._schedules",
    "Schedules": "ember._schedules",
    "StartAttemptParams": "ember._hooks",
    "Streams": "ember._streams",
    "SubtaskUnwrapError": "ember._errors",
    "SuccessParams": "ember._hooks",
    "Task": "ember._task",
    "TaskNotFoundError": "ember._errors",
    "TaskRunResult": "ember._wait",
    "Tasks": "ember._runs",
    "TokenInfo": "ember._types",
    "TokenResult": "ember._wait",
    "TriggerItem": "ember._task",
    "TriggerKwargs": "ember._task",
    "TriggerOptions": "ember._types",
    "Unauthorized": "ember._errors",
    "Wait": "ember._wait",
    "WaitInfo": "ember._hooks",
    "WaitOutsideRunError": "ember._errors",
    "WaitParams": "ember._hooks",
    "WaitToken": "ember._types",
    "alerts": "ember._alerts",
    "batch": "ember._batch",
    "configure": "ember._client",
    "default_client": "ember._client",
    "envvars": "ember._envvars",
    "heartbeats": "ember._retry",
    "idempotency_keys": "ember._wait",
    "locals": "ember._hooks",
    "logger": "ember._logger",
    "metadata": "ember._metadata",
    "queues": "ember._queues",
    "retry": "ember._retry",
    "runs": "ember._runs",
    "schedules": "ember._schedules",
    "streams": "ember._streams",
    "task": "ember._task",
    "tasks": "ember._runs",
    "verify_signature": "ember._alerts",
    "wait": "ember._wait",
}

__all__ = [
    "AbortTaskRunError",
    "AlertChannel",
    "AlertDelivery",
    "Alerts",
    "ApiError",
    "Attempt",
    "BadRequest",
    "Batch",
    "BatchEntry",
    "BatchInfo",
    "Batches",
    "BulkAction",
    "Call",
    "CancelParams",
    "CatchErrorParams",
    "CatchErrorResult",
    "Client",
    "ClientSettings",
    "CompleteParams",
    "ConfigError",
    "Conflict",
    "Context",
    "DaemonUnavailable",
    "Debounce",
    "EmberError",
    "EnvVars",
    "ExecutionSnapshot",
    "FailureParams",
    "InsufficientStorage",
    "Local",
    "Locals",
    "LogEvent",
    "LogLine",
    "Metadata",
    "MiddlewareParams",
    "NonDeterminismError",
    "NotFound",
    "OutsideRunError",
    "PayloadTooLarge",
    "PayloadValidationError",
    "Queue",
    "Queues",
    "RateLimit",
    "ReplayChanges",
    "Retry",
    "Run",
    "RunError",
    "RunEvent",
    "RunFailedError",
    "RunHandle",
    "RunStatus",
    "RunSummary",
    "RunUpdate",
    "Runs",
    "RunsFilter",
    "Schedule",
    "ScheduleList",
    "ScheduledPayload",
    "ScheduledTask",
    "Schedules",
    "StartAttemptParams",
    "Streams",
    "SubtaskUnwrapError",
    "SuccessParams",
    "Task",
    "TaskNotFoundError",
    "TaskRunResult",
    "Tasks",
    "TokenInfo",
    "TokenResult",
    "TriggerItem",
    "TriggerKwargs",
    "TriggerOptions",
    "Unauthorized",
    "Wait",
    "WaitInfo",
    "WaitOutsideRunError",
    "WaitParams",
    "WaitToken",
    "__version__",
    "alerts",
    "batch",
    "configure",
    "default_client",
    "envvars",
    "heartbeats",
    "idempotency_keys",
    "locals",
    "logger",
    "metadata",
    "queues",
    "retry",
    "runs",
    "schedules",
    "streams",
    "task",
    "tasks",
    "verify_signature",
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
