-- Orchestrator schema for SQLite. `{prefix}` is replaced by the validated table prefix.
-- Every statement is idempotent; the runner applies it inside BEGIN IMMEDIATE.
-- Times are integer milliseconds since the Unix epoch. SQLite has one writer at a time, so
-- events become visible in global_position order and readers need no gap protection.

CREATE TABLE IF NOT EXISTS {prefix}meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS {prefix}events (
    global_position   INTEGER PRIMARY KEY AUTOINCREMENT,
    bounded_context   TEXT NOT NULL,
    aggregate_type    TEXT NOT NULL,
    aggregate_id      TEXT NOT NULL,
    aggregate_version INTEGER NOT NULL,
    slot              INTEGER NOT NULL,
    partition_hash    INTEGER NOT NULL,
    event_id          BLOB NOT NULL UNIQUE,
    event_type        TEXT NOT NULL,
    event_version     INTEGER NOT NULL,
    payload           BLOB NOT NULL,
    metadata          TEXT NOT NULL,
    causation_id      TEXT,
    correlation_id    TEXT,
    trace_id          TEXT,
    created_at        INTEGER NOT NULL,
    UNIQUE (bounded_context, aggregate_type, aggregate_id, aggregate_version)
);

CREATE INDEX IF NOT EXISTS {prefix}events_slot_order ON {prefix}events (slot, global_position);

CREATE TABLE IF NOT EXISTS {prefix}replica_sets (
    name               TEXT PRIMARY KEY,
    slot_count         INTEGER NOT NULL,
    generation         INTEGER NOT NULL DEFAULT 0,
    members            TEXT NOT NULL DEFAULT '',
    leader             TEXT,
    leader_incarnation INTEGER NOT NULL DEFAULT 0,
    lease_expires_at   INTEGER,
    last_incarnation   INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS {prefix}workers (
    replica_set      TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    worker_id        TEXT NOT NULL,
    incarnation      INTEGER NOT NULL,
    registered_at    INTEGER NOT NULL,
    last_heartbeat   INTEGER NOT NULL,
    acked_generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (replica_set, worker_id)
);

CREATE TABLE IF NOT EXISTS {prefix}slots (
    replica_set TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    slot        INTEGER NOT NULL,
    owner       TEXT,
    epoch       INTEGER NOT NULL DEFAULT 0,
    next_owner  TEXT,
    PRIMARY KEY (replica_set, slot)
);

CREATE TABLE IF NOT EXISTS {prefix}generations (
    replica_set TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    generation  INTEGER NOT NULL,
    members     TEXT NOT NULL,
    leader      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (replica_set, generation)
);

CREATE TABLE IF NOT EXISTS {prefix}checkpoints (
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    slot            INTEGER NOT NULL,
    commit_position INTEGER NOT NULL,
    global_position INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (replica_set, projection, slot)
);
