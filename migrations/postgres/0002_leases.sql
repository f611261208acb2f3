-- The leader lease moves out of the replica set's row. Every fenced commit holds that row FOR SHARE,
-- so a heartbeat renewing or taking the lease there waited behind commits, and behind a worker
-- frozen in the middle of one (SIGSTOP) indefinitely: no heartbeat, no leader failover. Heartbeats
-- now write only their worker row and this one, which no commit locks.
-- The lease columns of {prefix}replica_sets stay, unused.
CREATE TABLE IF NOT EXISTS {prefix}leases (
    replica_set        TEXT PRIMARY KEY REFERENCES {prefix}replica_sets (name) ON DELETE CASCADE,
    leader             TEXT,
    leader_incarnation BIGINT NOT NULL DEFAULT 0,
    lease_expires_at   TIMESTAMPTZ
);

INSERT INTO {prefix}leases (replica_set, leader, leader_incarnation, lease_expires_at)
SELECT name, leader, leader_incarnation, lease_expires_at FROM {prefix}replica_sets
ON CONFLICT (replica_set) DO NOTHING;
