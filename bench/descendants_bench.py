"""Finding what a run process started, with many processes on the host: psutil against ours.

    .venv/bin/python bench/descendants_bench.py [--n 2000]

Starts N sleeping processes (the rest of a busy host: parked run processes, say) and one
small tree (a shell with two children), then times, median of 30, psutil's recursive
``children()`` (it reads every process of the host for its parent) against
``procs.supervisor.exits._descendants`` (each thread's ``children`` list, along the tree).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable

import psutil

from ember.daemon.procs.supervisor.exits import _descendants


def median_ms(fn: Callable[[], object], rounds: int = 30) -> float:
    """The median wall time of ``fn`` in milliseconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="other processes on the host")
    args = parser.parse_args()
    others = [subprocess.Popen(["sleep", "120"]) for _ in range(args.n)]
    root = subprocess.Popen(["sh", "-c", "sleep 120 & sleep 120 & wait"])
    try:
        time.sleep(1)
        found = _descendants(root.pid)
        walked = [p.pid for p in psutil.Process(root.pid).children(recursive=True)]
        assert sorted(found) == sorted(walked), (found, walked)
        print(f"{len(psutil.pids())} processes on the host, a tree of {len(found)} below the root")
        slow = median_ms(lambda: psutil.Process(root.pid).children(recursive=True))
        fast = median_ms(lambda: _descendants(root.pid))
        print(f"psutil children(recursive=True): {slow:.2f} ms; _descendants: {fast:.3f} ms")
    finally:
        below = _descendants(root.pid)  # (before the kill: orphans leave the tree)
        for process in (*others, root):
            process.kill()
        for pid in below:
            psutil.Process(pid).kill()
        for process in (*others, root):
            process.wait()


if __name__ == "__main__":
    main()
