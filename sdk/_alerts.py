"""``alerts``: webhooks told when runs fail, versions build or fail, and batches complete.

Each delivery is a POST of JSON (``{"id", "type", "env", "created_at", "data"}``) signed with
the channel's secret: check ``x-ember-signature`` with :func:`verify_signature`.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import time
from collections.abc import Iterable

import msgspec

from ember._alert_types import (
    AlertChannel,
    AlertChannelList,
    AlertDelivery,
    AlertDeliveryList,
    AlertEvent,
    CreateAlertRequest,
)
from ember._client import Call, Client, default_client


def verify_signature(secret: str, body: bytes, header: str, *, tolerance_s: float = 300.0) -> bool:
    """True when ``header`` (``x-ember-signature``) signs ``body`` with ``secret``, recently.

    Args:
        secret: the channel's secret (``whsec_...``).
        body: the request body exactly as received.
        header: the signature header's value, ``t=<unix>,v1=<hex>``.
        tolerance_s: how old a signature may be (replays of older ones are refused).
    """
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - stamp) > tolerance_s:
        return False
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts.get("v1", ""))


class Alerts:
    """Alert channels of the client's environment: ``from ember import alerts``."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        """The client used: the one given, else the default."""
        return self._client or default_client()

    async def create(self, *, webhook: str, events: Iterable[AlertEvent]) -> AlertChannel:
        """Add a webhook for these events; the answer holds its signing secret."""
        body = msgspec.json.encode(CreateAlertRequest(webhook=webhook, events=list(events)))
        return await self.client.request(Call("POST", "/api/v1/alerts", AlertChannel, body=body))

    async def list(self) -> builtins.list[AlertChannel]:
        """The environment's alert channels."""
        return (await self.client.request(Call("GET", "/api/v1/alerts", AlertChannelList))).data

    async def delete(self, channel_id: str) -> AlertChannel:
        """Remove a channel (and its deliveries)."""
        call = Call("DELETE", f"/api/v1/alerts/{channel_id}", AlertChannel)
        return await self.client.request(call)

    async def deliveries(self) -> builtins.list[AlertDelivery]:
        """Recent deliveries, newest first: status, attempts, last error."""
        call = Call("GET", "/api/v1/alerts/deliveries", AlertDeliveryList)
        return (await self.client.request(call)).data


alerts = Alerts()
"""Alerts through the default client."""
