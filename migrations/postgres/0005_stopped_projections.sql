-- Projections stopped by their failure policy: where and why. While a row exists no worker of the
-- replica set runs the projection; `orchestrator projection resume` deletes it.
CREATE TABLE IF NOT EXISTS {prefix}stopped_projections (
    replica_set     TEXT NOT NULL,
    projection      TEXT NOT NULL,
    commit_position BIGINT NOT NULL,
    global_position BIGINT NOT NULL,
    aggregate       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    error           TEXT NOT NULL,
    stopped_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (replica_set, projection)
);
