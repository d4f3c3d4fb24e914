"""Where CPU goes while the daemon drains: microseconds of CPU per run, daemon vs run processes.

    .venv/bin/python bench/drain_cpu.py [--n 5000]

Enqueues N no-op runs in batches of 1,000 (cheap to trigger, so the drain dominates), waits
for every result through the SDK, and reads the CPU time of the daemon and of its children
(the zygote and the run processes forked from it) before and after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from ember_bench import EmberPeer


def cpu_s(root: psutil.Process) -> tuple[float, float]:
    """CPU seconds of the daemon itself and of all its descendants."""
    own = sum(root.cpu_times()[:2])
    children = 0.0
    for child in root.children(recursive=True):
        try:
            children += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-drain-") as folder:
        peer = EmberPeer(Path(folder))
        peer.start_workers()
        try:
            for _ in range(run.WARMUP_ROUND_TRIPS * 4):
                peer.result(peer.enqueue(), run.RESULT_TIMEOUT_S)
            daemon = psutil.Process(peer.worker_pids()[0])
            before = cpu_s(daemon)
            started = time.perf_counter()
            handles = []
            for offset in range(0, args.n, 1000):
                handles += peer.enqueue_batch(min(1000, args.n - offset))
            for handle in handles:
                peer.result(handle, run.RESULT_TIMEOUT_S)
            seconds = time.perf_counter() - started
            after = cpu_s(daemon)
        finally:
            peer.stop_workers()
    print(f"{args.n} runs drained at {args.n / seconds:.0f} runs/s (batch enqueue included)")
    print(f"daemon CPU per run: {(after[0] - before[0]) / args.n * 1e6:.0f} us")
    print(f"zygote + run processes CPU per run: {(after[1] - before[1]) / args.n * 1e6:.0f} us")


if __name__ == "__main__":
    main()
