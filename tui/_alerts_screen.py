"""The Alerts screen: recent deliveries of alert webhooks (failed runs, deployments,
batches), with their status, attempts and last error, and the channels they go to."""

from __future__ import annotations

from typing import ClassVar

from textual.content import Content

from ember._alert_types import AlertChannel, AlertDelivery
from ember._alerts import Alerts
from ember.tui._format import ago
from ember.tui._table_screen import Row, TableScreen

_STATUS_MARKUP = {
    "PENDING": "[$warning]↻ retrying[/]",
    "DELIVERED": "[$success]✔ delivered[/]",
    "FAILED": "[$error]✘ failed[/]",
}


class AlertsScreen(TableScreen):
    """Alert deliveries, newest first; the status line lists the channels."""

    MODE = "alerts"
    COLUMNS = ("Delivery", "Event", "Subject", "Status", "Tries", "When", "Webhook", "Last error")
    WIDTHS: ClassVar[dict[str, int]] = {"Status": 12}
    POLL_S = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[AlertChannel] = []
        self.deliveries: list[AlertDelivery] = []

    async def fetch(self) -> None:
        calls = Alerts(self.ember.client)
        self.channels = await calls.list()
        self.deliveries = await calls.deliveries()

    def rows(self) -> list[Row]:
        now = self.ember.clock()
        hooks = {c.id: c.webhook for c in self.channels}
        return [
            (
                d.id,
                (
                    d.id,
                    d.event,
                    d.subject,
                    Content.from_markup(_STATUS_MARKUP[d.status]),
                    str(d.attempts),
                    ago(d.delivered_at or d.created_at, now),
                    hooks.get(d.channel_id, d.channel_id),
                    d.last_error or "",
                ),
            )
            for d in self.deliveries
        ]

    def summary(self) -> str:
        env = self.ember.settings.env
        if not self.channels:
            return (
                f"No alert channels in {env}: "
                "`ember alerts add --webhook URL --events run.failed,deployment.failed`."
            )
        failing = sum(1 for d in self.deliveries if d.status != "DELIVERED")
        hooks = ", ".join(f"{c.webhook} ({','.join(c.events)})" for c in self.channels)
        return f"{len(self.deliveries)} deliveries · {failing} not delivered · to {hooks}"
