"""JSON and tracebacks as highlighted text, coloured by the current theme."""

from __future__ import annotations

from typing import Any

import msgspec
from textual.content import Content
from textual.highlight import highlight


def pretty_json(raw: bytes | msgspec.Raw | Any) -> str:
    """Indented JSON text of raw JSON bytes or of a value."""
    data = bytes(raw) if isinstance(raw, (bytes, msgspec.Raw)) else msgspec.json.encode(raw)
    if not data:
        return "null"
    try:
        return msgspec.json.format(data, indent=2).decode()
    except msgspec.DecodeError:
        return data.decode(errors="replace")


def json_content(raw: bytes | msgspec.Raw | Any, max_lines: int = 400) -> Content:
    """Highlighted JSON; very long documents are cut with a note."""
    text = pretty_json(raw)
    lines = text.splitlines()
    if len(lines) > max_lines:
        text = "\n".join(lines[:max_lines]) + f"\n… {len(lines) - max_lines} more lines"
    return highlight(text, language="json")


# Frames of the run process itself, not of the task: shown folded, as Trigger.dev does.
_INTERNAL = ("/ember/daemon/", "/ember/_", "/concurrent/futures/", "/asyncio/")


def trim_stack(stack: str) -> str:
    """A traceback without the frames of Ember's run process and of asyncio's machinery."""
    out: list[str] = []
    hidden = 0
    skipping = False
    for line in stack.rstrip().splitlines():
        stripped = line.lstrip()
        if stripped.startswith('File "'):
            skipping = any(part in stripped for part in _INTERNAL)
            if skipping:
                hidden += 1
                continue
            if hidden:
                out.append(f"  … {hidden} frame{'s' if hidden > 1 else ''} of Ember hidden")
                hidden = 0
        elif skipping and line.startswith("    "):
            continue
        else:
            skipping = False
        out.append(line)
    return "\n".join(out)


def traceback_content(stack: str) -> Content:
    """A Python traceback, highlighted, with Ember's own frames folded."""
    return highlight(trim_stack(stack), language="pytb")
