"""Alerts to a real local webhook receiver: signed, retried with backoff, delivered once."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import Harness, ember_cli, eventually, http_server, running_daemon

from ember import Alerts, BadRequest, RunStatus, verify_signature

TASKS = {
    "tasks/__init__.py": "",
    "tasks/a.py": """
        from ember import task

        @task(id="boom", retry=None)
        async def boom(payload: dict) -> None:
            raise ValueError("the card was declined")

        @task(id="fine")
        async def fine(payload: dict) -> int:
            return 1
    """,
}


@dataclass
class Receiver:
    """A webhook endpoint that refuses its first ``fail_first`` requests with a 503."""

    url: str = ""
    fail_first: int = 1
    requests: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with got.lock:
                status = 503 if len(got.requests) < got.fail_first else 200
                headers = {k.lower(): v for k, v in self.headers.items()}
                got.requests.append((status, headers, body))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with http_server(Handler) as server:
        got.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ember"
        yield got


async def test_a_failed_run_alerts_the_webhook_signed_and_once(
    state_dir: Path, receiver: Receiver
) -> None:
    async with running_daemon(state_dir, alert_retry_min_s=0.2) as h:
        await h.register(TASKS)
        added = await asyncio.to_thread(
            ember_cli,
            h,
            "alerts",
            "add",
            "--webhook",
            receiver.url,
            "--events",
            "run.failed,deployment.succeeded",
            "--json",
        )
        assert added.returncode == 0, added.stderr
        channel = json.loads(added.stdout)
        secret = channel["secret"]
        assert secret.startswith("whsec_")
        assert (await h.run("fine", {})).status is RunStatus.COMPLETED  # no alert for it
        failed = await h.run("boom", {})
        assert failed.status is RunStatus.FAILED
        alerts = Alerts(h.client)

        async def delivered() -> bool:
            found = [d for d in await alerts.deliveries() if d.subject == failed.id]
            return bool(found) and found[0].status == "DELIVERED"

        await eventually(delivered, timeout_s=30)
        await asyncio.sleep(0.5)  # nothing more may arrive
    (refused, first_headers, first_body), (ok, headers, body) = receiver.requests
    assert (refused, ok) == (503, 200), "the first attempt was refused and retried"
    assert first_body == body and first_headers["x-ember-delivery"] == headers["x-ember-delivery"]
    assert verify_signature(secret, body, headers["x-ember-signature"])
    assert not verify_signature("whsec_wrong", body, headers["x-ember-signature"])
    assert not verify_signature(secret, body + b" ", headers["x-ember-signature"])
    event = json.loads(body)
    assert event["type"] == "run.failed" and headers["x-ember-event"] == "run.failed"
    assert event["data"]["run"]["id"] == failed.id
    assert event["data"]["run"]["status"] == "FAILED"
    assert "the card was declined" in event["data"]["run"]["error"]["message"]


async def test_deployments_alert_and_deliveries_show_retries(
    harness: Harness, receiver: Receiver
) -> None:
    alerts = Alerts(harness.client)
    receiver.fail_first = 2
    channel = await alerts.create(webhook=receiver.url, events=["deployment.succeeded"])
    assert [c.id for c in await alerts.list()] == [channel.id]
    version = await harness.register(TASKS)
    found: list[Any] = []

    async def delivered() -> bool:
        found[:] = [d for d in await alerts.deliveries() if d.subject == version.id]
        return bool(found) and found[0].status == "DELIVERED"

    # The first retry waits 1 s (the default), the second 2 s.
    await eventually(delivered, timeout_s=30)
    assert found[0].attempts == 3 and found[0].event == "deployment.succeeded"
    assert found[0].last_error is None
    assert json.loads(receiver.requests[-1][2])["data"]["version"]["id"] == version.id
    listed = await asyncio.to_thread(ember_cli, harness, "alerts", "deliveries")
    assert "deployment.succeeded" in listed.stdout and "DELIVERED" in listed.stdout
    removed = await alerts.delete(channel.id)
    assert removed.id == channel.id and await alerts.list() == []


async def test_bad_alert_channels_are_refused(harness: Harness) -> None:
    alerts = Alerts(harness.client)
    with pytest.raises(BadRequest, match="is not an http:// or https:// URL"):
        await alerts.create(webhook="ftp://example.com", events=["run.failed"])
    with pytest.raises(BadRequest, match="name at least one of"):
        await alerts.create(webhook="http://example.com", events=[])
    bad = await asyncio.to_thread(
        ember_cli, harness, "alerts", "add", "--webhook", "http://x", "--events", "run.oops"
    )
    assert bad.returncode != 0 and "run.oops is not an event" in bad.stderr
