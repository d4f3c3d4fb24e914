"""A trigger whose answer is lost is sent again by the SDK, and makes one run, not two."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from conftest import Harness

from ember import Client, ClientSettings, Runs, Tasks
from ember._types import REQUEST_KEY_HEADER

TASKS = {
    "tasks/__init__.py": "",
    "tasks/work.py": """
        from ember import task

        @task(id="work")
        async def work(payload: dict) -> int:
            return payload["i"]
    """,
}


class LosingProxy:
    """A Unix socket proxy to the daemon that can drop a connection once the daemon answered.

    The request reaches the daemon and is committed; its answer never reaches the client.
    """

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.drop_answers = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))

        async def upward() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                if self.drop_answers:
                    self.drop_answers -= 1
                    self.dropped += 1
                    return  # the daemon answered; the client never hears it
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()
        up_writer.close()


async def test_a_trigger_retried_after_a_lost_answer_makes_one_run(
    harness: Harness, tmp_path: Path
) -> None:
    await harness.register(TASKS)
    proxy = LosingProxy(harness.config.api_socket, tmp_path / "proxy.sock")
    await proxy.start()
    client = Client(ClientSettings(socket_path=proxy.path))
    runs = Runs(harness.client)
    try:
        proxy.drop_answers = 1
        handle = await Tasks(client).trigger("work", {"i": 7})
        assert proxy.dropped == 1
        assert await handle.result(30) == 7
        assert [r.id for r in (await runs.list(task="work")).data] == [handle.id]

        proxy.drop_answers = 1
        batch = await Tasks(client).batch_trigger([("work", {"i": i}) for i in range(3)])
        assert proxy.dropped == 2
        listed = (await runs.list(task="work")).data
        assert len(listed) == 4
        assert {r.id for r in listed} == {handle.id, *(b.id for b in batch)}

        # Blocking code retries the same way.
        proxy.drop_answers = 1
        sync_handle = await asyncio.to_thread(Tasks(client).trigger_sync, "work", {"i": 8})
        assert proxy.dropped == 3
        assert await sync_handle.result(30) == 8
        assert len((await runs.list(task="work")).data) == 5
    finally:
        await client.aclose()
        client.close()
        await proxy.close()


async def raw_trigger(socket: Path, key: str, body: bytes) -> dict:
    """POST a trigger on a connection of its own; the decoded answer."""
    reader, writer = await asyncio.open_unix_connection(str(socket))
    head = (
        "POST /api/v1/tasks/work/trigger HTTP/1.1\r\nhost: ember\r\nx-ember-env: dev\r\n"
        f"content-type: application/json\r\n{REQUEST_KEY_HEADER}: {key}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    answer = await reader.read()
    writer.close()
    status = answer.split(b" ", 2)[1]
    assert status == b"200", answer
    return dict(json.loads(answer.split(b"\r\n\r\n", 1)[1]))


async def test_the_daemon_answers_one_request_key_with_one_run(harness: Harness) -> None:
    await harness.register(TASKS)
    socket = harness.config.api_socket
    body = json.dumps({"payload": {"i": 1}, "options": {}}).encode()
    # The same request sent twice at once, and again later: one run, the same answer.
    first, second = await asyncio.gather(
        raw_trigger(socket, "key-1", body), raw_trigger(socket, "key-1", body)
    )
    third = await raw_trigger(socket, "key-1", body)
    other = await raw_trigger(socket, "key-2", body)
    assert first["id"] == second["id"] == third["id"] != other["id"]
    listed = (await Runs(harness.client).list(task="work")).data
    assert {r.id for r in listed} == {first["id"], other["id"]}
