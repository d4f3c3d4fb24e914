"""`@task` keeps the function's types: mypy checks what tests/typing/cases reveal and refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

CASES = Path(__file__).parent / "typing" / "cases"


@pytest.mark.parametrize("case", sorted(CASES.glob("*.py")), ids=lambda p: p.stem)
def test_mypy_agrees_with_the_expectations(case: Path) -> None:
    expected: dict[int, str] = {}
    for number, line in enumerate(case.read_text().splitlines(), start=1):
        if match := re.search(r"# (N|E): (.*)$", line):
            expected[number] = match.group(2).strip()
    stdout, _, _ = api.run(["--strict", "--no-incremental", "--show-error-codes", str(case)])
    found: dict[int, str] = {}
    for line in stdout.splitlines():
        # mypy prints the path relative to the working directory when it can.
        if match := re.match(rf"(?:.*/)?{re.escape(case.name)}:(\d+): (note|error): (.*)$", line):
            found.setdefault(int(match.group(1)), match.group(3).strip())
    assert expected, "a typing case must state what it expects"
    for number, text in expected.items():
        assert number in found, f"line {number}: mypy said nothing, expected {text!r}"
        assert text in found[number], f"line {number}: {found[number]!r} lacks {text!r}"
    unexpected = {n: t for n, t in found.items() if n not in expected}
    assert not unexpected, unexpected
