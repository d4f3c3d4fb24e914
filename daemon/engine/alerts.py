"""Alerts: webhooks told when a run fails, a version builds or fails, a batch completes.

Each event is queued once per channel: its delivery row is written in the same transaction
as what caused it (a run's end, a version's record) and is unique per (channel, event,
subject), so neither a crash nor a replayed write makes a second one. A sender task posts
due deliveries, signed like Stripe's webhooks (``x-ember-signature: t=<unix>,v1=<hex
HMAC-SHA256(secret, "<t>." + body)>``, the delivery id in ``x-ember-delivery`` for the
receiver to drop a repeat), and retries failures with exponential backoff
(``alert_retry_min_s`` doubling, at most ``MAX_ATTEMPTS``); the row keeps the attempts and
the last error, which the dashboard shows. A delivery the daemon had not finished when it
stopped is sent after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import random
import secrets
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import msgspec

from ember._alert_types import (
    ALERT_EVENTS,
    SIGNATURE_HEADER,
    AlertChannel,
    AlertDelivery,
    AlertEvent,
    CreateAlertRequest,
)
from ember._errors import BadRequest, NotFound
from ember.daemon.engine.ids import ulid
from ember.daemon.store import alerts as alert_store
from ember.daemon.store import runs as store

if TYPE_CHECKING:
    from ember.daemon.config import DaemonConfig
    from ember.daemon.store.db import Database


class AlertsEngine(Protocol):
    """What the alerts use of the engine (a Protocol: no import of the engine's module)."""

    config: DaemonConfig
    db: Database
    # Wall-clock seconds: deliveries' times, retry backoff and signature stamps read it.
    clock: Callable[[], float]


log = logging.getLogger("ember.daemon")

MAX_ATTEMPTS = 8
MAX_RETRY_S = 600.0
SEND_TIMEOUT_S = 10.0
# Deliveries sent at once; more wait for the next round.
SEND_BATCH = 32

_events_decoder = msgspec.json.Decoder(list[str])


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for a body sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _post(url: str, body: bytes, headers: dict[str, str]) -> None:
    """POST in a thread; raises with the reason unless the answer is 2xx."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
            response.read(1024)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


class Alerts:
    """An engine's alert channels and the sender of their deliveries.

    Args:
        engine: the engine whose events are sent.
    """

    def __init__(self, engine: AlertsEngine) -> None:
        self.engine = engine
        self.retry_min_s = engine.config.alert_retry_min_s
        # Channels by environment: (id, events, webhook, secret).
        self._channels: dict[str, list[tuple[str, frozenset[str], str, str]]] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    # -- channels -----------------------------------------------------------------------

    def recover(self) -> None:
        """Load the channels and start sending (startup)."""
        for channel_id, env, webhook, events, secret in self.engine.db.read_now(
            alert_store.load_channels
        ):
            self._add(env, channel_id, _events_decoder.decode(events), webhook, secret)
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def _add(self, env: str, channel_id: str, events: Sequence[str], url: str, secret: str) -> None:
        self._channels.setdefault(env, []).append((channel_id, frozenset(events), url, secret))

    async def create(self, env: str, req: CreateAlertRequest) -> AlertChannel:
        """Add a webhook channel; the answer holds its signing secret.

        Raises:
            BadRequest: the URL is not http(s), or no event is named.
        """
        parts = urlsplit(req.webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequest(400, f"webhook: {req.webhook!r} is not an http:// or https:// URL")
        if not req.events:
            raise BadRequest(400, "events: name at least one of " + ", ".join(ALERT_EVENTS))
        channel_id = "alert_" + ulid()
        secret = "whsec_" + secrets.token_urlsafe(24)
        now = self.engine.clock()
        events = list(dict.fromkeys(req.events))
        await self.engine.db.write(
            lambda conn: alert_store.insert_channel(
                conn, channel_id, env, req.webhook, events, secret, now
            )
        )
        self._add(env, channel_id, events, req.webhook, secret)
        return AlertChannel(
            id=channel_id,
            env=env,
            webhook=req.webhook,
            events=events,
            created_at=store.ts(now),
            secret=secret,
        )

    async def delete(self, env: str, channel_id: str) -> AlertChannel:
        """Remove a channel and its deliveries; returns it as it was.

        Raises:
            NotFound: no such channel in this environment.
        """
        found = [c for c in await self.channels(env, with_secrets=False) if c.id == channel_id]
        if not found:
            raise NotFound(404, f"alert channel {channel_id} does not exist in environment {env}")
        await self.engine.db.write(lambda conn: alert_store.delete_channel(conn, channel_id))
        self._channels[env] = [c for c in self._channels.get(env, []) if c[0] != channel_id]
        return found[0]

    async def channels(self, env: str, with_secrets: bool) -> list[AlertChannel]:
        """The environment's channels (secrets only for the socket's owner)."""
        return await self.engine.db.read(
            lambda conn: alert_store.list_channels(conn, env, with_secrets)
        )

    async def deliveries(self, env: str, limit: int = 100) -> list[AlertDelivery]:
        """Recent deliveries of the environment, newest first."""
        return await self.engine.db.read(lambda conn: alert_store.list_deliveries(conn, env, limit))

    # -- events -------------------------------------------------------------------------

    def wants(self, env: str, event: str) -> bool:
        """True when a channel of the environment takes this event (skip the work else)."""
        return any(event in c[1] for c in self._channels.get(env, ()))

    def record(
        self,
        conn: sqlite3.Connection,
        env: str,
        event: AlertEvent,
        subject: str,
        data: dict[str, Any],
        now: float,
    ) -> None:
        """Queue an event for the channels that take it, inside the caller's transaction."""
        for channel_id, events, _, _ in self._channels.get(env, ()):
            if event not in events:
                continue
            delivery_id = "alertdlv_" + ulid()
            body = msgspec.json.encode(
                {
                    "id": delivery_id,
                    "type": event,
                    "env": env,
                    "created_at": store.ts(now),
                    "data": data,
                }
            )
            alert_store.insert_delivery(
                conn, delivery_id, channel_id, env, event, subject, body, now
            )

    def wake(self) -> None:
        """Something was queued: look for due deliveries now."""
        self._wake.set()

    # -- sending ------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            now = self.engine.clock()
            due, next_at = await self.engine.db.read(
                functools.partial(alert_store.due_deliveries, now=now, limit=SEND_BATCH)
            )
            if due:
                await asyncio.gather(*(self._send(*row) for row in due))
                continue
            self._wake.clear()
            timeout = 1.0 if next_at is None else min(1.0, max(0.0, next_at - now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _send(
        self, delivery_id: str, event: str, body: bytes, attempts: int, url: str, secret: str
    ) -> None:
        stamp = int(self.engine.clock())
        headers = {
            "content-type": "application/json",
            "user-agent": "ember-alerts",
            "x-ember-event": event,
            "x-ember-delivery": delivery_id,
            SIGNATURE_HEADER: sign(secret, stamp, body),
        }
        error = None
        try:
            await asyncio.to_thread(_post, url, body, headers)
        except RuntimeError as exc:
            error = str(exc)
        now = self.engine.clock()
        attempts += 1
        # (status, next attempt at, delivered at, last error)
        update: tuple[str, float | None, float | None, str | None]
        if error is None:
            update = ("DELIVERED", None, now, None)
        elif attempts >= MAX_ATTEMPTS:
            log.warning("alert %s to %s failed for good: %s", delivery_id, url, error)
            update = ("FAILED", None, None, error)
        else:
            wait_s = min(MAX_RETRY_S, self.retry_min_s * 2 ** (attempts - 1))
            update = ("PENDING", now + wait_s * random.uniform(1.0, 1.25), None, error)
        await self.engine.db.write(
            lambda conn: alert_store.set_delivery_outcome(
                conn, delivery_id, update[0], attempts, update[1], update[2], update[3]
            )
        )

    async def close(self) -> None:
        """Stop sending; what is pending is sent after the next start."""
        if self._sender is not None:
            self._sender.cancel()
