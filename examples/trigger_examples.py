"""Trigger the example tasks from another process, as an application would, and wait for them.

Run `ember dev` in this folder first, then `python trigger_examples.py`.
"""

from __future__ import annotations

import asyncio
import time

from tasks.onboarding import NewUser, send_welcome_email
from tasks.orders import place_order
from tasks.reports import daily_report, sync_inventory

from ember import RunFailedError, runs


async def main() -> None:
    started = time.perf_counter()
    welcome = await send_welcome_email.batch_trigger(
        [NewUser(user_id=i, email=f"user{i}@example.com", name=f"User {i}") for i in range(4)]
    )
    report = await daily_report.trigger({"values": [3.0, 1.5, 4.25, 2.0]})
    empty = await daily_report.trigger({"values": []})
    inventory = await sync_inventory.trigger({"sku": "EMB-42"}, tags=["inventory"])
    order = await place_order.trigger({"id": 1042, "cents": 1999})

    for handle in welcome:
        print(f"{handle.id}  send-welcome-email  ->", await handle.result(timeout_s=60))
    print(f"{report.id}  daily-report        ->", await report.result(timeout_s=60))
    print(f"{inventory.id}  sync-inventory      ->", await inventory.result(timeout_s=60))
    print(f"{order.id}  place-order         ->", await order.result(timeout_s=60))
    try:
        await empty.result(timeout_s=60)
    except RunFailedError as exc:
        print(f"{empty.id}  daily-report        -> {exc}")
    run = await runs.retrieve(inventory.id)
    print(
        f"sync-inventory took {len(run.attempts)} attempts: "
        + ", ".join(f"#{a.number} {a.status}" for a in run.attempts)
    )
    print(f"all runs finished in {time.perf_counter() - started:.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
