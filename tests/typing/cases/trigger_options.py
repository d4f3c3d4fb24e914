"""Trigger options are a typed keyword set: mypy refuses a misspelt or mistyped one."""

import msgspec

from ember import CatchErrorResult, SuccessParams, TriggerItem, locals, task, tasks


class Order(msgspec.Struct):
    id: int


def audit(params: SuccessParams) -> None:
    print(params.output)


@task(id="ship", on_success=audit, catch_error=lambda p: CatchErrorResult(skip_retrying=True))
async def ship(order: Order) -> int:
    return order.id


DB = locals.create("db", str)


async def main() -> None:
    await ship.trigger(Order(id=1), delay="1m", tags=["a"], max_attempts=2)
    await ship.trigger(Order(id=1), dealy="1m")  # E: Unexpected keyword argument "dealy"
    await ship.trigger(Order(id=1), max_attempts="2")  # E: Argument "max_attempts" to "trigger"
    ship.trigger_sync(Order(id=1), priorty=1.0)  # E: Unexpected keyword argument "priorty"
    await tasks.trigger("ship", {"id": 1}, ttl="1h", idempotency_key="k")
    await tasks.trigger("ship", {"id": 1}, idempotency="k")  # E: Unexpected keyword argument
    TriggerItem(Order(id=2), queu="q")  # E: Unexpected keyword argument "queu"
    reveal_type(locals.get(DB))  # N: Revealed type is "str | None"
    await tasks.batch_trigger([("ship", {"id": 1}, {"delay": "1m"})])
    await tasks.batch_trigger([("ship", {"id": 1}, {"dealy": "1m"})])  # E: Extra key "dealy"
