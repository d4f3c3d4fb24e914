"""Queues and batches: the enqueue rate of one 25,000-item batch, and the rate limiter's cost.

    .venv/bin/python bench/queues_bench.py [--batch 25000] [--n 3000] [--rounds 1]

``--batch 0`` or ``--n 0`` skips a part (``--batch 0 --n 3000 --rounds 4``: 25 s here).

- batch: one batch of N items (created, then streamed in chunks of 1,000, one commit each)
  against the same items as N / 1,000 separate one-call batches; items/s from the client's
  first call to its last answer, with the task's queue paused (then drained between rounds).
- rate limit: N no-op runs drained from a queue without a rate limit and from one whose limit
  (10^9 per minute) is never reached, alternately: runs/s from the runs' own times, and the
  daemon's CPU per run (``bench/drain_cpu.py``'s measure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from drain_cpu import one_drain
from ember_bench import EmberPeer

from ember import Batches, Queues, RunHandle, Tasks


def batch_rate(peer: EmberPeer, n: int, chunked: bool) -> float:
    """Items/s enqueueing n no-op runs as one batch, or as separate batches of 1,000."""
    client = peer._client
    queues = Queues(client)
    queues.pause_sync("task/noop")
    items = [("noop", None)] * n
    started = time.perf_counter()
    made: list[RunHandle[Any]] = []
    if chunked:
        made = Batches(client).trigger_sync(items)
    else:
        for offset in range(0, n, run.BATCH_SIZE):
            made += Tasks(client).batch_trigger_sync(items[offset : offset + run.BATCH_SIZE])
    took = time.perf_counter() - started
    assert len(made) == n
    queues.resume_sync("task/noop")
    peer.result(made[-1], run.RESULT_TIMEOUT_S)
    return n / took


class TargetPeer(EmberPeer):
    """Ember whose held-and-drained workload is the runs of ``target``: (task, queue)."""

    target = ("noop", "task/noop")

    def hold(self) -> None:
        Queues(self._client).pause_sync(self.target[1])

    def release(self) -> None:
        Queues(self._client).resume_sync(self.target[1])

    def enqueue_batch(self, size: int) -> list[RunHandle[Any]]:
        return Tasks(self._client).batch_trigger_sync([(self.target[0], None)] * size)


def drain(
    peer: TargetPeer, daemon: psutil.Process, task_id: str, queue: str, n: int
) -> tuple[float, float]:
    """Drain n runs of a task; return runs/s and the daemon's CPU µs per run."""
    peer.target = (task_id, queue)
    rate, own, _ = one_drain(peer, daemon, n)
    return rate, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=25_000)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-queues-") as folder:
        peer = TargetPeer(Path(folder))
        peer.start_workers()
        try:
            for _ in range(run.WARMUP_ROUND_TRIPS * 4):
                peer.result(peer.enqueue(), run.RESULT_TIMEOUT_S)
            daemon = psutil.Process(peer.worker_pids()[0])
            for number in range(1, args.rounds + 1):
                if args.batch:
                    one = batch_rate(peer, args.batch, chunked=True)
                    many = batch_rate(peer, args.batch, chunked=False)
                    print(
                        f"round {number}: {args.batch:,} items as one batch {one:,.0f} items/s;"
                        f" as {args.batch // run.BATCH_SIZE} batches of 1,000 {many:,.0f} "
                        f"items/s (one ÷ many {one / many:.2f})"
                    )
                if not args.n:
                    continue
                # Alternate which goes first: the second drain of a round runs warmer.
                if number % 2:
                    plain = drain(peer, daemon, "noop", "task/noop", args.n)
                    rated = drain(peer, daemon, "noop-rated", "rated", args.n)
                else:
                    rated = drain(peer, daemon, "noop-rated", "rated", args.n)
                    plain = drain(peer, daemon, "noop", "task/noop", args.n)
                print(
                    f"round {number}: drain of {args.n:,}: no limit {plain[0]:,.0f} runs/s, "
                    f"daemon {plain[1]:.0f} us/run; limit 10^9/min {rated[0]:,.0f} runs/s, "
                    f"daemon {rated[1]:.0f} us/run (rated ÷ plain: rate {rated[0] / plain[0]:.2f}, "
                    f"CPU {rated[1] / plain[1]:.2f})"
                )
        finally:
            peer.stop_workers()


if __name__ == "__main__":
    main()
