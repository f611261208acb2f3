-- Dead letters (failure policy `park`): events a projection parked, per partition key, until an
-- operator retries or skips the key (`orchestrator dlq retry|skip`). A letter is written in the
-- projection's fenced transaction, so it exists only if that commit succeeded. Times are integer
-- milliseconds since the Unix epoch, by SQLite's clock, like every other table.
CREATE TABLE IF NOT EXISTS {prefix}dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    partition_key   TEXT NOT NULL,
    slot            INTEGER NOT NULL,
    bounded_context TEXT NOT NULL,
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    commit_position INTEGER NOT NULL,
    global_position INTEGER NOT NULL,
    event_type      TEXT NOT NULL,
    error           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    last_failed_at  INTEGER NOT NULL,
    -- 'retry' or 'skip' while an operator's request waits for the owner of the key's slot.
    requested       TEXT CHECK (requested IN ('retry', 'skip')),
    UNIQUE (replica_set, projection, global_position)
);

-- parked_keys: the keys of a projection in the slots a worker owns.
CREATE INDEX IF NOT EXISTS {prefix}dead_letters_keys
    ON {prefix}dead_letters (replica_set, projection, slot, partition_key);

-- requests: read by every worker each heartbeat; only marked letters are indexed.
CREATE INDEX IF NOT EXISTS {prefix}dead_letters_requested
    ON {prefix}dead_letters (replica_set) WHERE requested IS NOT NULL;

-- Letters dropped by `orchestrator dlq skip`, for the record; nothing reads them back into
-- processing.
CREATE TABLE IF NOT EXISTS {prefix}skipped_letters (
    id              INTEGER NOT NULL,
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    partition_key   TEXT NOT NULL,
    commit_position INTEGER NOT NULL,
    global_position INTEGER NOT NULL,
    aggregate       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    error           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    skipped_at      INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS {prefix}skipped_letters_projection
    ON {prefix}skipped_letters (replica_set, projection);
