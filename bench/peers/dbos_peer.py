"""DBOS Transact peer: SQLite system database, a queue of workflows with one no-op step.

Run with the peers' venv: ``python bench/peers/dbos_peer.py WORKLOAD [--n N] [--workdir DIR]``.
The workloads and the JSON printed on the last line are defined in ``bench/run.py``.

Execution model: DBOS is a library, not a broker plus workers. The application process that
enqueues also executes its queues, on threads, after ``DBOS.launch()``; that in-process model
is what this peer runs. "Starting the workers" is launching DBOS in this process, and the
processes holding waiting runs are this one. The cold start is the one exception, since it
must start a process: a fresh interpreter imports this module, launches DBOS on the existing
database and runs one workflow itself.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import sqlalchemy as sa
from dbos import DBOS, DBOSClient, EnqueueOptions, Queue, WorkflowHandle

# The shared harness is bench/run.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import RESULT_TIMEOUT_S, Peer, peer_main

QUEUE = "bench"
# Queue and result polling default to 1 s, which alone would dominate every latency figure;
# 10 ms and 1 ms favour DBOS's latency figures.
QUEUE_POLL_S = 0.01
RESULT_POLL_S = 0.001


@DBOS.step()
def noop_step() -> None:
    """The no-op step."""


@DBOS.workflow()
def noop() -> float:
    """No-op workflow: one no-op step; return the wall-clock time the workflow code started."""
    entered = time.time()
    noop_step()
    return entered


@DBOS.workflow()
def sleeper(seconds: float) -> list[float]:
    """Sleep durably for ``seconds``; return the deadline and the wall-clock time of resuming."""
    # DBOS.sleep checkpoints its own wake-up time; this deadline is that time to within µs.
    deadline = time.time() + seconds
    DBOS.sleep(seconds)
    return [deadline, time.time()]


def launch(url: str) -> Queue:
    """Configure and launch DBOS in this process on ``url``; return the bench queue."""
    DBOS(config={"name": "bench", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()
    return DBOS.register_queue(QUEUE, polling_interval_sec=QUEUE_POLL_S)


def cold_child(url: str) -> None:
    """Body of the cold-start process: launch, run one workflow, print the time of its result."""
    handle = launch(url).enqueue(noop)
    handle.get_result(polling_interval_sec=RESULT_POLL_S)
    print(time.time(), flush=True)
    DBOS.destroy()


class DbosPeer(Peer):
    """DBOS launched in this process: enqueue onto its queue, which its own threads execute."""

    system = "dbos"
    version = f"dbos {version('dbos')}, SQLAlchemy {version('sqlalchemy')}"
    setup = (
        "in-process executor (DBOS's model) on a SQLite system database, set to WAL; "
        "queue poll 10 ms and result poll 1 ms (defaults 1 s)"
    )
    workload_notes: ClassVar[Mapping[str, str]] = {
        "batch": "DBOSClient.enqueue_in_transaction, 1,000 per SQLite transaction",
        "wait": "DBOS.sleep(2) inside the workflow; procs/RSS = the application process",
        "cold": "new process: interpreter start, import, DBOS.launch on an existing database",
        "throughput": "held by DBOS.destroy(), enqueued meanwhile with DBOSClient.enqueue",
    }

    def __init__(self, scratch: Path) -> None:
        db = scratch / "dbos.sqlite"
        self.url = f"sqlite:///{db}"
        # DBOS leaves SQLite in rollback-journal mode. WAL (kept in the file once set) is what
        # a SQLite deployment would use, and what Huey and Ember use; it favours DBOS.
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        self.queue: Queue | None = None
        self.client: DBOSClient | None = None
        self.engine: sa.Engine | None = None

    def start_workers(self) -> None:
        self.queue = launch(self.url)
        self.client = DBOSClient(system_database_url=self.url)
        self.engine = sa.create_engine(self.url, connect_args={"timeout": RESULT_TIMEOUT_S})

    def stop_workers(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self.client is not None:
            self.client.destroy()
        DBOS.destroy()
        self.queue = self.client = self.engine = None

    def worker_pids(self) -> list[int]:
        return [os.getpid()]

    def hold(self) -> None:
        # The executor stops; the client stays, as an application enqueueing elsewhere would.
        DBOS.destroy()
        self.queue = None

    def release(self) -> None:
        self.queue = launch(self.url)

    def enqueue(self) -> WorkflowHandle[float]:
        if self.queue is None:  # held: enqueue through the client, with no executor running
            assert self.client is not None, "workers not started"
            return self.client.enqueue({"queue_name": QUEUE, "workflow_name": "noop"})
        return self.queue.enqueue(noop)

    def enqueue_batch(self, size: int) -> list[WorkflowHandle[float]]:
        assert self.client is not None, "workers not started"
        assert self.engine is not None, "workers not started"
        options: EnqueueOptions = {"queue_name": QUEUE, "workflow_name": "noop"}
        with self.engine.begin() as conn:
            return [self.client.enqueue_in_transaction(conn, options) for _ in range(size)]

    def enqueue_sleeper(self, seconds: float) -> WorkflowHandle[list[float]]:
        assert self.queue is not None, "workers not started"
        return self.queue.enqueue(sleeper, seconds)

    def result(self, handle: WorkflowHandle[object], timeout_s: float) -> object:
        # get_result takes no timeout; the harness's abort alarm bounds the wait instead.
        return handle.get_result(polling_interval_sec=RESULT_POLL_S)

    def cold_start_s(self) -> float:
        # Create and migrate the database first: a cold start restarts an existing application.
        launch(self.url)
        DBOS.destroy()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        code = "import sys, dbos_peer; dbos_peer.cold_child(sys.argv[1])"
        started = time.time()  # Wall clock: compared with the child's time.time().
        child = subprocess.run(
            [sys.executable, "-c", code, self.url],
            env=env,
            capture_output=True,
            timeout=RESULT_TIMEOUT_S,
            check=True,
        )
        return float(child.stdout.decode().split()[-1]) - started


if __name__ == "__main__":
    peer_main(DbosPeer, __doc__.splitlines()[0])
