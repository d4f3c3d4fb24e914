"""Huey 3 peer: SqliteHuey, consumer with 2 worker processes (``-k process -w 2``), results on.

Run with the peers' venv: ``python bench/peers/huey_peer.py WORKLOAD [--n N] [--workdir DIR]``.
The workloads and the JSON printed on the last line are defined in ``bench/run.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

from huey import SqliteHuey
from huey.api import Result, TaskWrapper

# The shared harness is bench/run.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import Peer, peer_main, stop_process_tree

DB_ENV = "BENCH_HUEY_DB"
# Huey's consumer polls SQLite every 0.1 s by default and backs off to 10 s when idle, which
# would put up to seconds of sleep into every latency figure. A 10 ms poll capped at 100 ms
# favours Huey's latency; its scheduler (eta tasks) cannot tick faster than its 1 s minimum.
# -q logs warnings only, not a line per task (as Celery's -l WARNING).
CONSUMER_ARGS = ("-k", "process", "-w", "2", "-d", "0.01", "-m", "0.1", "-q")
# Result.get(blocking=True) polls with backoff from 50 ms; the driver polls every 1 ms instead.
RESULT_POLL_S = 0.001


def noop() -> float:
    """No-op task: return the wall-clock time its code started."""
    return time.time()


def sleeper(deadline: float) -> list[float]:
    """Task scheduled for ``deadline``: return it with the wall-clock time the task started."""
    return [deadline, time.time()]


def build_huey(db: Path) -> tuple[SqliteHuey, TaskWrapper, TaskWrapper]:
    """A Huey on ``db`` with the bench tasks registered."""
    huey = SqliteHuey("bench", filename=str(db))
    return huey, huey.task()(noop), huey.task()(sleeper)


# The consumer imports this module and runs ``huey_peer.huey``; only its environment sets DB_ENV.
if DB_ENV in os.environ:
    huey, _, _ = build_huey(Path(os.environ[DB_ENV]))


class HueyPeer(Peer):
    """Huey driven from this process, executed by a ``huey_consumer`` subprocess."""

    system = "huey"
    version = f"huey {version('huey')}"
    setup = (
        "SqliteHuey (WAL), huey_consumer -k process -w 2, results stored; "
        "consumer poll 10 ms (default 100 ms, backoff to 10 s); client polls results every 1 ms"
    )
    workload_notes: ClassVar[Mapping[str, str]] = {
        "batch": "no batch enqueue API (Task.map is a loop of single enqueues): sequential",
        "wait": (
            "no durable in-task sleep: task scheduled with eta = now + 2 s; Huey's scheduler "
            "checks due tasks once a second"
        ),
    }

    def __init__(self, scratch: Path) -> None:
        self.db = scratch / "huey.db"
        self.huey, self.noop, self.sleeper = build_huey(self.db)
        self.consumer: subprocess.Popen[bytes] | None = None

    def start_workers(self) -> None:
        env = {**os.environ, DB_ENV: str(self.db), "PYTHONPATH": str(Path(__file__).parent)}
        # The consumer's output goes to stderr, where the runner shows it if the run fails.
        self.consumer = subprocess.Popen(
            [sys.executable, "-m", "huey.bin.huey_consumer", "huey_peer.huey", *CONSUMER_ARGS],
            env=env,
            stdout=sys.stderr,
        )

    def stop_workers(self) -> None:
        if self.consumer is not None:
            # SIGINT is the consumer's graceful shutdown: running tasks finish first.
            stop_process_tree(self.consumer, signal.SIGINT)
            self.consumer = None

    def worker_pids(self) -> list[int]:
        return [self.consumer.pid] if self.consumer else []

    def enqueue(self) -> Result:
        return self.noop()

    def enqueue_sleeper(self, seconds: float) -> Result:
        deadline = time.time() + seconds
        return self.sleeper.schedule(args=(deadline,), eta=datetime.fromtimestamp(deadline, UTC))

    def result(self, handle: Result, timeout_s: float) -> object:
        return handle.get(blocking=True, timeout=timeout_s, backoff=1.0, max_delay=RESULT_POLL_S)


if __name__ == "__main__":
    # Huey registers a task as "<module>.<name>"; the consumer imports this file as huey_peer,
    # so the driver must use the tasks of that module rather than those of __main__.
    from huey_peer import HueyPeer as ImportedHueyPeer

    peer_main(ImportedHueyPeer, __doc__.splitlines()[0])
