"""Imported before every task module: hooks and middleware for all tasks, as in Trigger.dev's
``trigger/init.ts``."""

from __future__ import annotations

import time

from ember import CompleteParams, MiddlewareParams, locals, logger, tasks

STARTED = locals.create("started", float)
"""When this attempt started (monotonic seconds); each attempt has its own."""


@tasks.middleware("timing")
async def timing(params: MiddlewareParams) -> None:
    """Time every attempt, hooks included."""
    locals.set(STARTED, time.monotonic())
    await params.next()
    elapsed_ms = (time.monotonic() - locals.get_or_throw(STARTED)) * 1000
    logger.info("attempt finished", task=params.task_id, elapsed_ms=round(elapsed_ms, 1))


@tasks.on_complete
def report(params: CompleteParams) -> None:
    """One line per finished run, whatever its outcome."""
    outcome = "succeeded" if params.ok else f"failed for good: {params.error}"
    logger.info(f"run {params.ctx.run_id} {outcome}")
