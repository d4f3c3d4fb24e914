"""What tracing costs the run process alone: an attempt's span, its records and its frame.

    .venv/bin/python bench/tracing_child_bench.py [--n 20000] [--rounds 3]

On a bare asyncio loop, each iteration does what ``child/worker.py`` does around an attempt:
open the attempt span and end it, take the spans for the attempt's ``Done`` and encode the
frames as the channel would. A no-op attempt never yields to the loop; one that
awaits once lets the batch's flush run meanwhile (what any I/O does). Tracing off runs the
same code with no provider installed (``attempt_span`` yields None). Prints CPU µs per
attempt, on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ember._runtime import Context
from ember.daemon.child import tracing
from ember.daemon.procs.protocol import Done, Message, encode

_TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def _context(number: int) -> Context:
    return Context(
        run_id=f"run_{number:020d}",
        task_id="noop",
        attempt=1,
        env="dev",
        version="20261202.1",
        tags=[],
    )


async def _attempts(n: int, awaits: bool) -> float:
    """CPU seconds for n attempts, as the run process executes them."""
    sent: list[bytes] = []

    def send(message: Message, *more: Message) -> None:
        sent.append(b"".join(map(encode, (message, *more))))

    tracing.bind(send, asyncio.get_running_loop())
    contexts = [_context(number) for number in range(n)]
    started = time.process_time()
    for context in contexts:
        with tracing.attempt_span(context, _TRACEPARENT):
            if awaits:
                await asyncio.sleep(0)  # the task's step ends: the batch's flush may run
        done = Done(run_id=context.run_id, attempt=1, ok=True, output=b"null")
        send(*tracing.take(), done)
        sent.clear()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[bool, bool], list[float]] = {}
    for tracing_on in (False, True):
        if tracing_on:
            tracing.install(True)
        for _ in range(args.rounds):
            for awaits in (False, True):
                cpu_s = asyncio.run(_attempts(args.n, awaits))
                results.setdefault((tracing_on, awaits), []).append(cpu_s / args.n * 1e6)
    for awaits in (False, True):
        off, on = (statistics.median(results[flag, awaits]) for flag in (False, True))
        rounds = ", ".join(f"{value:.1f}" for value in results[True, awaits])
        print(
            f"{'awaits once' if awaits else 'no-op'}: per attempt tracing on {on:.1f} us "
            f"(rounds {rounds}), off {off:.1f} us: tracing adds {on - off:.1f} us"
        )


if __name__ == "__main__":
    main()
