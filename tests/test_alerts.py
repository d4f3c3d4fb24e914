"""Alerts to a real local webhook receiver: signed, retried with backoff, delivered once."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock, Harness, ember_cli, eventually, running_daemon

from ember import AlertDelivery, Alerts, BadRequest, RunStatus, verify_signature

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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ember"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield got
    server.shutdown()
    server.server_close()


async def test_a_failed_run_alerts_the_webhook_signed_and_once(
    state_dir: Path, receiver: Receiver
) -> None:
    # The retry is 100 s after the refusal by the daemon's clock, which the test moves on.
    clock = Clock()
    async with running_daemon(state_dir, clock=clock, alert_retry_min_s=100.0) as h:
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

        def after(run_id: str, attempts: int, status: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                found = [d for d in await alerts.deliveries() if d.subject == run_id]
                return bool(found) and (found[0].attempts, found[0].status) == (attempts, status)

            return check

        await eventually(after(failed.id, 1, "PENDING"))
        # (Within verify_signature's 300 s tolerance: the retry is signed by this clock.)
        clock.advance(130)
        await eventually(after(failed.id, 2, "DELIVERED"), timeout_s=30)
        # Nothing more may arrive: with the clock past any retry of it, the next alert goes
        # out, and a second send of the first would have gone out before it.
        clock.advance(1300)
        again = await h.run("boom", {})
        await eventually(after(again.id, 1, "DELIVERED"), timeout_s=30)
    (refused, first_headers, first_body), (ok, headers, body), (_, next_headers, _) = (
        receiver.requests
    )
    assert next_headers["x-ember-delivery"] != headers["x-ember-delivery"]
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
    state_dir: Path, receiver: Receiver
) -> None:
    # Retries 100 s and then 200 s apart (and a quarter more at most, the jitter), by the
    # daemon's clock: the test moves it on instead of waiting.
    clock = Clock()
    receiver.fail_first = 2
    async with running_daemon(
        state_dir, clock=clock, cancel_grace_s=1.0, process_idle_s=30.0, alert_retry_min_s=100.0
    ) as harness:
        alerts = Alerts(harness.client)
        channel = await alerts.create(webhook=receiver.url, events=["deployment.succeeded"])
        assert [c.id for c in await alerts.list()] == [channel.id]
        version = await harness.register(TASKS)
        found: list[AlertDelivery] = []

        def after(attempts: int, status: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                found[:] = [d for d in await alerts.deliveries() if d.subject == version.id]
                return bool(found) and (found[0].attempts, found[0].status) == (attempts, status)

            return check

        await eventually(after(1, "PENDING"))
        assert found[0].last_error == "HTTP 503 Service Unavailable"
        assert found[0].next_attempt_at is not None
        wait_s = found[0].next_attempt_at.timestamp() - found[0].created_at.timestamp()
        assert 100.0 <= wait_s <= 125.0 + 10.0, wait_s
        clock.advance(130.0)
        await eventually(after(2, "PENDING"))
        assert found[0].next_attempt_at is not None
        wait_s = found[0].next_attempt_at.timestamp() - clock()
        assert 200.0 - 10.0 <= wait_s <= 250.0, wait_s
        clock.advance(260.0)
        await eventually(after(3, "DELIVERED"))
        assert found[0].event == "deployment.succeeded"
        assert found[0].last_error is None and found[0].next_attempt_at is None
        assert [r[0] for r in receiver.requests] == [503, 503, 200]
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
