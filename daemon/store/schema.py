"""The SQLite schema, migrated forward by ``PRAGMA user_version``.

Each entry of ``MIGRATIONS`` moves the schema one version up and runs in one transaction;
never edit a released migration, append a new one. The first seven are in
``schema_early.py``.
"""

from __future__ import annotations

import sqlite3

from ember.daemon.store.schema_early import EARLY, NOT_FINAL

__all__ = ["MIGRATIONS", "NOT_FINAL", "migrate"]

MIGRATIONS: list[str] = [
    *EARLY,
    # 8: sync with a remote daemon: the outbox of what is still to send (in order), the
    # mirror of the remote's runs (and of local runs not sent yet), and each environment's
    # cursor into the remote's event stream
    """
    CREATE TABLE sync_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        env TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at REAL NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX sync_outbox_env ON sync_outbox (env, seq);
    CREATE TABLE sync_runs (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        local_id TEXT UNIQUE,
        remote_id TEXT UNIQUE,
        task_id TEXT NOT NULL,
        status TEXT NOT NULL,
        idempotency_key TEXT,
        updated_at REAL NOT NULL,
        summary BLOB NOT NULL,
        run BLOB,
        logs BLOB,
        mirrored_at REAL
    ) WITHOUT ROWID;
    CREATE INDEX sync_runs_env ON sync_runs (env, id);
    CREATE INDEX sync_runs_key ON sync_runs (env, task_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE sync_state (
        env TEXT PRIMARY KEY,
        last_event_id TEXT,
        caught_up_to REAL NOT NULL DEFAULT 0,
        last_contact_at REAL,
        last_error TEXT
    );
    CREATE TABLE sync_cache (
        env TEXT NOT NULL,
        path TEXT NOT NULL,
        body BLOB NOT NULL,
        fetched_at REAL NOT NULL,
        PRIMARY KEY (env, path)
    ) WITHOUT ROWID;
    """,
    # 9: OpenTelemetry spans of the runs, and the trace a run continues
    """
    ALTER TABLE runs ADD COLUMN traceparent TEXT;
    CREATE TABLE spans (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        span_id TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        status INTEGER NOT NULL,
        status_message TEXT NOT NULL,
        attrs BLOB NOT NULL,
        events BLOB NOT NULL,
        PRIMARY KEY (run_id, span_id)
    ) WITHOUT ROWID;
    """,
    # 10: streams of runs (an LLM's tokens, progress lines), readable after the run
    """
    CREATE TABLE stream_chunks (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, stream, seq)
    ) WITHOUT ROWID;
    """,
    # 11: what deleting a run looks up, by index: its tags (the foreign key's check on every
    # deleted run scanned all tags) and the other runs holding its blobs (retention frees a
    # blob only its own run held). Without them pruning 5,000 of 100,000 runs stalled the
    # daemon 9 s a batch (bench/retention_bench.py).
    """
    CREATE INDEX run_tags_run ON run_tags (run_id);
    CREATE INDEX runs_payload_ref ON runs (payload_ref) WHERE payload_ref IS NOT NULL;
    CREATE INDEX runs_output_ref ON runs (output_ref) WHERE output_ref IS NOT NULL;
    """,
]


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns that version.

    Raises:
        RuntimeError: the file was written by a newer Ember than this one.
    """
    (current,) = conn.execute("PRAGMA user_version").fetchone()
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the state database has schema version {current}, newer than this Ember "
            f"understands ({len(MIGRATIONS)}): upgrade Ember, or point EMBER_STATE_DIR elsewhere"
        )
    for version in range(current, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version].split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
