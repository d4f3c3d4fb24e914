"""What mypy must conclude about scheduled tasks (checked by tests/test_typing.py)."""

from ember import Context, ScheduledPayload, schedules


@schedules.task(id="digest", cron="0 9 * * *", timezone="Europe/Paris")
async def digest(payload: ScheduledPayload, ctx: Context) -> int:
    return 1


@schedules.task(id="per-customer")
def per_customer(payload: ScheduledPayload) -> str:
    return payload.schedule_id


reveal_type(digest)  # N: ScheduledTask[[ctx: ember._runtime.Context], int]
reveal_type(per_customer.schedule.cron)  # N: Revealed type is "str | None"
reveal_type(per_customer)  # N: ScheduledTask[[], str]


@schedules.task(id="wrong")  # E: expected "Callable[[ScheduledPayload], Coroutine
async def wrong(payload: int) -> None:
    return None
