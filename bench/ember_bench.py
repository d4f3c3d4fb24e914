"""Ember's side of the benchmarks: one workload per call, its figures as JSON on the last line.

    python bench/ember_bench.py WORKLOAD [--n N] [--workdir DIR] [--concurrency C]

Workloads: ``trigger`` (sequential trigger latency), ``e2e`` (trigger to result of a no-op
task, sequential), ``throughput`` (N no-op runs enqueued, then drained), ``batch`` (N runs
enqueued in batches of 1,000). The daemon runs as its own process (``ember daemon``, uvloop)
with a fresh state directory, as a user would run it; this process is the client.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ember import Call, Client, ClientSettings, DaemonUnavailable, Tasks
from ember._types import Health, VersionInfo

NOOP_TASKS = """
from ember import task


@task(id="noop")
async def noop(payload: object) -> None:
    return None
"""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def archive() -> bytes:
    """A version with one no-op task."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in {
            "tasks/__init__.py": "",
            "tasks/noop.py": NOOP_TASKS,
            ".ember/manifest.json": '{"dirs": ["tasks"]}',
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class DaemonUnderTest:
    """``ember daemon`` in a child process on a fresh state directory."""

    def __init__(self, workdir: Path, concurrency: int) -> None:
        self.state = workdir / "state"
        self.socket = workdir / "ember.sock"
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the daemon process."""
        self.state.mkdir(parents=True, exist_ok=True)
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
                "--max-concurrent-runs",
                str(self.concurrency),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> Client:
        """Start the daemon, wait until it answers, and register the no-op version."""
        self.spawn()
        client = Client(ClientSettings(socket_path=self.socket))
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.request(Call("GET", "/healthz", Health))
                break
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        version = await client.request(
            Call("POST", "/api/v1/versions", VersionInfo, body=archive(), timeout_s=120)
        )
        if version.status != "READY":
            raise RuntimeError(f"the benchmark version failed to build: {version.error}")
        return client

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def drained(client: Client, timeout_s: float) -> None:
    """Wait until the daemon has no active run."""
    deadline = time.monotonic() + timeout_s
    while (await client.request(Call("GET", "/healthz", Health))).active_runs:
        if time.monotonic() > deadline:
            raise TimeoutError("runs still active after the benchmark's time limit")
        await asyncio.sleep(0.02)


async def timed(calls: int, fn: Callable[[], Awaitable[Any]], warmup: int = 50) -> list[float]:
    """Milliseconds of ``calls`` sequential awaits of ``fn`` after a warm-up."""
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def workload(name: str, n: int, client: Client) -> dict[str, Any]:
    """Run one workload and return its figures."""
    tasks = Tasks(client)
    if name == "trigger":
        samples = await timed(n, lambda: tasks.trigger("noop", None))
        await drained(client, 120)
        return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "n": n}
    if name == "e2e":

        async def round_trip() -> None:
            handle = await tasks.trigger("noop", None)
            await handle.result(timeout_s=30)

        samples = await timed(n, round_trip)
        return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "n": n}
    if name == "throughput":
        await timed(0, lambda: tasks.trigger("noop", None), warmup=50)
        await drained(client, 60)
        in_flight = asyncio.Semaphore(64)

        async def one() -> None:
            async with in_flight:
                await tasks.trigger("noop", None)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        enqueued = time.perf_counter()
        await drained(client, 600)
        done = time.perf_counter()
        return {
            "runs_per_s": n / (done - start),
            "enqueue_runs_per_s": n / (enqueued - start),
            "n": n,
        }
    if name == "batch":
        start = time.perf_counter()
        for offset in range(0, n, 1000):
            await tasks.batch_trigger([("noop", None)] * min(1000, n - offset))
        enqueued = time.perf_counter()
        await drained(client, 600)
        return {
            "enqueue_runs_per_s": n / (enqueued - start),
            "runs_per_s": n / (time.perf_counter() - start),
            "n": n,
        }
    raise SystemExit(f"unknown workload {name!r}: use trigger, e2e, throughput or batch")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=8, help="the daemon's run processes")
    args = parser.parse_args()
    defaults = {"trigger": 2000, "e2e": 1000, "throughput": 10_000, "batch": 10_000}
    n = args.n or defaults.get(args.workload, 1000)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ember-bench-"))
    daemon = DaemonUnderTest(workdir, args.concurrency)
    try:
        client = await daemon.start()
        figures = await workload(args.workload, n, client)
        await client.aclose()
    finally:
        daemon.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    print(json.dumps({"system": "ember", "workload": args.workload, **figures}))


if __name__ == "__main__":
    # The client side on uvloop too, as a service triggering runs would be.
    import uvloop

    uvloop.run(main())
