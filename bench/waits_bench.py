"""Durable waits under each strategy: what N waiting runs hold, and how late they resume.

    .venv/bin/python bench/waits_bench.py [--n 1000] [--wait-s 60] [--strategies criu,park,replay]
        [--tmpfs-run]

For each strategy a fresh ``ember daemon`` (its own process, configured through
``[tool.ember]``) gets N runs that each wait until the same instant, W seconds after they
are triggered. A thread samples the processes and memory (PSS) of the daemon's tree every
second from the trigger to the last result. Reported per strategy: the lateness of each
resume after its deadline; the peak processes and PSS while the runs are held (CRIU: from
the end of the dump phase to the first restore; park and replay: from all waiting to the
deadline) and over the whole run; for CRIU the dump and restore times (p50/p99) the daemon
recorded in each run's history, the dump phase (first wait held to last image written), and
the images' size on disk (their folders and the shared bases, ``du``-style, divided by N,
at the moment most images exist). Also the CPU per run from the trigger to the last result:
the daemon's own, and the rest of its tree's (criu, which the daemon reaps, the zygotes, the
run processes). Prints a Markdown table and one JSON line per strategy.

``--tmpfs-run`` (root, util-linux ``unshare``) runs each daemon in a private mount namespace
with a tmpfs on ``/run``, as a systemd host has it: criu keeps its kernel-feature cache
(``/run/criu.kdat``) only there, and without it every dump and restore detects the kernel's
features again (~20 ms of criu CPU each on the 2-core VM whose ``/run`` is ext4). The mount
is the namespace's alone: the host's ``/run`` is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run
from drain_cpu import cpu_s
from ember_bench import register, start_daemon

from ember import Client, Run, Runs, Tasks


def count_waiting(runs: Runs) -> int:
    """WAITING runs, page by page (a page holds at most 1,000)."""
    count, cursor = 0, None
    while True:
        page = runs.list_sync(status="WAITING", limit=1000, cursor=cursor)
        count += len(page.data)
        if page.next_cursor is None:
            return count
        cursor = page.next_cursor


# Runs the daemon in a mount namespace of its own with a tmpfs /run (--tmpfs-run); `exec`
# keeps its PID the one the sampler follows. (util-linux unshare makes the mounts private.)
TMPFS_RUN = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$@"', "sh"]


def start_strategy(
    work: Path, strategy: str, parked: int, ahead: int, tmpfs_run: bool = False
) -> tuple[subprocess.Popen[bytes], Client]:
    """``ember daemon`` for one strategy, in a project folder holding its settings."""
    (work / "pyproject.toml").write_text(
        "[tool.ember]\n"
        f'checkpoint = "{strategy}"\n'
        "wait_park_threshold_s = 1.0\n"
        f"max_parked_processes = {parked}\n"
        f"max_restored_ahead = {ahead}\n"
        "max_concurrent_runs = 25\n"
    )
    process, client, health = start_daemon(
        work / "state", work / "ember.sock", cwd=work, prefix=TMPFS_RUN if tmpfs_run else ()
    )
    if health.checkpoint_strategy != strategy:
        process.terminate()
        process.wait()
        raise RuntimeError(
            f"asked for {strategy}, the daemon holds waits by {health.checkpoint_strategy}"
        )
    register(client)
    return process, client


class Sampler(threading.Thread):
    """The daemon tree's process count and PSS, once a second, with the time of each."""

    def __init__(self, pid: int, state: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.state = pid, state
        self.samples: list[tuple[float, int, float]] = []
        self.disk: tuple[int, int] = (0, 0)  # (most images seen, their bytes with the bases)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._once()
            except Exception as exc:  # (a sample lost is not the bench lost)
                print(f"sample failed: {exc!r}", file=sys.stderr)
                self.stopping.wait(1.0)

    def _once(self) -> None:
        started = time.time()
        procs, pss = sample(self.pid)
        self.samples.append((started, procs, pss))
        images = self.state / "checkpoints"
        if images.is_dir():
            count = len(list(images.glob("*/meta.json")))
            if count > self.disk[0]:
                self.disk = (
                    count,
                    disk_bytes(images) + disk_bytes(self.state / "checkpoint-bases"),
                )
        self.stopping.wait(max(0.0, 1.0 - (time.time() - started)))

    def peak(self, start: float, end: float) -> tuple[int, float]:
        """The most processes and PSS MiB sampled between two times (0s if none)."""
        inside = [(p, m) for t, p, m in self.samples if start <= t <= end]
        return (max((p for p, _ in inside), default=0), max((m for _, m in inside), default=0.0))


def disk_bytes(folder: Path) -> int:
    """What the files under a folder take on disk (allocated blocks; links counted once)."""
    seen, total = set(), 0
    # (os.walk skips what vanishes meanwhile: images are deleted as their runs resume)
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def measure(
    strategy: str, n: int, wait_s: float, ahead: int, tmpfs_run: bool = False, parked: int = -1
) -> dict[str, Any]:
    """One strategy: N runs waiting until the same instant."""
    with tempfile.TemporaryDirectory(prefix="ember-waits-") as folder:
        parked = n if parked < 0 else parked
        process, client = start_strategy(Path(folder), strategy, parked, ahead, tmpfs_run)
        sampler = Sampler(process.pid, Path(folder) / "state")
        try:
            tasks, runs = Tasks(client), Runs(client)
            sampler.start()
            daemon = psutil.Process(process.pid)
            cpu_before = tree_cpu_s(daemon)
            triggered_at = time.time()
            deadline_at = triggered_at + wait_s
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
            all_waiting_at = time.time()
            results = [h.result_sync(timeout_s=wait_s + 600) for h in handles]
            cpu_after = tree_cpu_s(daemon)
            sampler.stopping.set()
            sampler.join()
            lateness = [(resumed - deadline) * 1000 for deadline, resumed in results]
            details = [runs.retrieve_sync(h.id) for h in handles]
            figures: dict[str, Any] = {
                "strategy": strategy,
                "n": n,
                "wait_s": wait_s,
                "tmpfs_run": tmpfs_run,
                "all_waiting_at_deadline": waiting >= n,
                "lateness_p50_ms": round(run.percentile(lateness, 50), 1),
                "lateness_p99_ms": round(run.percentile(lateness, 99), 1),
                "lateness_max_ms": round(max(lateness), 1),
                "daemon_cpu_ms_per_run": round((cpu_after[0] - cpu_before[0]) / n * 1000, 1),
                "others_cpu_ms_per_run": round((cpu_after[1] - cpu_before[1]) / n * 1000, 1),
            }
            figures.update(resume_parts(details, deadline_at))
            held_from, held_to = all_waiting_at, deadline_at
            if strategy == "criu":
                costs = checkpoint_costs(details, deadline_at)
                held_from, held_to = costs.pop("_held_from"), costs.pop("_held_to")
                images, size = sampler.disk
                costs["disk_mb_per_image"] = round(size / max(images, 1) / 1e6, 3)
                costs["images_at_disk_sample"] = images
                figures.update(costs)
            figures["held_procs"], figures["held_pss_mb"] = sampler.peak(held_from, held_to)
            figures["peak_procs"], figures["peak_pss_mb"] = sampler.peak(0, float("inf"))
            figures["held_window_s"] = round(max(0.0, held_to - held_from), 1)
            return figures
        finally:
            sampler.stopping.set()
            client.close()
            process.terminate()
            process.wait(60)


def tree_cpu_s(daemon: psutil.Process) -> tuple[float, float]:
    """CPU seconds of the daemon, and of the rest of its tree, criu commands it reaped too."""
    own, others = cpu_s(daemon)
    times = daemon.cpu_times()
    return own, others + times.children_user + times.children_system


def sample(pid: int) -> tuple[int, float]:
    """Count and PSS MiB of the daemon's tree; processes exiting meanwhile are left out."""
    root = psutil.Process(pid)
    pss = []
    for proc in (root, *root.children(recursive=True)):
        try:
            pss.append(proc.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return len(pss), round(sum(pss) / run.MIB, 1)


def resume_parts(details: list[Run], deadline_at: float) -> dict[str, float]:
    """Where the lateness goes: deadline → wait completed → resumed in a process → finished."""
    completed, resumed, finished = [], [], []
    for detail in details:
        times = {s.description: s.created_at.timestamp() for s in detail.snapshots}
        done = next((t for d, t in times.items() if d.endswith("completed; resuming")), None)
        back = next((t for d, t in times.items() if d.startswith(("resumed", "replay"))), None)
        if done is not None:
            completed.append((done - deadline_at) * 1000)
            if back is not None:
                resumed.append((back - done) * 1000)
                end = max(times.values())
                finished.append((end - back) * 1000)
    parts = {}
    for name, values in (
        ("completed_after", completed),
        ("resumed_after", resumed),
        ("finished_after", finished),
    ):
        if values:
            parts[f"{name}_p50_ms"] = round(run.percentile(values, 50), 1)
            parts[f"{name}_p99_ms"] = round(run.percentile(values, 99), 1)
    return parts


DUMPED = re.compile(r"checkpointed: ([\d.]+) MB in (\d+) ms")
RESTORED = re.compile(r"restored its process in (\d+) ms")


def checkpoint_costs(details: list[Run], deadline_at: float) -> dict[str, Any]:
    """Dump and restore times, image sizes and phases, from the runs' execution snapshots."""
    dumps, sizes, restores, fallbacks = [], [], [], 0
    undumped = {"park": 0, "replay": 0}
    held: list[datetime] = []
    dumped: list[datetime] = []
    restore_starts: list[float] = []
    restore_ends: list[float] = []
    for detail in details:
        for snap in detail.snapshots:
            if snap.description.endswith("held by checkpoint"):
                held.append(snap.created_at)
            elif m := DUMPED.match(snap.description):
                sizes.append(float(m.group(1)))
                dumps.append(float(m.group(2)))
                dumped.append(snap.created_at)
            elif m := RESTORED.match(snap.description):
                restores.append(float(m.group(1)))
                restore_starts.append(snap.created_at.timestamp() - float(m.group(1)) / 1000)
                restore_ends.append(snap.created_at.timestamp())
            elif "held by park instead" in snap.description or "replay instead" in snap.description:
                fallbacks += 1
            elif snap.description.startswith("not checkpointed:"):
                undumped[snap.description.rsplit(" ", 1)[-1]] += 1
    first_held = min(held).timestamp() if held else 0.0
    last_dumped = max(dumped).timestamp() if dumped else 0.0
    first_restore = min(restore_starts) if restore_starts else last_dumped
    return {
        "dumped": len(dumps),
        "fallbacks": fallbacks,
        # Waits a dump could not hold in time (its restore would be late): kept by these.
        "undumped_parked": undumped["park"],
        "undumped_replayed": undumped["replay"],
        "dump_phase_s": round(last_dumped - first_held, 1),
        "dump_p50_ms": run.percentile(dumps, 50) if dumps else -1,
        "dump_p99_ms": run.percentile(dumps, 99) if dumps else -1,
        "restore_p50_ms": run.percentile(restores, 50) if restores else -1,
        "restore_p99_ms": run.percentile(restores, 99) if restores else -1,
        "image_mb_p50": run.percentile(sizes, 50) if sizes else -1,
        # The restores, from the deadline (negative: before it).
        "restores_from_s": round(first_restore - deadline_at, 1),
        "restores_to_s": round(max(restore_ends, default=deadline_at) - deadline_at, 1),
        "_held_from": last_dumped,
        "_held_to": first_restore,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--wait-s", type=float, default=60.0)
    parser.add_argument("--strategies", default="criu,park,replay")
    parser.add_argument("--restored-ahead", type=int, default=100, help="max_restored_ahead")
    parser.add_argument(
        "--max-parked",
        type=int,
        default=-1,
        help="max_parked_processes (default N: every run a CRIU dump cannot hold in time parks)",
    )
    parser.add_argument(
        "--tmpfs-run",
        action="store_true",
        help="run each daemon in a private mount namespace with a tmpfs /run (as systemd has it)",
    )
    args = parser.parse_args()
    rows = []
    for strategy in args.strategies.split(","):
        try:
            rows.append(
                measure(
                    strategy,
                    args.n,
                    args.wait_s,
                    args.restored_ahead,
                    args.tmpfs_run,
                    args.max_parked,
                )
            )
        except RuntimeError as exc:
            rows.append({"strategy": strategy, "error": str(exc)})
        print(json.dumps(rows[-1]), flush=True)
    where = " (daemon with a tmpfs /run)" if args.tmpfs_run else ""
    print(f"\n{args.n} runs each waiting {args.wait_s:.0f} s to the same instant{where}\n")
    print(
        "| strategy | held: procs / PSS MiB | peak: procs / PSS MiB | lateness p50 / p99 / max ms "
        "| dump phase s | dump p50 / p99 ms | restore p50 / p99 ms | disk MB per image "
        "| CPU ms per run: daemon / rest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['strategy']} | {r['error']} ||||||||")
            continue
        criu = r["strategy"] == "criu"
        print(
            f"| {r['strategy']} | {r['held_procs']} / {r['held_pss_mb']} | "
            f"{r['peak_procs']} / {r['peak_pss_mb']} | "
            f"{r['lateness_p50_ms']} / {r['lateness_p99_ms']} / {r['lateness_max_ms']} | "
            + (
                f"{r['dump_phase_s']} | {r['dump_p50_ms']:.0f} / {r['dump_p99_ms']:.0f} | "
                f"{r['restore_p50_ms']:.0f} / {r['restore_p99_ms']:.0f} | "
                f"{r['disk_mb_per_image']} |"
                if criu
                else "- | - | - | - |"
            )
            + f" {r['daemon_cpu_ms_per_run']} / {r['others_cpu_ms_per_run']} |"
        )


if __name__ == "__main__":
    main()
