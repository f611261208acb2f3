-- Orchestrator schema for PostgreSQL. `{prefix}` is replaced by the validated table prefix.
-- Every statement is idempotent; the runner also serializes concurrent runs with an advisory lock.

CREATE TABLE IF NOT EXISTS {prefix}meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Events. `transaction_id` is the appending transaction's id: readers only read below the oldest
-- transaction still running, in (transaction_id, global_position) order, so an event whose
-- transaction commits late is never skipped.
CREATE TABLE IF NOT EXISTS {prefix}events (
    global_position   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id    XID8 NOT NULL DEFAULT pg_current_xact_id(),
    bounded_context   TEXT NOT NULL,
    aggregate_type    TEXT NOT NULL,
    aggregate_id      TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    slot              INTEGER NOT NULL,
    partition_hash    BIGINT NOT NULL,
    event_id          UUID NOT NULL,
    event_type        TEXT NOT NULL,
    event_version     INTEGER NOT NULL,
    payload           BYTEA NOT NULL,
    metadata          JSONB NOT NULL,
    causation_id      TEXT,
    correlation_id    TEXT,
    trace_id          TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT {prefix}events_event_id_key UNIQUE (event_id),
    CONSTRAINT {prefix}events_stream_version_key
        UNIQUE (bounded_context, aggregate_type, aggregate_id, aggregate_version)
);

-- One ordered index range per slot: a worker's read merges the ranges of the slots it owns.
CREATE INDEX IF NOT EXISTS {prefix}events_slot_order
    ON {prefix}events (slot, transaction_id, global_position);

-- One range over every slot, for a reader that owns them all (a single worker, a rebuild).
CREATE INDEX IF NOT EXISTS {prefix}events_commit_order
    ON {prefix}events (transaction_id, global_position);

CREATE TABLE IF NOT EXISTS {prefix}replica_sets (
    name               TEXT PRIMARY KEY,
    slot_count         INTEGER NOT NULL,
    generation         BIGINT NOT NULL DEFAULT 0,
    members            TEXT[] NOT NULL DEFAULT '{}',
    leader             TEXT,
    leader_incarnation BIGINT NOT NULL DEFAULT 0,
    lease_expires_at   TIMESTAMPTZ,
    last_incarnation   BIGINT NOT NULL DEFAULT 0,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS {prefix}workers (
    replica_set      TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    worker_id        TEXT NOT NULL,
    incarnation      BIGINT NOT NULL,
    registered_at    TIMESTAMPTZ NOT NULL,
    last_heartbeat   TIMESTAMPTZ NOT NULL,
    acked_generation BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (replica_set, worker_id)
);

-- Slot ownership. Every change of owner bumps `epoch`; commits are fenced on (owner, epoch).
CREATE TABLE IF NOT EXISTS {prefix}slots (
    replica_set TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    slot        INTEGER NOT NULL,
    owner       TEXT,
    epoch       BIGINT NOT NULL DEFAULT 0,
    next_owner  TEXT,
    PRIMARY KEY (replica_set, slot)
);

-- Recent generations, for operators; older ones are deleted as new ones are created.
CREATE TABLE IF NOT EXISTS {prefix}generations (
    replica_set TEXT NOT NULL REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    generation  BIGINT NOT NULL,
    members     TEXT[] NOT NULL,
    leader      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (replica_set, generation)
);

-- Per (replica set, projection, slot): the last position processed.
CREATE TABLE IF NOT EXISTS {prefix}checkpoints (
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    slot            INTEGER NOT NULL,
    commit_position BIGINT NOT NULL,
    global_position BIGINT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (replica_set, projection, slot)
);

-- Per (replica set, projection, worker): "these slots are processed up to this position", written
-- by each batch commit in one row instead of one row per slot. A slot's checkpoint is the greatest
-- of its row in checkpoints and of every progress row that lists it. Rows of workers that leave or
-- are evicted are folded into checkpoints and deleted.
CREATE TABLE IF NOT EXISTS {prefix}progress (
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    worker_id       TEXT NOT NULL,
    slots           INTEGER[] NOT NULL,
    commit_position BIGINT NOT NULL,
    global_position BIGINT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (replica_set, projection, worker_id)
);
