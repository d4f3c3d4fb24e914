"""Onboarding: a welcome email, sent through a queue that at most two runs use at once."""

from __future__ import annotations

import asyncio

import msgspec

from ember import Context, Queue, Retry, logger, task

emails = Queue("emails", concurrency_limit=2)


class NewUser(msgspec.Struct):
    """Who signed up."""

    user_id: int
    email: str
    name: str = "there"


@task(id="send-welcome-email", queue=emails, retry=Retry(max_attempts=5, min_timeout_s=0.2))
async def send_welcome_email(user: NewUser, ctx: Context) -> dict[str, str]:
    """Pretend to call an email API, then report what was sent."""
    logger.info("rendering the welcome email", user_id=user.user_id)
    await asyncio.sleep(0.2)  # the email provider's API call
    logger.info("sent", to=user.email, attempt=ctx.attempt)
    return {"to": user.email, "subject": f"Welcome, {user.name}!"}
