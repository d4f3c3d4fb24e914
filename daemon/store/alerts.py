"""Alert channels and their deliveries, in SQL (the engine's ``Alerts`` decides and sends).

Write functions run inside a group-commit transaction (see :mod:`ember.daemon.store.db`), as in
:mod:`ember.daemon.store.runs`. A delivery row is unique per (channel, event, subject), so
:func:`insert_delivery` in a replayed write queues nothing twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import msgspec

from ember._alert_types import AlertChannel, AlertDelivery, AlertEvent
from ember.daemon.store.columns import opt_ts, ts

_json = msgspec.json.Encoder()
_events_decoder = msgspec.json.Decoder(list[AlertEvent])

# A channel as the sender keeps it: id, env, webhook, events (JSON), secret.
StoredChannel = tuple[str, str, str, bytes, str]
# A delivery due to be sent: id, event, body, attempts so far, webhook, secret.
DueDelivery = tuple[str, str, bytes, int, str, str]


def load_channels(conn: sqlite3.Connection) -> list[StoredChannel]:
    """Every channel of every environment, oldest first."""
    return conn.execute(
        "SELECT id, env, webhook, events, secret FROM alert_channels ORDER BY id"
    ).fetchall()


def insert_channel(
    conn: sqlite3.Connection,
    channel_id: str,
    env: str,
    webhook: str,
    events: Sequence[str],
    secret: str,
    now: float,
) -> None:
    """Record a new webhook channel."""
    conn.execute(
        "INSERT INTO alert_channels (id, env, webhook, events, secret, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (channel_id, env, webhook, _json.encode(list(events)), secret, now),
    )


def delete_channel(conn: sqlite3.Connection, channel_id: str) -> None:
    """Remove a channel (its deliveries go with it: the foreign key cascades)."""
    conn.execute("DELETE FROM alert_channels WHERE id = ?", (channel_id,))


def list_channels(conn: sqlite3.Connection, env: str, with_secrets: bool) -> list[AlertChannel]:
    """The environment's channels, oldest first; the secrets only when asked for."""
    rows = conn.execute(
        "SELECT id, env, webhook, events, created_at, secret FROM alert_channels"
        " WHERE env = ? ORDER BY id",
        (env,),
    ).fetchall()
    return [
        AlertChannel(
            id=r[0],
            env=r[1],
            webhook=r[2],
            events=_events_decoder.decode(r[3]),
            created_at=ts(r[4]),
            secret=r[5] if with_secrets else "",
        )
        for r in rows
    ]


def list_deliveries(conn: sqlite3.Connection, env: str, limit: int) -> list[AlertDelivery]:
    """The environment's most recent deliveries, newest first."""
    rows = conn.execute(
        "SELECT id, channel_id, event, subject, status, attempts, created_at, next_at,"
        " delivered_at, last_error FROM alert_deliveries WHERE env = ?"
        " ORDER BY id DESC LIMIT ?",
        (env, limit),
    ).fetchall()
    return [
        AlertDelivery(
            id=r[0],
            channel_id=r[1],
            event=r[2],
            subject=r[3],
            status=r[4],
            attempts=r[5],
            created_at=ts(r[6]),
            next_attempt_at=opt_ts(r[7]) if r[4] == "PENDING" else None,
            delivered_at=opt_ts(r[8]),
            last_error=r[9],
        )
        for r in rows
    ]


def insert_delivery(
    conn: sqlite3.Connection,
    delivery_id: str,
    channel_id: str,
    env: str,
    event: str,
    subject: str,
    body: bytes,
    now: float,
) -> None:
    """Queue a delivery, due now, unless the channel has one for this event and subject."""
    conn.execute(
        "INSERT OR IGNORE INTO alert_deliveries (id, channel_id, env, event, subject,"
        " body, status, created_at, next_at) VALUES (?, ?, ?, ?, ?, ?, 'PENDING', ?, ?)",
        (delivery_id, channel_id, env, event, subject, body, now, now),
    )


def due_deliveries(
    conn: sqlite3.Connection, now: float, limit: int
) -> tuple[list[DueDelivery], float | None]:
    """Up to ``limit`` pending deliveries due at ``now``, soonest first, and when the soonest
    pending one is due (None when none is pending)."""
    rows = conn.execute(
        "SELECT d.id, d.event, d.body, d.attempts, c.webhook, c.secret FROM alert_deliveries d"
        " JOIN alert_channels c ON c.id = d.channel_id"
        " WHERE d.status = 'PENDING' AND d.next_at <= ? ORDER BY d.next_at LIMIT ?",
        (now, limit),
    ).fetchall()
    (next_at,) = conn.execute(
        "SELECT MIN(next_at) FROM alert_deliveries WHERE status = 'PENDING'"
    ).fetchone()
    return rows, next_at


def set_delivery_outcome(
    conn: sqlite3.Connection,
    delivery_id: str,
    status: str,
    attempts: int,
    next_at: float | None,
    delivered_at: float | None,
    error: str | None,
) -> None:
    """Record an attempt's outcome: DELIVERED, FAILED for good, or PENDING until ``next_at``."""
    conn.execute(
        "UPDATE alert_deliveries SET status = ?, attempts = ?, next_at = ?,"
        " delivered_at = ?, last_error = ? WHERE id = ?",
        (status, attempts, next_at, delivered_at, error, delivery_id),
    )
