"""Run metadata changed while runs execute: operations applied inside one write.

The read, the operations and the write back happen in one transaction of the single writer,
so operations from many runs on one run (children incrementing their parent) never race.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from ember._metadata import MetadataUpdate, Operation, apply, check_size

_json = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def _load(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT metadata FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        return None
    return _dict_decoder.decode(row[0]) if row[0] else {}


def apply_update(
    conn: sqlite3.Connection, run_id: str, update: MetadataUpdate, now: float
) -> dict[str, dict[str, Any]] | None:
    """Apply the operations to the run, its parent and its root; their new metadata by id.

    None when the run does not exist. A run without a parent drops ``parent_operations``; a
    run without a root is its own root.

    Raises:
        PayloadTooLarge: a run's metadata would be over 256 KB (nothing is written).
        BadRequest: an increment of something that is not a number.
    """
    row = conn.execute(
        "SELECT metadata, parent_run_id, root_run_id FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    if row is None:
        return None
    changed: dict[str, dict[str, Any]] = {run_id: _dict_decoder.decode(row[0]) if row[0] else {}}
    targets: tuple[tuple[str | None, list[Operation]], ...] = (
        (run_id, update.operations),
        (row[1], update.parent_operations),
        (row[2] or run_id, update.root_operations),
    )
    written: set[str] = set()
    for target, operations in targets:
        if target is None or not operations:
            continue
        data = changed.get(target)
        if data is None:
            data = _load(conn, target)
            if data is None:
                continue  # (the parent was pruned meanwhile)
            changed[target] = data
        for op in operations:
            apply(data, op)
        check_size(data, f"run {target}")
        written.add(target)
    conn.executemany(
        "UPDATE runs SET metadata = ?, updated_at = ? WHERE id = ?",
        [(_json.encode(changed[target]), now, target) for target in written],
    )
    return changed
