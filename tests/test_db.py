"""The daemon's SQLite layer: group commit, and a bad write failing alone.

Real SQLite files, under both durabilities: ``normal`` commits on the event loop, ``fsync`` on
a writer thread; callers must not be able to tell the two apart.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.daemon.store.db import Database, Durability, connect
from ember.daemon.store.retention import BLOB_HOLDERS

DURABILITIES: tuple[Durability, ...] = ("normal", "fsync")


def _insert(value: int) -> Callable[[sqlite3.Connection], int]:
    """A write adding API key row ``k<value>``; it returns ``value``."""

    def write(conn: sqlite3.Connection) -> int:
        conn.execute(
            "INSERT INTO api_keys (key_hash, env, name, created_at) VALUES (?, ?, ?, ?)",
            (f"k{value}", "dev", "n", 0.0),
        )
        return value

    return write


def _wal_frames(path: Path) -> float:
    """Frames in the database's WAL (a page of 4 KiB and a 24-byte header each)."""
    return os.path.getsize(f"{path}-wal") / (4096 + 24)


def _stored(path: Path) -> set[str]:
    conn = connect(path, "normal", readonly=True)
    try:
        return {row[0] for row in conn.execute("SELECT key_hash FROM api_keys")}
    finally:
        conn.close()


@pytest.fixture(params=DURABILITIES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh database under each durability."""
    database = Database(tmp_path / "ember.db", request.param)
    yield database
    database.close()


async def test_a_write_is_committed_when_its_future_resolves(db: Database) -> None:
    assert await db.write(_insert(1)) == 1
    # Another connection sees it: the commit happened before the caller went on.
    assert _stored(db.path) == {"k1"}


async def test_a_failing_write_fails_alone_and_its_batch_commits(db: Database) -> None:
    # Issued in one loop iteration, so they share one transaction until a k2 conflicts.
    futures = [db.write(_insert(n)) for n in (1, 2, 2, 3)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 1
    assert results[3] == 3
    # Exactly one of the two k2 writes lost, with SQLite's own error.
    assert sorted(r for r in results[1:3] if isinstance(r, int)) == [2]
    assert sum(isinstance(r, sqlite3.IntegrityError) for r in results) == 1
    assert _stored(db.path) == {"k1", "k2", "k3"}


async def test_writes_of_one_loop_iteration_share_one_commit(db: Database) -> None:
    await db.write(_insert(0))
    before = _wal_frames(db.path)
    await asyncio.gather(*(db.write(_insert(n)) for n in range(1, 101)))
    # Every commit appends the pages it changed to the WAL: 100 commits would add at least
    # 100 frames, one commit adds a handful.
    assert 0 < _wal_frames(db.path) - before < 10
    assert len(_stored(db.path)) == 101


def _wal_resets(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time it rewinds."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


async def test_the_wal_rewinds_under_writes_that_never_pause(db: Database) -> None:
    # The checkpointer copies frames back on its thread while commits go on, so its copy is
    # never complete and SQLite would never rewind the WAL on its own: the file would grow
    # without end (515 MB in 7 s of writes here). Writes that never pause must see it rewind.
    await db.write(lambda c: c.execute("CREATE TABLE junk (k INTEGER PRIMARY KEY, v BLOB)"))
    first = _wal_resets(db.path)
    row = bytes(1000)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    k = 0
    while _wal_resets(db.path) == first:
        assert loop.time() < deadline, f"no rewind after {k} commits"
        rows = [((k * 50 + i) % 20_000, row) for i in range(50)]
        await db.write(lambda c, rows=rows: c.executemany("REPLACE INTO junk VALUES (?, ?)", rows))
        k += 1


def test_the_not_final_queries_use_the_partial_index(tmp_path: Path) -> None:
    # The index and the queries share one fragment derived from FINAL_STATUSES; SQLite uses a
    # partial index only when the query repeats its terms, so a drift here is a full scan.
    from ember._types import FINAL_STATUSES
    from ember.daemon.store import runs
    from ember.daemon.store.schema import NOT_FINAL

    assert all(f"'{status.value}'" in NOT_FINAL for status in FINAL_STATUSES)
    assert NOT_FINAL.count("'") == 2 * len(FINAL_STATUSES)
    Database(tmp_path / "ember.db", "normal").close()
    conn = connect(tmp_path / "ember.db", "normal", readonly=True)
    try:
        (index_sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'runs_active'"
        ).fetchone()
        assert index_sql.endswith(NOT_FINAL)
        # Columns beyond an index, as load_active reads them (`SELECT id` alone is covered by
        # runs_env_status_id, which the planner then prefers).
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM runs WHERE {NOT_FINAL} AND status != 'DELAYED'"
        ).fetchall()
        assert any("runs_active" in str(row[-1]) for row in plan), plan
        assert runs.open_children(conn, "run_x") == []
    finally:
        conn.close()


def test_every_foreign_key_and_blob_lookup_is_indexed(tmp_path: Path) -> None:
    # Deleting a run checks every table that refers to it; a foreign key without an index
    # leading with its column makes each deleted run scan that whole table (retention on
    # 100,000 runs stalled the loop 9 s a batch: bench/retention_bench.py).
    Database(tmp_path / "ember.db", "normal").close()
    conn = connect(tmp_path / "ember.db", "normal", readonly=True)
    try:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            for fk in conn.execute(f"PRAGMA foreign_key_list({table})").fetchall():
                column = fk[3]
                plan = conn.execute(
                    f"EXPLAIN QUERY PLAN SELECT 1 FROM {table} WHERE {column} = ?", ("x",)
                ).fetchall()
                assert all("SCAN" not in str(row[-1]) for row in plan), (table, column, plan)
        # Retention frees a blob only when no other run holds it.
        plan = conn.execute(f"EXPLAIN QUERY PLAN {BLOB_HOLDERS}", ("ref", "ref")).fetchall()
        assert all("SCAN" not in str(row[-1]) for row in plan), plan
    finally:
        conn.close()
