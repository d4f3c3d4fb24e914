"""Reports: CPU work in a plain function (Ember runs it in a thread), a flaky upstream, a cron."""

from __future__ import annotations

import hashlib
import statistics

from ember import AbortTaskRunError, Context, Retry, ScheduledPayload, logger, schedules, task


@task(id="daily-report", max_duration_s=60)
def daily_report(payload: dict[str, list[float]]) -> dict[str, float]:
    """Summarise the day's numbers."""
    values = payload.get("values") or []
    if not values:
        raise AbortTaskRunError("no values to report on: nothing to retry")
    print(f"summarising {len(values)} values")
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


@task(id="sync-inventory", retry=Retry(max_attempts=3, min_timeout_s=0.2, max_timeout_s=1))
async def sync_inventory(payload: dict[str, str], ctx: Context) -> dict[str, object]:
    """Fails on its first attempt (the upstream is flaky), succeeds on the retry."""
    if ctx.attempt == 1:
        logger.warn("upstream timed out", attempt=ctx.attempt)
        raise TimeoutError("inventory service did not answer in 5s")
    digest = hashlib.sha256(payload.get("sku", "").encode()).hexdigest()[:12]
    return {"sku": payload.get("sku"), "checksum": digest, "attempts": ctx.attempt}


@schedules.task(id="morning-digest", cron="0 6 * * *", timezone="Europe/London")
async def morning_digest(payload: ScheduledPayload) -> dict[str, str]:
    """Every morning at 06:00 London time (winter and summer alike)."""
    previous = payload.last_timestamp.isoformat() if payload.last_timestamp else "never"
    logger.info("digest", tick=payload.timestamp.isoformat(), previous=previous)
    return {"tick": payload.timestamp.isoformat(), "next": payload.upcoming[0].isoformat()}
