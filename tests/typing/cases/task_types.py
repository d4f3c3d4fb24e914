"""What mypy must conclude about tasks (checked by tests/test_typing.py)."""

import msgspec

from ember import Context, RunHandle, task


class Order(msgspec.Struct):
    id: int


@task(id="charge")
async def charge(order: Order, ctx: Context) -> int:
    return order.id


@task
def report(values: list[float]) -> str:
    return str(values)


async def main() -> None:
    handle = await charge.trigger(Order(id=1))
    reveal_type(handle)  # N: Revealed type is "ember._task.RunHandle[int]"
    output = await handle.result()
    reveal_type(output)  # N: Revealed type is "int"
    await charge.trigger({"id": 1})  # E: Argument 1 to "trigger" of "Task" has incompatible type
    sync_handle = report.trigger_sync([1.0, 2.0])
    reveal_type(sync_handle)  # N: Revealed type is "ember._task.RunHandle[str]"
    report.trigger_sync(["a"])  # E: List item 0 has incompatible type "str"
    handles: list[RunHandle[int]] = await charge.batch_trigger([Order(id=2)])
    del handles
