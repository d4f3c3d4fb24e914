"""Wire types of alerts: webhook channels, and the deliveries of their events."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from ember._types import Request, Struct

AlertEvent = Literal["run.failed", "deployment.succeeded", "deployment.failed", "batch.completed"]
"""What an alert channel can be sent: a run that ended failed (FAILED, CRASHED,
SYSTEM_FAILURE, TIMED_OUT), a version that built (or failed to), a batch that completed."""

ALERT_EVENTS: tuple[AlertEvent, ...] = (
    "run.failed",
    "deployment.succeeded",
    "deployment.failed",
    "batch.completed",
)

SIGNATURE_HEADER = "x-ember-signature"
"""``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body with the channel's secret>``."""


class CreateAlertRequest(Request, frozen=True):
    """Body of ``POST /api/v1/alerts``: a webhook and the events it receives."""

    webhook: str
    events: list[AlertEvent]


class AlertChannel(Struct, frozen=True):
    """A webhook that receives an environment's alerts.

    Attributes:
        secret: signs each delivery (``x-ember-signature``); shown when the channel is
            created, and to the daemon's owner.
    """

    id: str
    env: str
    webhook: str
    events: list[AlertEvent]
    created_at: datetime
    secret: str = ""


class AlertChannelList(Struct, frozen=True):
    """Alert channels of an environment."""

    data: list[AlertChannel]


class AlertDelivery(Struct, frozen=True):
    """One event sent (or being sent) to one channel: ``PENDING`` while it is retried with
    backoff, then ``DELIVERED`` or ``FAILED``."""

    id: str
    channel_id: str
    event: AlertEvent
    subject: str
    status: Literal["PENDING", "DELIVERED", "FAILED"]
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str | None = None


class AlertDeliveryList(Struct, frozen=True):
    """Recent deliveries of an environment's alerts, newest first."""

    data: list[AlertDelivery]
