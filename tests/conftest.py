"""Shared fixtures: real daemons on temporary sockets, real SQLite files, real run processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ember import Client, ClientSettings, Run
from ember._types import VersionInfo
from ember.daemon import Daemon, DaemonConfig, loop_factory


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``criu`` run on both loops; the others on asyncio's own.

    ``ember daemon`` runs on uvloop, whose subprocess API differs from asyncio's (it refuses a
    ``umask`` argument): the checkpoint path broke there while every in-process test passed.
    """
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    uvloop = loop_factory()
    if uvloop is not None and item.get_closest_marker("criu") is not None:
        factories["uvloop"] = uvloop
    return factories


def make_archive(files: dict[str, str], dirs: tuple[str, ...] = ("tasks",)) -> bytes:
    """A version archive as `ember dev` sends it: the files plus the manifest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        entries = dict(files)
        entries[".ember/manifest.json"] = json.dumps({"dirs": list(dirs)})
        for name, text in sorted(entries.items()):
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float = 20.0,
    interval_s: float = 0.02,
) -> None:
    """Poll ``check`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


def ember_cli(h: Harness, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``ember`` command against the harness's daemon, as a user types it."""
    env = {**os.environ, "EMBER_SOCKET": str(h.config.api_socket), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@dataclass
class Harness:
    """A running daemon and a client pointed at it."""

    daemon: Daemon
    client: Client
    config: DaemonConfig

    async def register(
        self, files: dict[str, str], env: str = "dev", promote: bool = True
    ) -> VersionInfo:
        """Register a version made of these files (paths relative to the project root)."""
        return await self.daemon.register_version(env, make_archive(files), promote=promote)

    async def run(
        self, task_id: str, payload: Any = None, timeout_s: float = 30.0, **options: Any
    ) -> Run:
        """Trigger a run and wait until it is final."""
        from ember import Tasks

        handle = await Tasks(self.client).trigger(task_id, payload, **options)
        return await self.wait(handle.id, timeout_s)

    async def wait(self, run_id: str, timeout_s: float = 30.0) -> Run:
        """Wait until a run is final."""
        from ember import Runs

        run = await Runs(self.client).poll(run_id, timeout_s=timeout_s)
        assert run.is_final, f"{run_id} still {run.status} after {timeout_s}s"
        return run


class Clock:
    """A clock that advances in real time and can be set, like a wall clock that jumps.

    Give it to ``running_daemon(clock=...)``: every timestamp and timer of the daemon reads it.
    """

    def __init__(self, moment: datetime | None = None) -> None:
        self._offset = 0.0
        if moment is not None:
            self.set(moment)

    def set(self, moment: datetime) -> None:
        """Jump to ``moment`` (then go on in real time)."""
        self._offset = moment.timestamp() - time.time()

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` ahead."""
        self._offset += seconds

    def __call__(self) -> float:
        return time.time() + self._offset


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on a free local port, served from a thread, closed at the end."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A fresh state directory."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can reach, as /run is (tmp_path sits in root's 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="ember-open-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running_daemon(
    state_dir: Path, clock: Callable[[], float] = time.time, **overrides: Any
) -> AsyncIterator[Harness]:
    """Start a daemon in this event loop; stop it and close its client at the end."""
    overrides.setdefault("socket_path", state_dir / "api.sock")
    config = DaemonConfig(state_dir=state_dir, **overrides)
    daemon = Daemon(config, clock=clock)
    await daemon.start()
    client = Client(ClientSettings(socket_path=config.api_socket))
    try:
        yield Harness(daemon, client, config)
    finally:
        await client.aclose()
        client.close()
        await daemon.stop()


@pytest.fixture
async def harness(state_dir: Path) -> AsyncIterator[Harness]:
    """A daemon with default settings and fast timeouts."""
    async with running_daemon(state_dir, cancel_grace_s=1.0, process_idle_s=30.0) as h:
        yield h
