"""What the daemon's payload check costs per trigger, against msgspec decoding the same payload.

The baseline is what the run process does anyway (decode into the task's type); the ratio
says how much the check on the trigger path adds in its terms. Run:

    .venv/bin/python bench/schema_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from functools import partial

import msgspec

from ember.daemon.engine.payloads import check_payload


class Line(msgspec.Struct):
    sku: str
    qty: int
    note: str | None = None


class Order(msgspec.Struct):
    id: int
    email: str
    lines: list[Line]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()
    schema = msgspec.json.schema(Order)
    print("| lines | bytes | check µs | msgspec decode µs | check ÷ decode |")
    print("|---|---|---|---|---|")
    for lines in (1, 10, 100):
        order = {"id": 1, "email": "a@b.c", "lines": [{"sku": "s", "qty": i} for i in range(lines)]}
        payload = json.dumps(order).encode()
        assert check_payload(schema, payload) is None
        checks: list[float] = []
        decodes: list[float] = []
        for _ in range(args.rounds):  # alternately, so drift hits both alike
            checks.append(
                timeit.timeit(partial(check_payload, schema, payload), number=args.number)
            )
            decode = partial(msgspec.json.decode, payload, type=Order)
            decodes.append(timeit.timeit(decode, number=args.number))
        check_us = statistics.median(checks) / args.number * 1e6
        decode_us = statistics.median(decodes) / args.number * 1e6
        print(
            f"| {lines} | {len(payload)} | {check_us:.1f} | {decode_us:.2f} "
            f"| {check_us / decode_us:.1f}× |"
        )


if __name__ == "__main__":
    main()
