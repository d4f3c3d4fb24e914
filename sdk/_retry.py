"""``retry.on_throw`` retries one block inside a task; ``heartbeats.yield_`` keeps a loop alive.

Errors that can never succeed on a retry are not retried, here or by the daemon
(:func:`is_retryable`): a bad payload, a 4xx answer of the daemon (a request that is wrong
stays wrong), :class:`AbortTaskRunError` and a run that took another path on replay.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ember._errors import (
    AbortTaskRunError,
    ApiError,
    NonDeterminismError,
    PayloadValidationError,
)
from ember._logger import logger
from ember._types import RetryOptions

T = TypeVar("T")

# 408 and 429 say "later", not "never".
_RETRYABLE_4XX = frozenset({408, 429})
# How often yield_ gives the loop a turn: often enough for timers, rare enough to be free.
_YIELD_EVERY_S = 0.05


def is_retryable(exc: BaseException) -> bool:
    """False for errors that fail the same way every time, so retrying them only wastes time."""
    if isinstance(exc, AbortTaskRunError | PayloadValidationError | NonDeterminismError):
        return False
    if isinstance(exc, ApiError):
        return not (400 <= exc.status < 500) or exc.status in _RETRYABLE_4XX
    return True


class RetryHelpers:
    """``from ember import retry``: retries inside a run, beside the run's own policy."""

    async def on_throw(
        self,
        fn: Callable[[int], Awaitable[T]] | Callable[[], Awaitable[T]],
        *,
        max_attempts: int = 3,
        factor: float = 2.0,
        min_timeout_s: float = 1.0,
        max_timeout_s: float = 60.0,
        randomize: bool = True,
    ) -> T:
        """Call ``fn`` until it returns, at most ``max_attempts`` times, backing off between.

        ``fn`` may take the attempt number (from 1). Errors that cannot succeed on a retry
        (see :func:`is_retryable`) are raised at once; after the last attempt its error is.

        Raises:
            ValueError: ``max_attempts`` is below 1.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        policy = RetryOptions(
            max_attempts=max_attempts,
            factor=factor,
            min_timeout_s=min_timeout_s,
            max_timeout_s=max_timeout_s,
            randomize=randomize,
        )
        takes_attempt = bool(inspect.signature(fn).parameters)
        attempt = 1
        while True:
            try:
                result: Any = fn(attempt) if takes_attempt else fn()  # type: ignore[call-arg]
                value: T = await result
                return value
            except Exception as exc:
                if attempt >= max_attempts or not is_retryable(exc):
                    raise
                delay = policy.delay_s(attempt)
                logger.warn(
                    f"retry.on_throw: attempt {attempt} of {max_attempts} failed: "
                    f"{type(exc).__name__}: {exc}; retrying in {delay:.1f}s",
                    attempt=attempt,
                )
                await asyncio.sleep(delay)
                attempt += 1


class Heartbeats:
    """``from ember import heartbeats``: for CPU-bound loops in ``async def`` tasks."""

    def __init__(self) -> None:
        self._last = 0.0

    async def yield_(self) -> None:
        """Call in every turn of a CPU-bound loop: the run keeps sending heartbeats.

        A loop that never awaits starves the event loop, so no heartbeat goes out and the
        daemon kills the attempt as stalled. This gives the loop a turn every 50 ms and costs
        a clock read otherwise. (``yield`` is a Python keyword, hence the underscore.)
        """
        now = time.monotonic()
        if now - self._last >= _YIELD_EVERY_S:
            self._last = now
            await asyncio.sleep(0)


retry = RetryHelpers()
heartbeats = Heartbeats()
