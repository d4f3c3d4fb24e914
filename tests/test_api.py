"""The HTTP API as a client sees it: bad input, limits, auth over TCP, OpenAPI."""

from __future__ import annotations

import gc
import socket
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from conftest import Harness, eventually, running_daemon

from ember import (
    BadRequest,
    Client,
    ClientSettings,
    DaemonUnavailable,
    NotFound,
    PayloadTooLarge,
    Runs,
    Tasks,
)
from ember.daemon.api.routes import ROUTES

TASKS = {
    "tasks/__init__.py": "",
    "tasks/t.py": """
        from ember import task

        @task(id="echo")
        async def echo(payload: dict) -> dict:
            return payload
    """,
}


@pytest.fixture
async def h(harness: Harness) -> Harness:
    await harness.register(TASKS)
    return harness


def raw_client(h: Harness) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(h.config.api_socket))
    return httpx.AsyncClient(transport=transport, base_url="http://ember")


async def run_count(h: Harness) -> int:
    return int(h.daemon.db.read_now(lambda c: c.execute("SELECT count(*) FROM runs").fetchone()[0]))


async def test_malformed_json_is_a_400_that_says_so(h: Harness) -> None:
    async with raw_client(h) as http:
        response = await http.post("/api/v1/tasks/echo/trigger", content=b'{"payload": ')
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
    assert await run_count(h) == 0


async def test_unknown_field_is_named(h: Harness) -> None:
    async with raw_client(h) as http:
        response = await http.post(
            "/api/v1/tasks/echo/trigger", json={"payload": {}, "options": {"delai": "1s"}}
        )
    assert response.status_code == 400
    assert "delai" in response.json()["error"]


async def test_wrong_type_names_the_field_path(h: Harness) -> None:
    async with raw_client(h) as http:
        response = await http.post(
            "/api/v1/tasks/echo/trigger", json={"payload": {}, "options": {"tags": [1]}}
        )
    assert response.status_code == 400
    assert "$.options.tags[0]" in response.json()["error"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"delay": "soon"}, "options.delay"),
        ({"ttl": "-5s"}, "options.ttl"),
        ({"tags": ["x"] * 11}, "options.tags"),
        ({"max_attempts": 0}, "options.max_attempts"),
        ({"idempotency_key": ""}, "options.idempotency_key"),
        ({"version": "19990101.1"}, "options.version"),
    ],
)
async def test_bad_options_are_refused_and_nothing_is_written(
    h: Harness, options: dict[str, Any], field: str
) -> None:
    with pytest.raises((BadRequest, NotFound)) as caught:
        await Tasks(h.client).trigger("echo", {}, **options)
    assert field in str(caught.value)
    assert await run_count(h) == 0


async def test_unknown_task_is_a_404_listing_the_known_ones(h: Harness) -> None:
    with pytest.raises(NotFound, match="known tasks: echo"):
        await Tasks(h.client).trigger("ecko", {})


async def test_oversized_payload_is_refused_before_anything_is_written(state_dir: Path) -> None:
    async with running_daemon(state_dir, max_payload_bytes=100_000) as h:
        await h.register(TASKS)
        with pytest.raises(PayloadTooLarge, match="over the limit"):
            await Tasks(h.client).trigger("echo", {"blob": "x" * 200_000})
        assert await run_count(h) == 0


async def test_a_bad_item_fails_the_whole_batch(h: Harness) -> None:
    with pytest.raises(BadRequest, match=r"items\[1\]\.options\.delay"):
        await Tasks(h.client).batch_trigger([("echo", {}), ("echo", {}, {"delay": "never"})])
    assert await run_count(h) == 0


async def test_unknown_run_is_a_404(h: Harness) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await Runs(h.client).retrieve("run_nope")


async def test_unknown_endpoints_and_methods_answer_json_errors(h: Harness) -> None:
    async with raw_client(h) as http:
        missing = await http.get("/api/v1/nope")
        wrong = await http.delete("/healthz")
        run = await http.get("/api/v3/runs/run_nope")
    assert missing.status_code == 404
    assert "GET /api/v1/nope" in missing.json()["error"]
    assert wrong.status_code == 405
    assert "DELETE is not allowed" in wrong.json()["error"]
    # A path parameter is matched and decoded: the run handler answers, not the router.
    assert run.status_code == 404
    assert "run_nope does not exist" in run.json()["error"]


async def test_trigger_before_any_version_waits_as_pending_version(harness: Harness) -> None:
    handle = await Tasks(harness.client).trigger("echo", {"x": 1})
    assert (await Runs(harness.client).retrieve(handle.id)).status.value == "PENDING_VERSION"
    await harness.register(TASKS)
    run = await harness.wait(handle.id)
    assert run.output_as() == {"x": 1}


async def test_no_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    client = Client(ClientSettings(socket_path=tmp_path / "missing.sock"))
    with pytest.raises(DaemonUnavailable, match="ember dev"):
        await Tasks(client).trigger("echo", {})
    with pytest.raises(DaemonUnavailable):
        Tasks(client).trigger_sync("echo", {})
    client.close()
    await client.aclose()
    gc.collect()  # a socket leaked on the failed connect would warn here, failing the test


async def test_event_stream_carries_run_changes_and_log_lines(state_dir: Path) -> None:
    import asyncio

    from ember import LogEvent, RunEvent

    async with running_daemon(state_dir) as h:
        await h.register(
            {
                "tasks/__init__.py": "",
                "tasks/t.py": """
                    from ember import logger, task

                    @task(id="talk")
                    async def talk(payload: dict) -> int:
                        logger.info("hello", n=1)
                        return 1
                """,
            }
        )
        seen: list[str] = []

        async def listen() -> None:
            async for event in h.client.events():
                if isinstance(event, RunEvent):
                    seen.append(event.run.status.value)
                    if event.run.status.is_final:
                        return
                elif isinstance(event, LogEvent):
                    seen.append(f"log:{event.line.message}")

        listener = asyncio.create_task(listen())
        await eventually(lambda: h.daemon.events.has_subscribers("dev"))
        await Tasks(h.client).trigger("talk", {})
        await asyncio.wait_for(listener, 20)
        assert seen == ["QUEUED", "EXECUTING", "log:hello", "COMPLETED"]


async def test_sync_twins_work_from_plain_threads(h: Harness) -> None:
    import asyncio

    def blocking() -> Any:
        handle = Tasks(h.client).trigger_sync("echo", {"sync": True})
        return handle.result_sync(timeout_s=20)

    assert await asyncio.to_thread(blocking) == {"sync": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_tcp_needs_the_api_key_of_its_environment(state_dir: Path) -> None:
    port = free_port()
    async with running_daemon(state_dir, tcp=f"127.0.0.1:{port}") as h:
        await h.register(TASKS)
        key = (state_dir / "dev.key").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/api/v1/runs")).status_code == 401
            wrong = {"authorization": "Bearer em_wrong"}
            assert (await http.get("/api/v1/runs", headers=wrong)).status_code == 401
            other_env = {"authorization": f"Bearer {key}", "x-ember-env": "prod"}
            assert (await http.get("/api/v1/runs", headers=other_env)).status_code == 403
        client = Client(ClientSettings(socket_path=Path("unused"), url=url, api_key=key))
        handle = await Tasks(client).trigger("echo", {"tcp": 1})
        assert await handle.result(timeout_s=20) == {"tcp": 1}
        await client.aclose()


async def test_openapi_lists_every_route_with_resolvable_schemas(h: Harness) -> None:
    async with raw_client(h) as http:
        document = (await http.get("/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    for route in ROUTES:
        path = route.path.replace(":path}", "}")
        assert route.method.lower() in document["paths"][path], route.path
    text = msgspec.json.encode(document).decode()
    for ref in {part.split('"')[0] for part in text.split('"$ref":"#/components/schemas/')[1:]}:
        assert ref in document["components"]["schemas"], ref


async def test_queue_pause_holds_runs_until_resumed(h: Harness) -> None:
    async with raw_client(h) as http:
        paused = await http.post("/api/v1/queues/task/echo/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        handle = await Tasks(h.client).trigger("echo", {"q": 1})
        import asyncio

        await asyncio.sleep(0.3)
        assert (await Runs(h.client).retrieve(handle.id)).status.value == "QUEUED"
        await http.post("/api/v1/queues/task/echo/resume")
    assert (await h.wait(handle.id)).output_as() == {"q": 1}
