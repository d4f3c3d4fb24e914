"""Durable waits under each strategy: what N waiting runs hold, and how late they resume.

    .venv/bin/python bench/waits_bench.py [--n 1000] [--wait-s 45] [--strategies park,replay,criu]

For each strategy a fresh ``ember daemon`` (its own process, configured through
``[tool.ember]``) gets N runs that each wait W seconds. Once all are WAITING, it samples the
processes and memory of the daemon's tree; when they are done it reports the lateness of
each resume after its deadline, and for CRIU the dump and restore times and image sizes the
daemon recorded in each run's history. Prints a Markdown table and one JSON line per strategy.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from ember_bench import register, start_daemon

from ember import Client, Runs, Tasks


def count_waiting(runs: Runs) -> int:
    """WAITING runs, page by page (a page holds at most 1,000)."""
    count, cursor = 0, None
    while True:
        page = runs.list_sync(status="WAITING", limit=1000, cursor=cursor)
        count += len(page.data)
        if page.next_cursor is None:
            return count
        cursor = page.next_cursor


def start_strategy(work: Path, strategy: str, n: int) -> tuple[subprocess.Popen[bytes], Client]:
    """``ember daemon`` for one strategy, in a project folder holding its settings."""
    (work / "pyproject.toml").write_text(
        "[tool.ember]\n"
        f'checkpoint = "{strategy}"\n'
        "wait_park_threshold_s = 1.0\n"
        f"max_parked_processes = {n}\n"
        "max_concurrent_runs = 25\n"
    )
    process, client, health = start_daemon(work / "state", work / "ember.sock", cwd=work)
    if health.checkpoint_strategy != strategy:
        process.terminate()
        process.wait()
        raise RuntimeError(
            f"asked for {strategy}, the daemon holds waits by {health.checkpoint_strategy}"
        )
    register(client)
    return process, client


def measure(strategy: str, n: int, wait_s: float) -> dict[str, Any]:
    """One strategy: N runs waiting W seconds."""
    with tempfile.TemporaryDirectory(prefix="ember-waits-") as folder:
        process, client = start_strategy(Path(folder), strategy, n)
        try:
            tasks, runs = Tasks(client), Runs(client)
            deadline_at = time.time() + wait_s
            handles = [
                h
                for offset in range(0, n, 1000)
                for h in tasks.batch_trigger_sync(
                    [("sleeper", {"deadline": deadline_at})] * min(1000, n - offset)
                )
            ]
            while True:
                waiting = count_waiting(runs)
                if waiting >= n or time.time() > deadline_at - 0.5:
                    break
                time.sleep(0.2)
            if strategy == "criu":
                # WAITING is recorded before the dump, and processes are restored ahead of
                # their deadlines: sample when the most runs are held by images alone.
                images = Path(folder) / "state" / "checkpoints"
                most, footprint = len(list(images.glob("*/meta.json"))), sample(process.pid)
                while most < n and time.time() < deadline_at - 1.0:
                    time.sleep(0.2)
                    count = len(list(images.glob("*/meta.json")))
                    if count > most:
                        most, footprint = count, sample(process.pid)
                footprint["images_at_sample"] = most
            else:
                footprint = sample(process.pid)
            results = [h.result_sync(timeout_s=wait_s + 600) for h in handles]
            lateness = [(resumed - deadline) * 1000 for deadline, resumed in results]
            figures: dict[str, Any] = {
                "strategy": strategy,
                "n": n,
                "wait_s": wait_s,
                "all_waiting_at_sample": waiting >= n,
                "lateness_p50_ms": round(run.percentile(lateness, 50), 1),
                "lateness_p99_ms": round(run.percentile(lateness, 99), 1),
                "lateness_max_ms": round(max(lateness), 1),
                **footprint,
            }
            if strategy == "criu":
                figures.update(checkpoint_costs(runs, [h.id for h in handles[:50]]))
            return figures
        finally:
            client.close()
            process.terminate()
            process.wait(60)


def sample(pid: int) -> dict[str, float]:
    """Count, RSS and PSS of the daemon's tree; processes exiting meanwhile are left out."""
    import psutil

    root = psutil.Process(pid)
    memory = []
    for proc in (root, *root.children(recursive=True)):
        try:
            memory.append(proc.memory_full_info())
        except psutil.NoSuchProcess:
            continue
    return {
        "procs": len(memory),
        "rss_mb": round(sum(m.rss for m in memory) / run.MIB, 1),
        "pss_mb": round(sum(m.pss for m in memory) / run.MIB, 1),
    }


def checkpoint_costs(runs: Runs, run_ids: list[str]) -> dict[str, float]:
    """Dump and restore times and image sizes, from the runs' execution snapshots."""
    dumps, sizes, restores = [], [], []
    for run_id in run_ids:
        for snap in runs.retrieve_sync(run_id).snapshots:
            if m := re.match(r"checkpointed: ([\d.]+) MB in (\d+) ms", snap.description):
                sizes.append(float(m.group(1)))
                dumps.append(float(m.group(2)))
            elif m := re.match(r"restored its process in (\d+) ms", snap.description):
                restores.append(float(m.group(1)))
    return {
        "dump_p50_ms": statistics.median(dumps) if dumps else -1,
        "restore_p50_ms": statistics.median(restores) if restores else -1,
        "image_mb_p50": statistics.median(sizes) if sizes else -1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--wait-s", type=float, default=45.0)
    parser.add_argument("--strategies", default="park,replay,criu")
    args = parser.parse_args()
    rows = []
    for strategy in args.strategies.split(","):
        try:
            rows.append(measure(strategy, args.n, args.wait_s))
        except RuntimeError as exc:
            rows.append({"strategy": strategy, "error": str(exc)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.n} runs each waiting {args.wait_s:.0f} s, daemon tree sampled while all wait\n")
    print(
        "| strategy | processes | RSS MiB | PSS MiB | lateness p50 / p99 / max ms "
        "| dump p50 ms | restore p50 ms | image MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['strategy']} | {r['error']} |||||||")
            continue
        print(
            f"| {r['strategy']} | {r['procs']} | {r['rss_mb']} | {r['pss_mb']} | "
            f"{r['lateness_p50_ms']} / {r['lateness_p99_ms']} / {r['lateness_max_ms']} | "
            f"{r.get('dump_p50_ms', '-')} | {r.get('restore_p50_ms', '-')} | "
            f"{r.get('image_mb_p50', '-')} |"
        )


if __name__ == "__main__":
    main()
