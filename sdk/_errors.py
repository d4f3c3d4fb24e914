"""Every error Ember raises derives from one root.

    EmberError
    ├── ConfigError                 bad configuration or project layout
    ├── DaemonUnavailable           no daemon answers on the socket or URL
    ├── ApiError                    the daemon refused a request (carries the HTTP status)
    │   ├── BadRequest              400/422: a field is wrong; the message names it
    │   ├── Unauthorized            401/403: missing or wrong API key
    │   ├── NotFound                404: unknown run, task or version
    │   ├── Conflict                409: the run is not in a state that allows the action
    │   ├── PayloadTooLarge         413: payload or output over the configured limit
    │   └── InsufficientStorage     507: the daemon's disk is full or nearly so
    ├── PayloadValidationError      the payload does not match the task's annotation
    ├── RunFailedError              a waited-for run ended without output
    ├── TaskNotFoundError           a task id is not known to this process's registry
    ├── SubtaskUnwrapError          ``TaskRunResult.unwrap()`` of a child that failed
    ├── NonDeterminismError         a replayed run took another path than its journal
    ├── WaitOutsideRunError         a durable wait was called outside a task run
    └── AbortTaskRunError           raised inside a task: fail now, never retry

Control flow that user code must not swallow derives from BaseException instead
(see ``ember._runtime``).
"""

from __future__ import annotations

from typing import Any


class EmberError(Exception):
    """Root of every error Ember raises."""


class ConfigError(EmberError):
    """The configuration, environment or project layout is wrong."""


class DaemonUnavailable(EmberError):
    """No Ember daemon answered at the configured address."""


class ApiError(EmberError):
    """The daemon answered with an error.

    Attributes:
        status: the HTTP status code.
        detail: the daemon's message, which names the problem and the fix.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BadRequest(ApiError):
    """The request was malformed; the message names the field."""


class Unauthorized(ApiError):
    """The API key is missing, unknown or revoked."""


class NotFound(ApiError):
    """The run, task or version does not exist."""


class Conflict(ApiError):
    """The action does not apply to the run in its current state."""


class PayloadTooLarge(ApiError):
    """The payload is over the daemon's size limit."""


class InsufficientStorage(ApiError):
    """The daemon could not write, or would not: its disk is full or under the free-space floor.

    Nothing of the request was written; it can be sent again once space is freed.
    """


class PayloadValidationError(EmberError):
    """The payload does not match the task's declared payload type."""


class TaskNotFoundError(EmberError):
    """A task id is not known where it was looked up."""


class RunFailedError(EmberError):
    """A run that was waited for finished without output.

    Attributes:
        run_id: the run's id.
        status: its final status (FAILED, CRASHED, CANCELED, ...).
        error: the error the run recorded, if any.
    """

    def __init__(self, run_id: str, status: str, error: Any = None) -> None:
        message = f"run {run_id} ended {status}"
        if error is not None:
            name = getattr(error, "name", None) or "Error"
            message += f": {name}: {getattr(error, 'message', error)}"
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.error = error


class SubtaskUnwrapError(EmberError):
    """A child run waited for with ``trigger_and_wait`` did not complete.

    Attributes:
        run_id: the child's run id.
        task_id: the child's task.
        cause: the child's error.
    """

    def __init__(self, run_id: str, task_id: str, cause: Any) -> None:
        name = getattr(cause, "name", "Error")
        message = getattr(cause, "message", str(cause))
        super().__init__(f"child run {run_id} of task {task_id!r} failed: {name}: {message}")
        self.run_id = run_id
        self.task_id = task_id
        self.cause = cause


class NonDeterminismError(EmberError):
    """A run re-executed from its journal reached a wait that differs from the recorded one.

    Code before a wait must take the same path on every execution: read the clock, random
    numbers and external state inside child tasks, whose results are journaled.
    """


class WaitOutsideRunError(EmberError):
    """A durable wait (``wait.for_``, ``trigger_and_wait``...) was called outside a task run."""


class AbortTaskRunError(EmberError):
    """Raise inside a task to fail the run at once, skipping any remaining retries."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: BadRequest,
    507: InsufficientStorage,
}


def api_error(status: int, detail: str) -> ApiError:
    """Return the ApiError subclass instance that matches an HTTP status."""
    return _BY_STATUS.get(status, ApiError)(status, detail)
