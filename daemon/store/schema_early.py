"""The schema's first seven migrations, as released: never edited (``schema.py``)."""

from __future__ import annotations

from ember._types import FINAL_STATUSES, RunStatus

# The final statuses in RunStatus's order. SQLite uses a partial index only for a query whose
# WHERE repeats the index's own terms, so the index and the queries take this one fragment.
NOT_FINAL = "status NOT IN ({})".format(
    ", ".join(f"'{s.value}'" for s in RunStatus if s in FINAL_STATUSES)
)

EARLY: list[str] = [
    # 1: runs and everything recorded about them
    f"""
    CREATE TABLE versions (
        env TEXT NOT NULL,
        id TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        code_dir TEXT NOT NULL,
        created_at REAL NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        tasks BLOB NOT NULL,
        PRIMARY KEY (env, id)
    );
    CREATE TABLE environments (
        env TEXT PRIMARY KEY,
        current_version TEXT
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        env TEXT NOT NULL,
        task_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        payload BLOB,
        payload_ref TEXT,
        output BLOB,
        output_ref TEXT,
        error BLOB,
        version TEXT,
        pinned_version TEXT,
        tags BLOB,
        metadata BLOB,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        retry BLOB,
        started_at REAL,
        finished_at REAL,
        delay_until REAL,
        ready_at REAL,
        expires_at REAL,
        ttl_s REAL,
        idempotency_key TEXT,
        idempotency_slot TEXT,
        idempotency_expires_at REAL,
        queue TEXT NOT NULL,
        concurrency_key TEXT,
        priority REAL NOT NULL DEFAULT 0,
        max_duration_s REAL,
        machine TEXT,
        parent_run_id TEXT,
        root_run_id TEXT,
        batch_id TEXT,
        replayed_from TEXT,
        interruptions INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_env_id ON runs (env, id);
    CREATE INDEX runs_env_status_id ON runs (env, status, id);
    CREATE INDEX runs_env_task_id ON runs (env, task_id, id);
    CREATE INDEX runs_active ON runs (status) WHERE {NOT_FINAL};
    CREATE UNIQUE INDEX runs_idempotency ON runs (env, task_id, idempotency_slot)
        WHERE idempotency_slot IS NOT NULL;
    CREATE INDEX runs_parent ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
    CREATE TABLE run_tags (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        env TEXT NOT NULL,
        tag TEXT NOT NULL,
        PRIMARY KEY (env, tag, run_id)
    ) WITHOUT ROWID;
    CREATE TABLE attempts (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        status TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        version TEXT,
        pid INTEGER,
        error BLOB,
        cpu_s REAL,
        peak_rss_bytes INTEGER,
        PRIMARY KEY (run_id, number)
    ) WITHOUT ROWID;
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX snapshots_run ON snapshots (run_id, id);
    CREATE TABLE logs (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        ts REAL NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        attrs BLOB
    );
    CREATE INDEX logs_run ON logs (run_id, id);
    """,
    # 2: queue settings changed at run time (pause, concurrency override)
    """
    CREATE TABLE queue_overrides (
        env TEXT NOT NULL,
        name TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        concurrency_limit INTEGER,
        has_limit INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (env, name)
    );
    """,
    # 3: durable waits: the journal of each run's waits, and wait tokens
    """
    ALTER TABLE runs ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN hold TEXT;
    ALTER TABLE runs ADD COLUMN executing_s REAL NOT NULL DEFAULT 0;
    CREATE TABLE waits (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        generation INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        resume_at REAL,
        targets BLOB NOT NULL,
        task_ids BLOB NOT NULL,
        result BLOB,
        completed_at REAL,
        UNIQUE (run_id, generation, seq)
    );
    CREATE INDEX waits_waiting ON waits (status) WHERE status = 'WAITING';
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        timeout_at REAL,
        completed_at REAL,
        output BLOB,
        idempotency_key TEXT,
        idempotency_expires_at REAL,
        tags BLOB,
        run_id TEXT
    );
    CREATE UNIQUE INDEX tokens_idempotency ON tokens (env, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tokens_env_status ON tokens (env, status, id);
    """,
    # 4: environment variables, cron schedules, and run lookup by idempotency key (a
    # schedule's tick fired before a restart is found by its deterministic key)
    """
    CREATE TABLE env_vars (
        env TEXT NOT NULL,
        source TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (env, source, name)
    );
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        task_id TEXT NOT NULL,
        type TEXT NOT NULL,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        external_id TEXT,
        deduplication_key TEXT,
        active INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        armed_at REAL NOT NULL,
        last_tick_at REAL
    );
    CREATE INDEX schedules_env ON schedules (env, id);
    CREATE UNIQUE INDEX schedules_dedup ON schedules (env, deduplication_key)
        WHERE deduplication_key IS NOT NULL;
    CREATE UNIQUE INDEX schedules_declared ON schedules (env, task_id)
        WHERE type = 'DECLARATIVE';
    CREATE INDEX runs_idempotency_key ON runs (env, task_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 5: DELAYED runs due beyond the engine's horizon are found by when they are due
    """
    CREATE INDEX runs_delayed ON runs (delay_until) WHERE status = 'DELAYED';
    """,
    # 6: the answers to recent trigger requests, by the client's request key: a client that
    # lost an answer and sends the request again gets the same runs, not new ones
    """
    CREATE TABLE trigger_requests (
        env TEXT NOT NULL,
        request_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        response BLOB NOT NULL,
        PRIMARY KEY (env, request_key)
    ) WITHOUT ROWID;
    CREATE INDEX trigger_requests_created ON trigger_requests (created_at);
    """,
    # 7: queues, batches and bulk actions at Trigger.dev's level: attempt starts by time (a
    # rate window is rebuilt from them), batch records, bulk actions, alert channels
    """
    CREATE INDEX attempts_started ON attempts (started_at);
    ALTER TABLE runs ADD COLUMN batch_index INTEGER;
    CREATE UNIQUE INDEX runs_batch ON runs (batch_id, batch_index) WHERE batch_id IS NOT NULL;
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        status TEXT NOT NULL,
        run_count INTEGER NOT NULL,
        received INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        sealed_at REAL,
        finished_at REAL,
        idempotency_key TEXT,
        idempotency_expires_at REAL
    );
    CREATE INDEX batches_env ON batches (env, id);
    CREATE INDEX batches_open ON batches (status) WHERE status != 'COMPLETED';
    CREATE UNIQUE INDEX batches_idempotency ON batches (env, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE bulk_actions (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        action TEXT NOT NULL,
        status TEXT NOT NULL,
        filter BLOB,
        run_ids BLOB,
        cursor TEXT,
        total INTEGER NOT NULL,
        processed INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX bulk_actions_env ON bulk_actions (env, id);
    ALTER TABLE runs ADD COLUMN debounce_key TEXT;
    ALTER TABLE runs ADD COLUMN debounce_max_at REAL;
    CREATE INDEX runs_debounce ON runs (env, task_id, debounce_key)
        WHERE debounce_key IS NOT NULL AND status = 'DELAYED';
    CREATE TABLE alert_channels (
        id TEXT PRIMARY KEY,
        env TEXT NOT NULL,
        webhook TEXT NOT NULL,
        events BLOB NOT NULL,
        secret TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE alert_deliveries (
        id TEXT PRIMARY KEY,
        channel_id TEXT NOT NULL REFERENCES alert_channels (id) ON DELETE CASCADE,
        env TEXT NOT NULL,
        event TEXT NOT NULL,
        subject TEXT NOT NULL,
        body BLOB NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_at REAL,
        delivered_at REAL,
        last_error TEXT,
        UNIQUE (channel_id, event, subject)
    );
    CREATE INDEX alert_deliveries_due ON alert_deliveries (next_at) WHERE status = 'PENDING';
    CREATE INDEX alert_deliveries_env ON alert_deliveries (env, id);
    """,
]
