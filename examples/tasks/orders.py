"""Orders: a parent run that waits for a child run and for time, holding no slot meanwhile."""

from __future__ import annotations

from ember import Context, FailureParams, WaitParams, idempotency_keys, logger, task, wait


def refund_if_charged(params: FailureParams) -> None:
    """Runs once the order has failed for good (not between retries)."""
    logger.error("order failed; refund anything charged", order=params.payload["id"])


def note_wait(params: WaitParams) -> None:
    """Fires once per wait, also when the run resumes from a checkpoint or a replay."""
    logger.info(f"waiting on a {params.wait.kind}", seq=params.wait.seq)


@task(id="charge-card")
async def charge_card(order: dict[str, int]) -> str:
    """Charge the order's card (the payment provider's call)."""
    logger.info("charging", order=order["id"], cents=order["cents"])
    return f"rcpt_{order['id']}"


@task(id="place-order", on_failure=refund_if_charged, on_wait=note_wait)
async def place_order(order: dict[str, int], ctx: Context) -> dict[str, str]:
    """Charge, give the customer a moment to cancel, then confirm.

    If this run retries, the charge is not repeated: its idempotency key is scoped to the run.
    """
    charged = await charge_card.trigger_and_wait(
        order, idempotency_key=idempotency_keys.create("charge")
    )
    receipt = charged.unwrap()
    logger.info("charged; waiting before confirming", receipt=receipt)
    await wait.for_(seconds=2)  # durable: survives a restart of the daemon
    return {"receipt": receipt, "status": "confirmed", "run": ctx.run_id}
