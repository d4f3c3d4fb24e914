"""A restart under each strategy: SIGTERM-to-exit time and what each executing run did.

    .venv/bin/python bench/restart_bench.py [--grace-s 2] [park replay criu]

For each strategy a fresh ``ember daemon`` process runs four ``memory`` tasks (from
tests/test_drain.py): two that can finish 0.5 s after SIGTERM and two that cannot within
the grace. It measures SIGTERM to exit, restarts the daemon, lets every run finish, and
reports each run's attempts, how many times its body started, and whether the random secret
it drew before the restart survived it (CRIU) or was drawn again (re-execution).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import eventually
from daemon_proc import first_life
from test_drain import TASKS, after_restart, ledger

from ember import Run, Tasks


def describe(run: Run, book: Path) -> str:
    events = [e for e in ledger(book) if e["run"] == run.id]
    starts = sum(1 for e in events if e["event"] == "start")
    output = run.output_as(dict) if run.output is not None else {}
    memory = "kept" if output.get("secret") == events[0]["secret"] else "drawn again"
    attempts = "+".join(a.status for a in run.attempts)
    return f"{attempts}, body started {starts}x, secret {memory}"


async def one(strategy: str, grace_s: float) -> str:
    root = Path(tempfile.mkdtemp(prefix=f"ember-restart-{strategy}-"))
    state = root / "state"
    state.mkdir()
    book, quick_gate, slow_gate = root / "ledger", root / "quick", root / "slow"
    flags = ("--checkpoint", strategy, "--shutdown-grace-s", f"{grace_s:g}")
    daemon, client = await first_life(state, flags, TASKS)
    tasks = Tasks(client)
    ids = []
    for gate in (quick_gate, quick_gate, slow_gate, slow_gate):
        ids.append((await tasks.trigger("memory", {"ledger": str(book), "gate": str(gate)})).id)
    await eventually(lambda: len({e["run"] for e in ledger(book)}) == 4, timeout_s=60)
    await client.aclose()
    sent = time.monotonic()
    daemon.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    quick_gate.touch()
    await asyncio.to_thread(daemon.wait_exit)
    exit_s = time.monotonic() - sent
    drained = next(line for line in daemon.output().splitlines() if "drained in" in line)
    runs = [await after_restart(state, flags, run_id, slow_gate) for run_id in ids]
    lines = [f"{strategy}: SIGTERM to exit {exit_s:.2f} s ({drained.split('INFO ')[1]})"]
    for label, run in zip(("quick", "quick", "slow", "slow"), runs, strict=True):
        lines.append(f"  {label}: {run.status.value}, {describe(run, book)}")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("strategies", nargs="*", default=["park", "replay", "criu"])
    parser.add_argument("--grace-s", type=float, default=2.0)
    args = parser.parse_args()
    for strategy in args.strategies:
        print(await one(strategy, args.grace_s), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
