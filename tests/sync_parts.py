"""Parts of the sync tests: a CA made in the test, a remote daemon process serving TLS on
loopback, a TCP proxy that cuts connections, and a local daemon forwarding ``prod`` to it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from conftest import Harness, make_archive, running_daemon
from test_durability import DaemonProcess, wait_ready

from ember import Call, Client, ClientSettings
from ember._admin_types import CreatedKey
from ember._types import VersionInfo
from ember.daemon.config import SyncTarget

TASKS = {
    "tasks/__init__.py": "",
    "tasks/prod.py": """
        import asyncio
        from ember import logger, task, wait

        @task(id="echo")
        async def echo(payload: dict) -> int:
            logger.info("echo", i=payload["i"])
            return payload["i"]

        @task(id="approve")
        async def approve(payload: dict) -> object:
            result = await wait.for_token(payload["token"])
            return result.unwrap()

        @task(id="slow")
        async def slow(payload: dict) -> int:
            await asyncio.sleep(120)
            return 1
    """,
}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Certificates:
    """A CA made for the test and a server certificate for 127.0.0.1 it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(folder: Path) -> Certificates:
    """Write a fresh CA and a loopback server certificate under ``folder``."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    certs = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    server.private_key_pem.write_to_path(str(certs.key_file))
    with open(certs.cert_file, "wb") as handle:
        for blob in server.cert_chain_pems:
            handle.write(blob.bytes())
    return certs


class RemoteDaemon(DaemonProcess):
    """``ember daemon --tcp --tls-cert --tls-key``: production, as a real child process."""

    def __init__(self, state: Path, port: int, certs: Certificates) -> None:
        state.mkdir(parents=True, exist_ok=True)
        super().__init__(state)
        self.port = port
        self.certs = certs
        self.key = ""  # a prod key, once set up

    @property
    def url(self) -> str:
        """Its HTTPS URL."""
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it (again, on the same state and port)."""
        log = open(self.state / "daemon.out", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.cli",
                "daemon",
                "--state-dir",
                str(self.state),
                "--socket",
                str(self.socket),
                "--tcp",
                f"127.0.0.1:{self.port}",
                "--tls-cert",
                str(self.certs.cert_file),
                "--tls-key",
                str(self.certs.key_file),
                "--max-concurrent-runs",
                "8",
                "--checkpoint",
                "park",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def owner(self, env: str = "prod") -> Client:
        """A client on its Unix socket (the owner's side)."""
        return Client(ClientSettings(socket_path=self.socket, env=env))

    async def ready(self) -> None:
        """Until it answers on its socket."""
        client = self.owner()
        try:
            await wait_ready(client)
        finally:
            await client.aclose()

    async def setup(self) -> str:
        """Deploy the tasks to prod and make a prod key; return the key."""
        client = self.owner()
        try:
            call = Call(
                "POST", "/api/v1/versions", VersionInfo, body=make_archive(TASKS), timeout_s=120
            )
            version = await client.request(call)
            assert version.status == "READY", version.error
            body = b'{"env": "prod", "name": "laptop"}'
            created = await client.request(Call("POST", "/api/v1/keys", CreatedKey, body=body))
        finally:
            await client.aclose()
        return created.key


@asynccontextmanager
async def production(tmp_path: Path) -> AsyncIterator[RemoteDaemon]:
    """A remote daemon with TLS from a fresh CA, the tasks deployed to prod, a prod key."""
    certs = make_certificates(tmp_path / "tls")
    remote = RemoteDaemon(tmp_path / "remote", free_port(), certs)
    remote.start()
    try:
        await remote.ready()
        remote.key = await remote.setup()
        yield remote
    finally:
        remote.stop()


@dataclass
class Proxy:
    """A TCP proxy to ``port``. With ``chaos`` it cuts connections at random, most harmfully
    as an answer comes back (the request was done; the client never hears it); with
    ``budget`` it cuts everything once that many bytes went upstream."""

    port: int
    chaos: bool = False
    budget: int | None = None
    seed: int = 14
    upstream_bytes: int = 0
    cuts: int = 0
    listen_port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._rng = random.Random(self.seed)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The URL to reach the upstream through the proxy."""
        return f"https://127.0.0.1:{self.listen_port}"

    def _cut(self) -> None:
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if upstream:
                    self.upstream_bytes += len(data)
                    if self.budget is not None and self.upstream_bytes > self.budget:
                        self._cut()
                        return
                elif self.chaos and self._rng.random() < 0.1:
                    # The answer is dropped: the request was done, the client never hears.
                    self.cuts += 1
                    break
                writer.write(data)
                await writer.drain()
        for end in pair:
            end.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.budget is not None and self.upstream_bytes > self.budget:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers |= set(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, pair, True),
                self._pipe(up_reader, writer, pair, False),
                return_exceptions=True,
            )
        finally:
            self._writers -= set(pair)

    async def close(self) -> None:
        """Stop listening and cut what is open."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()


@asynccontextmanager
async def forwarding_daemon(
    state: Path, url: str, key: str, certs: Certificates, **overrides: Any
) -> AsyncIterator[Harness]:
    """A local daemon (in this loop) forwarding ``prod`` to ``url``; its client is in prod."""
    target = SyncTarget(env="prod", profile="prod", url=url, api_key=key, ca_file=certs.ca_file)
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    async with running_daemon(state, sync=(target,), **overrides) as harness:
        original = harness.client
        harness.client = Client(ClientSettings(socket_path=harness.config.api_socket, env="prod"))
        try:
            yield harness
        finally:
            await harness.client.aclose()
            harness.client.close()
            harness.client = original
