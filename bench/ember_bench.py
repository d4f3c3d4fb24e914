"""Ember as a system under test of ``bench/run.py``: the same drivers time it and its peers.

    .venv/bin/python bench/ember_bench.py WORKLOAD [--n N] [--workdir DIR]

The daemon runs as its own process (``ember daemon``, uvloop) on a fresh state directory, as
a user runs it; this process is the client, through the SDK's blocking calls (the drivers
are synchronous, as for every peer).
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

from ember import Call, Client, ClientSettings, DaemonUnavailable, RunHandle, Tasks
from ember._types import Health, QueueInfo, VersionInfo
from ember.daemon.config import DaemonConfig
from ember.daemon.store.db import connect
from ember.daemon.store.schema import migrate

TASKS = """
import time
from ember import Queue, RateLimit, task, wait


@task(id="noop")
async def noop(payload: object) -> float:
    return time.time()


# The same no-op behind a rate limit no drain reaches: what the limiter itself costs.
@task(id="noop-rated", queue=Queue("rated", rate_limit=RateLimit(limit=10**9, period="1m")))
async def noop_rated(payload: object) -> float:
    return time.time()


@task(id="sleeper")
async def sleeper(payload: dict) -> list:
    deadline = payload["deadline"]
    await wait.for_(seconds=max(0.0, deadline - time.time()))
    return [deadline, time.time()]
"""


def archive() -> bytes:
    """A version with the benchmark's tasks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in {
            "tasks/__init__.py": "",
            "tasks/bench.py": TASKS,
            ".ember/manifest.json": '{"dirs": ["tasks"]}',
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def start_daemon(
    state: Path,
    socket: Path,
    *flags: str,
    cwd: Path | None = None,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], Client, Health]:
    """``ember daemon`` in its own process; returns once it answers, with its health.

    ``cwd`` is where it finds a ``pyproject.toml`` with ``[tool.ember]`` settings, if any;
    ``prefix`` a command that ends by exec-ing the daemon's (its PID stays the daemon's).
    """
    state.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "ember.cli",
            "daemon",
            "--state-dir",
            str(state),
            "--socket",
            str(socket),
            *flags,
        ],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Client(ClientSettings(socket_path=socket))
    deadline = time.monotonic() + 60
    while True:
        try:
            return process, client, client.request_sync(Call("GET", "/healthz", Health))
        except DaemonUnavailable:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.02)


def register(client: Client) -> None:
    """Register :func:`archive` as the current version.

    Raises:
        RuntimeError: it did not build.
    """
    version = client.request_sync(
        Call("POST", "/api/v1/versions", VersionInfo, body=archive(), timeout_s=120)
    )
    if version.status != "READY":
        raise RuntimeError(f"the benchmark version failed to build: {version.error}")


def write_runs(db_path: Path, columns: str, rows: Iterable[tuple[Any, ...]]) -> float:
    """Insert runs straight into a state database made with the daemon's own schema.

    The fast way to a store of a million runs; returns seconds taken.
    """
    started = time.perf_counter()
    conn = connect(db_path, "normal")
    migrate(conn)
    conn.execute("PRAGMA synchronous = OFF")
    statement = f"INSERT INTO runs ({columns}) VALUES ({','.join('?' * len(columns.split(',')))})"
    conn.execute("BEGIN")
    conn.executemany(statement, rows)  # streams the rows: a generator is never held whole
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


class EmberPeer(run.Peer):
    """Ember with its default settings, except the run processes, capped like the peers'."""

    system = "ember"
    PROCESSES = 4
    workload_notes = {  # noqa: RUF012 - read-only, as in run.Peer
        "cold": "daemon start + version registration (zygote imports the tasks) + first run; "
        "a run cannot be triggered before the daemon is up, since it is the broker",
        "throughput": "held by pausing the task's queue (the daemon is the broker, so it runs)",
    }

    def __init__(self, workdir: Path, checkpoint: str = "auto", tracing: bool = True) -> None:
        import ember

        self.version = ember.__version__
        self._workdir = workdir
        self._socket = workdir / "ember.sock"
        self._checkpoint = checkpoint
        self._tracing = tracing
        self._process: subprocess.Popen[bytes] | None = None
        self._client = Client(ClientSettings(socket_path=self._socket))
        self._tasks = Tasks(self._client)
        self.setup = (
            f"ember daemon (uvloop, SQLite WAL), max {self.PROCESSES} run processes forked from "
            f"a warm zygote, each recycled after {DaemonConfig().max_runs_per_process:,} runs, "
            f"checkpoint={checkpoint}, tracing {'on' if tracing else 'off'}; client: the SDK's "
            "blocking calls"
        )

    def start_workers(self) -> None:
        self._process, self._client, _ = start_daemon(
            self._workdir / "state",
            self._socket,
            "--max-concurrent-runs",
            str(self.PROCESSES),
            "--checkpoint",
            self._checkpoint,
            "--tracing" if self._tracing else "--no-tracing",
        )
        self._tasks = Tasks(self._client)
        register(self._client)

    def stop_workers(self) -> None:
        self._client.close()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def worker_pids(self) -> list[int]:
        return [self._process.pid] if self._process is not None else []

    def hold(self) -> None:
        self._client.request_sync(Call("POST", "/api/v1/queues/task/noop/pause", QueueInfo))

    def release(self) -> None:
        self._client.request_sync(Call("POST", "/api/v1/queues/task/noop/resume", QueueInfo))

    def enqueue(self) -> RunHandle[Any]:
        return self._tasks.trigger_sync("noop", None)

    def enqueue_sleeper(self, seconds: float) -> RunHandle[Any]:
        return self._tasks.trigger_sync("sleeper", {"deadline": time.time() + seconds})

    def enqueue_batch(self, size: int) -> list[RunHandle[Any]]:
        return self._tasks.batch_trigger_sync([("noop", None)] * size)

    def result(self, handle: RunHandle[Any], timeout_s: float) -> Any:
        return handle.result_sync(timeout_s)

    def cold_start_s(self) -> float:
        started = time.perf_counter()
        self.start_workers()
        try:
            self.result(self.enqueue(), run.RESULT_TIMEOUT_S)
            return time.perf_counter() - started
        finally:
            self.stop_workers()

    def close(self) -> None:
        self.stop_workers()


if __name__ == "__main__":
    run.peer_main(EmberPeer, __doc__ or "")
