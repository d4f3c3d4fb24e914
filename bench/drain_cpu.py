"""Where CPU goes while the daemon drains: microseconds of CPU per run, daemon vs run processes.

    .venv/bin/python bench/drain_cpu.py [--n 5000] [--rounds 3] [--no-tracing]

Pauses the task's queue, enqueues N no-op runs in batches of 1,000, resumes the queue and
waits for the last run, reading the CPU time of the daemon and of the processes under it
(the zygote, the run processes, and those already recycled and reaped) before and after.
The drain rate is taken from the runs' own start times, as in ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from ember_bench import EmberPeer


def cpu_s(root: psutil.Process) -> tuple[float, float]:
    """CPU seconds of the daemon itself, and of every process under it, living or reaped."""
    times = root.cpu_times()
    own = times.user + times.system
    others = 0.0
    for child in root.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        # A child's own time, and that of the children it reaped (recycled run processes).
        others += times.user + times.system + times.children_user + times.children_system
    return own, others


def one_drain(peer: EmberPeer, daemon: psutil.Process, n: int) -> tuple[float, float, float]:
    """Drain n runs; return runs/s, and daemon and run-process CPU µs per run."""
    peer.hold()
    handles = []
    for offset in range(0, n, run.BATCH_SIZE):
        handles += peer.enqueue_batch(min(run.BATCH_SIZE, n - offset))
    before = cpu_s(daemon)
    peer.release()
    peer.result(handles[-1], run.RESULT_TIMEOUT_S)
    after = cpu_s(daemon)
    starts = [peer.result(handle, run.RESULT_TIMEOUT_S) for handle in handles]
    return (
        (n - 1) / (max(starts) - min(starts)),
        (after[0] - before[0]) / n * 1e6,
        (after[1] - before[1]) / n * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-tracing", action="store_true", help="run processes record no spans")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-drain-") as folder:
        peer = EmberPeer(Path(folder), tracing=not args.no_tracing)
        peer.start_workers()
        try:
            for _ in range(run.WARMUP_ROUND_TRIPS * 4):
                peer.result(peer.enqueue(), run.RESULT_TIMEOUT_S)
            daemon = psutil.Process(peer.worker_pids()[0])
            for number in range(1, args.rounds + 1):
                rate, own, others = one_drain(peer, daemon, args.n)
                print(
                    f"round {number}: {args.n} runs drained at {rate:,.0f} runs/s; CPU per run:"
                    f" daemon {own:.0f} us, zygote and run processes {others:.0f} us"
                )
        finally:
            peer.stop_workers()


if __name__ == "__main__":
    main()
