"""Fixtures of the dashboard tests: a real daemon with a few tasks, and the app driven by Pilot."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Harness, make_archive
from textual.pilot import Pilot

from ember import ClientSettings
from ember.tui import EmberApp

TASKS = {
    "tasks/__init__.py": "",
    "tasks/shop.py": """
        import asyncio
        from pathlib import Path
        from ember import Context, Queue, Retry, logger, task

        emails = Queue("emails", concurrency_limit=2)

        @task(id="echo", queue=emails)
        async def echo(payload: dict) -> dict:
            logger.info("echoing", keys=sorted(payload))
            return {"echo": payload}

        @task(id="charge", retry=Retry(max_attempts=1))
        async def charge(payload: dict) -> int:
            if payload.get("card") == "declined":
                raise ValueError("card declined by the bank")
            return payload.get("cents", 0)

        @task(id="flaky", retry=Retry(max_attempts=2, min_timeout_s=0.05, randomize=False))
        async def flaky(payload: dict, ctx: Context) -> int:
            if ctx.attempt == 1:
                raise TimeoutError("upstream timed out")
            return ctx.attempt

        @task(id="steps")
        async def steps(payload: dict) -> str:
            # Logs, then waits until the test creates the file named in the payload.
            logger.info("step one")
            gate = Path(payload["gate"])
            while not gate.exists():
                await asyncio.sleep(0.02)
            logger.warn("step two", gate=str(gate))
            return "done"
    """,
}

SIZE = (120, 40)


@dataclass
class Tui:
    """Builds apps pointed at the test daemon and waits for the screen to catch up."""

    harness: Harness
    tmp: Path

    def app(self, **options: Any) -> EmberApp:
        """An app on the test daemon's socket (live unless told otherwise)."""
        settings = ClientSettings(socket_path=self.harness.config.api_socket)
        return EmberApp(settings, **options)

    def gate(self, name: str = "gate") -> Path:
        """A path for the ``steps`` task to wait on; create it to let the run finish."""
        return self.tmp / name

    async def until(
        self, pilot: Pilot[Any], check: Callable[[], bool], timeout_s: float = 15.0
    ) -> None:
        """Let the app work until ``check`` holds; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen did not get there within {timeout_s}s")
            await pilot.pause(0.02)

    async def run(self, task_id: str, payload: Any = None, **options: Any) -> str:
        """Trigger a run and wait until it is final; returns its id."""
        run = await self.harness.run(task_id, payload, **options)
        return run.id


@pytest.fixture
async def tui(harness: Harness, tmp_path: Path) -> AsyncIterator[Tui]:
    """The test daemon with the shop tasks registered."""
    info = await harness.register(TASKS)
    assert info.status == "READY", info.error
    yield Tui(harness, tmp_path)
    await asyncio.sleep(0)


FROZEN_NOW = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)


def frozen_clock() -> datetime:
    """The clock of snapshot tests."""
    return FROZEN_NOW


def _load_seed() -> Any:
    # Test modules here cannot import their siblings by name (pytest's importlib mode).
    spec = importlib.util.spec_from_file_location(
        "ember_tui_seed", Path(__file__).with_name("seed.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


seed = _load_seed()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A daemon in a thread, on a store seeded with fixed runs, its clock frozen."""
    daemon = seed.ThreadedDaemon(tmp_path_factory.mktemp("snap") / "state", FROZEN_NOW, TASKS)
    daemon.start(make_archive)
    yield daemon
    daemon.stop()


@pytest.fixture
def seeded_app(seeded: Any) -> Callable[..., EmberApp]:
    """Apps on the seeded daemon with the frozen clock."""

    def build(**options: Any) -> EmberApp:
        settings = ClientSettings(socket_path=seeded.socket)
        return EmberApp(settings, clock=frozen_clock, **options)

    return build
