"""One attempt of a run with its lifecycle: middleware, hooks, ``catch_error`` and locals.

The run process (``_worker``) hands an :class:`Attempt` the task's run function; the attempt
calls the global hooks, then the task's, around it, with Trigger.dev's semantics (see
``ember._hooks``), and says whether the daemon should retry. Hooks after the run function
(``on_success``, ``on_failure``, ``on_complete``) and the wait and cancel hooks never change
the outcome: their errors are logged with the run and ignored.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ember._errors import (
    AbortTaskRunError,
    EmberError,
    NonDeterminismError,
    PayloadValidationError,
)
from ember._hooks import (
    CancelParams,
    CatchErrorParams,
    CatchErrorResult,
    CompleteParams,
    FailureParams,
    Hook,
    Hooks,
    MiddlewareParams,
    StartAttemptParams,
    SuccessParams,
    WaitInfo,
    WaitParams,
    begin_attempt_locals,
    call_hook,
    end_attempt_locals,
)
from ember._retry import is_retryable
from ember._runtime import Context

# Errors no hook can turn into a retry: they fail the same way every time.
_NEVER_RETRIED = (AbortTaskRunError, PayloadValidationError, NonDeterminismError)


class MiddlewareError(EmberError):
    """A middleware returned without calling ``next()``: the run function never ran."""


@dataclass(slots=True)
class Outcome:
    """How an attempt ended.

    Attributes:
        ok: the run function returned (and every ``on_start_attempt`` hook passed).
        output: its JSON output when ``ok``.
        error: what failed the attempt otherwise.
        retry: whether the daemon should retry (policy and ``catch_error`` agreed).
        retry_delay_s: the delay ``catch_error`` chose, or None for the policy's.
    """

    ok: bool
    output: bytes | None = None
    error: BaseException | None = None
    retry: bool = True
    retry_delay_s: float | None = None


class Attempt:
    """The hooks of one attempt; ``run`` executes it, the rest is called from the runtime."""

    def __init__(
        self,
        *,
        task_id: str,
        hooks: Hooks,
        context: Context,
        payload: Any,
        last_attempt: bool,
        policy_delay_s: float,
        log: Callable[[str, str, dict[str, Any]], None],
    ) -> None:
        self._task_id = task_id
        self._hooks = hooks
        self._ctx = context
        self._payload = payload
        self._last = last_attempt
        self._policy_delay_s = policy_delay_s
        self._log = log
        self._outcome: Outcome | None = None
        self.waiting = False

    # -- the attempt --------------------------------------------------------------------

    async def run(self, call: Callable[[], Awaitable[tuple[Any, bytes]]]) -> Outcome:
        """Run middleware, ``on_start_attempt``, ``call`` and the after-hooks; never raises.

        ``call`` runs the task function and returns its output and the output's JSON.
        (Cancellation passes through.) Run it inside :func:`attempt_locals`.
        """
        try:
            await self._through_middleware(0, call)
        except (Exception, SystemExit) as exc:
            if self._outcome is None:
                await self._failed(exc)  # a middleware failed before the attempt ended
            else:
                self._hook_failed("middleware", exc)
        if self._outcome is None:
            await self._failed(
                MiddlewareError(
                    "a middleware returned without awaiting params.next(), so the run "
                    "function never ran: call `await params.next()` in every middleware"
                )
            )
        assert self._outcome is not None
        return self._outcome

    async def _through_middleware(
        self, index: int, call: Callable[[], Awaitable[tuple[Any, bytes]]]
    ) -> None:
        chain = self._hooks.middleware
        if index == len(chain):
            await self._execute(call)
            return
        _, fn = chain[index]

        async def next_() -> None:
            await self._through_middleware(index + 1, call)

        await call_hook(fn, MiddlewareParams(self._ctx, self._payload, self._task_id, next_))

    async def _execute(self, call: Callable[[], Awaitable[tuple[Any, bytes]]]) -> None:
        try:
            for hook in self._hooks.on_start_attempt:
                await call_hook(hook, StartAttemptParams(self._ctx, self._payload))
            output, encoded = await call()
        except (Exception, SystemExit) as exc:
            await self._failed(exc)
            return
        self._outcome = Outcome(ok=True, output=encoded)
        await self._after("on_success", SuccessParams(self._ctx, self._payload, output))
        await self._after(
            "on_complete", CompleteParams(self._ctx, self._payload, ok=True, output=output)
        )

    async def _failed(self, exc: BaseException) -> None:
        delay: float | None = None
        retry = not self._last and is_retryable(exc)
        decision = await self._catch_error(exc, self._policy_delay_s if retry else None)
        if decision is not None:
            if decision.skip_retrying:
                retry = False
            elif decision.retry_at is not None or decision.retry_delay_s is not None:
                retry = not self._last and not isinstance(exc, _NEVER_RETRIED)
                if decision.retry_at is not None:
                    delay = max(0.0, decision.retry_at.timestamp() - time.time())
                else:
                    delay = max(0.0, decision.retry_delay_s or 0.0)
        self._outcome = Outcome(ok=False, error=exc, retry=retry, retry_delay_s=delay)
        if not retry:
            # The run fails for good: Trigger.dev's onFailure and onComplete fire now.
            await self._after("on_failure", FailureParams(self._ctx, self._payload, exc))
            await self._after(
                "on_complete", CompleteParams(self._ctx, self._payload, ok=False, error=exc)
            )

    async def _catch_error(
        self, exc: BaseException, delay_s: float | None
    ) -> CatchErrorResult | None:
        params = CatchErrorParams(self._ctx, self._payload, exc, delay_s)
        for hook in self._hooks.catch_error:
            try:
                decision = await call_hook(hook, params)
            except Exception as error:
                self._hook_failed("catch_error", error)
                continue
            if isinstance(decision, CatchErrorResult):
                return decision
            if decision is not None:
                self._log(
                    "warn",
                    f"catch_error hook {_name(hook)} returned {decision!r}: return a "
                    "CatchErrorResult or None; the retry policy applies",
                    {},
                )
        return None

    # -- called while the run function runs -----------------------------------------------

    async def wait_started(self, info: WaitInfo) -> None:
        """A durable wait starts (not when its result comes from the journal)."""
        self.waiting = True
        await self._after("on_wait", WaitParams(self._ctx, self._payload, info))

    async def wait_over(self, info: WaitInfo) -> None:
        """A durable wait is over, in this process or in the one that re-executes the run."""
        self.waiting = False
        await self._after("on_resume", WaitParams(self._ctx, self._payload, info))

    async def canceled(self, run: Awaitable[Any], grace_s: float) -> None:
        """The run is canceled while it executes (not while it waits): ``on_cancel``."""
        if not self.waiting and self._outcome is None:
            await self._after("on_cancel", CancelParams(self._ctx, self._payload, run, grace_s))

    # -- helpers --------------------------------------------------------------------------

    async def _after(self, name: str, params: Any) -> None:
        hook: Hook
        for hook in getattr(self._hooks, name):
            try:
                await call_hook(hook, params)
            except Exception as exc:
                self._hook_failed(f"{name} hook {_name(hook)}", exc)

    def _hook_failed(self, what: str, exc: BaseException) -> None:
        self._log(
            "error",
            f"{what} raised {type(exc).__name__}: {exc} (ignored: it does not change the "
            "run's outcome)",
            {"stack": "".join(traceback.format_exception(exc))},
        )


@contextlib.contextmanager
def attempt_locals() -> Iterator[None]:
    """The attempt's own ``locals``, empty at its start and dropped at its end.

    A context copied inside shares them: ``on_cancel``, run in such a copy, sees what the
    middleware set.
    """
    token = begin_attempt_locals()
    try:
        yield
    finally:
        end_attempt_locals(token)


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", repr(fn)))
