"""Wait tokens completed from outside: a plain HTTP POST to ``token.url``, with no API key."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import eventually, running_daemon

from ember import Runs, RunStatus, Tasks, Wait

TASKS = {
    "tasks/__init__.py": "",
    "tasks/hook.py": """
        from ember import task, wait

        @task(id="await-webhook")
        async def await_webhook(payload: dict) -> dict:
            token = await wait.create_token(timeout="1h", idempotency_key=payload["key"])
            result = await wait.for_token(token)
            return {"ok": result.ok, "output": result.output}
    """,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    """A plain HTTP client, as another system's webhook would call: no key, no SDK."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_post_to_the_token_url_resumes_its_run(state_dir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with running_daemon(state_dir, tcp=address) as h:
        info = await h.register(TASKS)
        assert info.status == "READY", info.error
        handle = await Tasks(h.client).trigger("await-webhook", {"key": "order-7"})
        runs = Runs(h.client)

        async def waiting() -> bool:
            return (await runs.retrieve(handle.id)).status is RunStatus.WAITING

        await eventually(waiting)
        token = await Wait(h.client).create_token(idempotency_key="order-7")
        assert token.is_cached
        assert token.url.startswith(f"http://{address}/api/v1/waitpoints/tokens/{token.id}/")
        assert (await Wait(h.client).retrieve_token(token.id)).url == token.url

        # A guessed secret opens nothing; the real one completes the token once.
        forged = token.url.rsplit("/", 1)[0] + "/" + "A" * 43
        status, body = await asyncio.to_thread(post, forged, b"{}")
        assert status == 404 and "no token answers at this URL" in str(body["error"])
        status, body = await asyncio.to_thread(post, token.url, b"not json")
        assert status == 400 and "not JSON" in str(body["error"])
        status, body = await asyncio.to_thread(post, token.url, b'{"paid": true, "cents": 1299}')
        assert status == 200, body
        assert body["status"] == "COMPLETED"
        run = await h.wait(handle.id)
        assert run.output_as() == {"ok": True, "output": {"paid": True, "cents": 1299}}
        status, body = await asyncio.to_thread(post, token.url, b"{}")
        assert status == 409 and "already COMPLETED" in str(body["error"])
        # Every other route over TCP still wants a key.
        status, body = await asyncio.to_thread(
            post, f"http://{address}/api/v1/waitpoints/tokens/{token.id}/complete", b"{}"
        )
        assert status == 401


async def test_a_url_survives_a_restart_and_differs_per_token(state_dir: Path) -> None:
    async with running_daemon(state_dir) as h:
        first = await Wait(h.client).create_token()
        second = await Wait(h.client).create_token()
        assert first.url != second.url and first.url.startswith("http+unix://")
    async with running_daemon(state_dir) as h:
        assert (await Wait(h.client).retrieve_token(first.id)).url == first.url
    assert (state_dir / "callback.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("body", [b"", b"  "])
async def test_an_empty_body_completes_with_null(state_dir: Path, body: bytes) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with running_daemon(state_dir, tcp=address) as h:
        token = await Wait(h.client).create_token()
        status, info = await asyncio.to_thread(post, token.url, body)
        assert status == 200 and info["status"] == "COMPLETED" and info["output"] is None


@pytest.mark.parametrize("secret", ["k%C3%A9y", "%F0%9F%94%91", "wrong"])
async def test_a_wrong_secret_is_a_404_not_a_server_error(state_dir: Path, secret: str) -> None:
    # Found by schemathesis: a non-ASCII secret made hmac.compare_digest raise (a 500).
    address = f"127.0.0.1:{free_port()}"
    async with running_daemon(state_dir, tcp=address) as h:
        token = await Wait(h.client).create_token()
        url = token.url.rsplit("/", 1)[0] + "/" + secret
        status, info = await asyncio.to_thread(post, url, b"1")
        assert status == 404, info
        assert (await Wait(h.client).retrieve_token(token.id)).status == "WAITING"
