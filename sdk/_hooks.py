"""Lifecycle hooks, middleware and attempt locals, with Trigger.dev's semantics.

Per task, pass hooks to ``@task(on_success=..., middleware=[...])``; for every task, register
them with ``tasks.on_success(fn)``, ``tasks.middleware("db", fn)`` ... in the task directory's
``init.py``, which the zygote imports before any task module. Global hooks run before the
task's own (``catch_error`` after: the task's own decides first). Every hook takes one
params object and may be ``def`` or ``async def``.

- ``on_start_attempt``: before each attempt's run function; an error fails the attempt.
- ``on_success`` / ``on_failure`` / ``on_complete``: after the run function. ``on_failure``
  and ``on_complete`` (with an error) fire once the run will not be retried, never for
  crashed, system-failed or canceled runs. Their errors are logged with the run and ignored.
- ``on_wait`` / ``on_resume``: around each durable wait, once per wait (a re-execution that
  reads the wait from its journal does not fire them again).
- ``on_cancel``: the run is canceled while it executes; the run function still runs while
  the hooks do, then is canceled (its ``finally`` blocks run); both share most of the
  daemon's ``cancel_grace_s`` before the process is killed (``params.grace_s``).
- ``catch_error``: decides about an error: :class:`CatchErrorResult` to retry at a time,
  after a delay or not at all; ``None`` keeps the retry policy.
- middleware wraps the hooks and the run: ``await params.next()`` runs the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, overload

from ember._errors import OutsideRunError
from ember._runtime import Context

T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Any])

WaitKind = Literal["duration", "run", "batch", "token"]


@dataclass(frozen=True, slots=True)
class StartAttemptParams:
    """What ``on_start_attempt`` receives."""

    ctx: Context
    payload: Any


@dataclass(frozen=True, slots=True)
class SuccessParams:
    """What ``on_success`` receives: the run function's output."""

    ctx: Context
    payload: Any
    output: Any


@dataclass(frozen=True, slots=True)
class FailureParams:
    """What ``on_failure`` receives: the error that ended the run."""

    ctx: Context
    payload: Any
    error: BaseException


@dataclass(frozen=True, slots=True)
class CompleteParams:
    """What ``on_complete`` receives: ``ok`` with the output, or the error."""

    ctx: Context
    payload: Any
    ok: bool
    output: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class WaitInfo:
    """One durable wait of a run.

    Attributes:
        kind: ``duration`` (``wait.for_``/``until``), ``run``, ``batch`` or ``token``.
        seq: its number among the run's waits.
        resume_at: when a duration wait ends (epoch seconds).
        targets: the awaited run ids or token id.
    """

    kind: WaitKind
    seq: int
    resume_at: float | None = None
    targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WaitParams:
    """What ``on_wait`` and ``on_resume`` receive."""

    ctx: Context
    payload: Any
    wait: WaitInfo


@dataclass(frozen=True, slots=True)
class CancelParams:
    """What ``on_cancel`` receives.

    Attributes:
        run: the run function's task, still running; it is canceled after the hooks.
        grace_s: how long the hooks and then the run's own cleanup have, together, before
            the process is killed (most of the daemon's ``cancel_grace_s``).
    """

    ctx: Context
    payload: Any
    run: Awaitable[Any]
    grace_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CatchErrorParams:
    """What ``catch_error`` receives.

    Attributes:
        error: what the attempt raised.
        retry_delay_s: the delay the retry policy would use, or None when the run would
            not be retried (no attempts left, or the error is not retryable).
    """

    ctx: Context
    payload: Any
    error: BaseException
    retry_delay_s: float | None


@dataclass(frozen=True, slots=True)
class CatchErrorResult:
    """What ``catch_error`` may return: retry at a time, after a delay, or skip retrying.

    Retries still count against the run's attempts.
    """

    retry_at: datetime | None = None
    retry_delay_s: float | None = None
    skip_retrying: bool = False


@dataclass(frozen=True, slots=True)
class MiddlewareParams:
    """What middleware receives; ``await params.next()`` runs the hooks and the run."""

    ctx: Context
    payload: Any
    task_id: str
    next: Callable[[], Awaitable[None]]


Hook = Callable[[Any], Any]
"""A hook or middleware function: one params object in, a value or awaitable out."""


@dataclass(slots=True)
class Hooks:
    """The hooks and middleware of one task, or the global ones (``tasks.on_*``)."""

    on_start_attempt: list[Hook] = field(default_factory=list)
    on_success: list[Hook] = field(default_factory=list)
    on_failure: list[Hook] = field(default_factory=list)
    on_complete: list[Hook] = field(default_factory=list)
    on_wait: list[Hook] = field(default_factory=list)
    on_resume: list[Hook] = field(default_factory=list)
    on_cancel: list[Hook] = field(default_factory=list)
    catch_error: list[Hook] = field(default_factory=list)
    middleware: list[tuple[str, Hook]] = field(default_factory=list)

    def __add__(self, other: Hooks) -> Hooks:
        """These hooks first, then ``other``'s (global hooks, then a task's).

        Except ``catch_error``: ``other``'s decide first, so a task's own hook has the first
        word and the global ones handle what it leaves alone.
        """
        combined = Hooks(
            **{name: getattr(self, name) + getattr(other, name) for name in _HOOK_NAMES},
            middleware=self.middleware + other.middleware,
        )
        combined.catch_error = other.catch_error + self.catch_error
        return combined


_HOOK_NAMES = (
    "on_start_attempt",
    "on_success",
    "on_failure",
    "on_complete",
    "on_wait",
    "on_resume",
    "on_cancel",
)


def task_hooks(middleware: Sequence[Hook | tuple[str, Hook]], **hooks: Hook | None) -> Hooks:
    """The :class:`Hooks` of a task from ``@task``'s keyword arguments."""
    result = Hooks()
    for name, fn in hooks.items():
        if fn is not None:
            getattr(result, name).append(fn)
    for entry in middleware:
        name, fn = entry if isinstance(entry, tuple) else (getattr(entry, "__name__", "?"), entry)
        result.middleware.append((name, fn))
    return result


async def call_hook(fn: Hook, params: Any) -> Any:
    """Call a ``def`` or ``async def`` hook and return what it returned."""
    result = fn(params)
    if inspect.isawaitable(result):
        return await result
    return result


class Local(Generic[T]):
    """A key for a value that lives for one attempt: ``DB = locals.create("db", Database)``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Local({self.name!r})"


_attempt_locals: ContextVar[dict[Local[Any], Any] | None] = ContextVar(
    "ember_attempt_locals", default=None
)


def begin_attempt_locals() -> object:
    """Give the attempt starting now its own, empty locals; returns a reset token."""
    return _attempt_locals.set({})


def end_attempt_locals(token: object) -> None:
    """Drop the attempt's locals."""
    _attempt_locals.reset(token)  # type: ignore[arg-type]


class Locals:
    """``from ember import locals``: typed values for one attempt (a database connection).

    Middleware typically sets them before ``next()`` and the run function reads them; each
    attempt starts with none.
    """

    @overload
    def create(self, name: str) -> Local[Any]: ...
    @overload
    def create(self, name: str, type: type[T]) -> Local[T]: ...
    def create(self, name: str, type: Any = None) -> Local[Any]:
        """A new key; ``type`` only types what ``get`` returns."""
        return Local(name)

    def _store(self, what: str) -> dict[Local[Any], Any]:
        store = _attempt_locals.get()
        if store is None:
            raise OutsideRunError(
                f"locals.{what} only works inside a task run (in middleware, hooks or the "
                "run function), where each attempt has its own values"
            )
        return store

    def get(self, key: Local[T]) -> T | None:
        """The value this attempt set for ``key``, or None."""
        value: T | None = self._store("get").get(key)
        return value

    def get_or_throw(self, key: Local[T]) -> T:
        """The value this attempt set for ``key``.

        Raises:
            LookupError: nothing was set for it in this attempt.
        """
        store = self._store("get_or_throw")
        if key not in store:
            raise LookupError(f"local {key.name!r} is not set in this attempt: set it first")
        value: T = store[key]
        return value

    def set(self, key: Local[T], value: T) -> T:
        """Set ``key`` for the rest of this attempt; returns the value."""
        self._store("set")[key] = value
        return value


locals = Locals()

global_hooks = Hooks()
"""Hooks for every task, registered through ``tasks.on_*`` (usually in ``init.py``).

A process-wide registry, as Trigger.dev's ``tasks.onSuccess`` is: the zygote imports the init
module and the task modules once, and every run process it forks reads the same registry.
"""


class GlobalHookRegistry:
    """The ``tasks.on_*`` and ``tasks.middleware`` methods; each returns the function."""

    def _add(self, name: str, fn: H) -> H:
        getattr(global_hooks, name).append(fn)
        return fn

    def on_start_attempt(self, fn: H) -> H:
        """Run ``fn(StartAttemptParams)`` before every attempt of every task."""
        return self._add("on_start_attempt", fn)

    def on_success(self, fn: H) -> H:
        """Run ``fn(SuccessParams)`` after every successful run."""
        return self._add("on_success", fn)

    def on_failure(self, fn: H) -> H:
        """Run ``fn(FailureParams)`` after every run that failed for good."""
        return self._add("on_failure", fn)

    def on_complete(self, fn: H) -> H:
        """Run ``fn(CompleteParams)`` after every run that succeeded or failed for good."""
        return self._add("on_complete", fn)

    def on_wait(self, fn: H) -> H:
        """Run ``fn(WaitParams)`` when any run starts a durable wait."""
        return self._add("on_wait", fn)

    def on_resume(self, fn: H) -> H:
        """Run ``fn(WaitParams)`` when any run's durable wait is over."""
        return self._add("on_resume", fn)

    def on_cancel(self, fn: H) -> H:
        """Run ``fn(CancelParams)`` when an executing run is canceled."""
        return self._add("on_cancel", fn)

    def catch_error(self, fn: H) -> H:
        """Let ``fn(CatchErrorParams)`` decide about errors a task's own hook left alone."""
        return self._add("catch_error", fn)

    @overload
    def middleware(self, name: str) -> Callable[[H], H]: ...
    @overload
    def middleware(self, name: str, fn: H) -> H: ...
    def middleware(self, name: str, fn: Any = None) -> Any:
        """Wrap every attempt (hooks and run) in ``fn(MiddlewareParams)``, in order added.

        ``tasks.middleware("db", fn)``, or as a decorator: ``@tasks.middleware("db")``.
        """

        def add(f: H) -> H:
            global_hooks.middleware.append((name, f))
            return f

        return add if fn is None else add(fn)
