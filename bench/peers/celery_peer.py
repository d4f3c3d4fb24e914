"""Celery 5 peer: Redis broker and result backend, one prefork worker with concurrency 2.

Run with the peers' venv: ``python bench/peers/celery_peer.py WORKLOAD [--n N] [--workdir DIR]``
with ``BENCH_REDIS_URL`` naming a disposable Redis database: the peer flushes it when done.
The workloads and the JSON printed on the last line are defined in ``bench/run.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

from celery import Celery, group
from celery.result import AsyncResult
from redis import Redis

# The shared harness is bench/run.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import Peer, peer_main, stop_process_tree

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# One worker on one machine has nobody to synchronise with at start-up (mingle), to gossip with
# or to send heartbeats to; switching those off shortens start-up and spares the broker.
WORKER_ARGS = ("-P", "prefork", "-c", "2", "-l", "WARNING")
WORKER_FLAGS = ("--without-mingle", "--without-gossip", "--without-heartbeat")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.broker_connection_retry_on_startup = True


@app.task(name="bench.noop")
def noop() -> float:
    """No-op task: return the wall-clock time its code started."""
    return time.time()


@app.task(name="bench.sleeper")
def sleeper(deadline: float) -> list[float]:
    """Task with eta ``deadline``: return it with the wall-clock time the task started."""
    return [deadline, time.time()]


class CeleryPeer(Peer):
    """Celery driven from this process, executed by a ``celery worker`` subprocess."""

    system = "celery"
    version = f"celery {version('celery')}, redis-py {version('redis')}"
    setup = (
        "Redis broker + result backend, celery worker -P prefork -c 2 "
        "--without-mingle --without-gossip --without-heartbeat"
    )
    workload_notes: ClassVar[Mapping[str, str]] = {
        "batch": (
            "celery.group of 1,000 signatures, apply_async per batch (publishes one message "
            "per task)"
        ),
        "wait": (
            "no durable in-task sleep: apply_async with eta = now + 2 s, held in the worker's "
            "memory until due; procs/RSS include redis-server"
        ),
    }

    def __init__(self, scratch: Path) -> None:
        # Celery keeps everything in Redis, so the scratch directory stays empty.
        self.redis = Redis.from_url(REDIS_URL, socket_timeout=5)
        self.redis.ping()  # Fail fast with a clear error when Redis is not there.
        # A queue of our own, so messages left by an aborted earlier run are never consumed.
        self.queue = f"bench-{uuid.uuid4().hex[:12]}"
        app.conf.task_default_queue = self.queue
        self.worker: subprocess.Popen[bytes] | None = None

    def start_workers(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        argv = [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "-Q", self.queue]
        # The worker's output goes to stderr, where the runner shows it if the run fails.
        self.worker = subprocess.Popen(
            [*argv, *WORKER_ARGS, *WORKER_FLAGS], env=env, stdout=sys.stderr
        )

    def stop_workers(self) -> None:
        if self.worker is not None:
            # Shutdown is never measured, and Celery's warm shutdown alone takes ~2.5 s here.
            stop_process_tree(self.worker, signal.SIGKILL)
            self.worker = None

    def worker_pids(self) -> list[int]:
        # Waiting (eta) runs live in the worker and in Redis, so the broker counts too.
        redis_pid = int(self.redis.info("server")["process_id"])
        return [self.worker.pid, redis_pid] if self.worker else [redis_pid]

    def enqueue(self) -> AsyncResult:
        return noop.delay()

    def enqueue_batch(self, size: int) -> list[AsyncResult]:
        return list(group(noop.s() for _ in range(size)).apply_async().results)

    def enqueue_sleeper(self, seconds: float) -> AsyncResult:
        deadline = time.time() + seconds
        return sleeper.apply_async(args=(deadline,), eta=datetime.fromtimestamp(deadline, UTC))

    def result(self, handle: AsyncResult, timeout_s: float) -> object:
        return handle.get(timeout=timeout_s)

    def close(self) -> None:
        self.redis.flushdb()
        self.redis.close()


if __name__ == "__main__":
    peer_main(CeleryPeer, __doc__.splitlines()[0])
