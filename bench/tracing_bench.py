"""What tracing costs: e2e latency and drain throughput with spans on and off, side by side.

    .venv/bin/python bench/tracing_bench.py [--rounds 3] [--e2e 500] [--drain 3000]

Each round starts a daemon with tracing on and one with it off (the order alternates), and
measures on each the sequential trigger-and-wait p50 of a no-op task (``bench/run.py``'s e2e
driver) and the drain rate of N queued no-op runs with the CPU per run (``drain_cpu.py``), and
the median CPU of an attempt as its run process measured it (``attempts.cpu_s``: the attempt
alone, without the channel's reads and writes or a recycled process's fork).
With tracing on, every run records its attempt span (a no-op's is sent once, ended) and its
daemon stores it; the figures printed are the medians over the rounds, and off/on ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from drain_cpu import one_drain
from ember_bench import EmberPeer


def measure(tracing: bool, e2e_n: int, drain_n: int) -> dict[str, float]:
    """One daemon: e2e p50 (ms), drain runs/s, daemon and run-process CPU µs per run, and
    the median CPU µs of an attempt."""
    with tempfile.TemporaryDirectory(prefix="ember-tracing-") as folder:
        peer = EmberPeer(Path(folder), tracing=tracing)
        peer.start_workers()
        try:
            for _ in range(run.WARMUP_ROUND_TRIPS * 4):
                peer.result(peer.enqueue(), run.RESULT_TIMEOUT_S)
            e2e = run._drive_e2e(peer, e2e_n)
            daemon = psutil.Process(peer.worker_pids()[0])
            rate, own, others = one_drain(peer, daemon, drain_n)
        finally:
            peer.stop_workers()
        with contextlib.closing(sqlite3.connect(Path(folder) / "state" / "ember.db")) as db:
            cpus = [row[0] for row in db.execute("SELECT cpu_s FROM attempts WHERE cpu_s > 0")]
    return {
        "e2e_p50_ms": e2e["p50_ms"],
        "runs_per_s": rate,
        "daemon_us": own,
        "procs_us": others,
        "attempt_us": statistics.median(cpus) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e", type=int, default=500, help="sequential round trips")
    parser.add_argument("--drain", type=int, default=3000, help="runs drained")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for number in range(args.rounds):
        for tracing in (True, False) if number % 2 == 0 else (False, True):
            figures = measure(tracing, args.e2e, args.drain)
            results[tracing].append(figures)
            print(
                f"round {number + 1} tracing {'on ' if tracing else 'off'}: e2e p50 "
                f"{figures['e2e_p50_ms']:.2f} ms, drain {figures['runs_per_s']:,.0f} runs/s, "
                f"CPU/run daemon {figures['daemon_us']:.0f} us + processes "
                f"{figures['procs_us']:.0f} us, attempt {figures['attempt_us']:.0f} us",
                flush=True,
            )
    median = {
        tracing: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for tracing, rows in results.items()
    }
    on, off = median[True], median[False]
    print(
        f"median of {args.rounds}: e2e p50 {on['e2e_p50_ms']:.2f} ms on vs "
        f"{off['e2e_p50_ms']:.2f} ms off (x{on['e2e_p50_ms'] / off['e2e_p50_ms']:.2f}); drain "
        f"{on['runs_per_s']:,.0f} vs {off['runs_per_s']:,.0f} runs/s "
        f"(x{on['runs_per_s'] / off['runs_per_s']:.2f}); CPU/run "
        f"{on['daemon_us'] + on['procs_us']:.0f} vs {off['daemon_us'] + off['procs_us']:.0f} us; "
        f"attempt {on['attempt_us']:.0f} vs {off['attempt_us']:.0f} us"
    )


if __name__ == "__main__":
    main()
