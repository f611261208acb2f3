//! The coordination store port on PostgreSQL. Every time is the database's `clock_timestamp()`.
//!
//! Lock order: every transaction that changes slot ownership locks the replica set row first
//! (`register`, `create_generation`, `release_slot`, `deregister`), so they serialize without
//! deadlocks, and a fenced commit only needs that one row FOR SHARE to hold them all off. Each of
//! them also writes a new version of that row before it commits, which is how a fenced commit's
//! statement learns that an owner change committed after its snapshot (see `fencing.rs`).
//! The leader lease lives in its own row (`leases`), which no commit locks: heartbeats and leader
//! failover never wait behind a commit, not even one whose worker froze half way through.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{CoordinationStore, HeartbeatAck, StoreError, StoreResult};
use orchestrator_core::{
    Epoch, Generation, GenerationPlan, Incarnation, Lease, PROTOCOL_VERSION, ReplicaSetName, Slot,
    SlotCount, SlotRecord, Snapshot, WorkerId, WorkerRecord,
};
use sqlx::Row;

use crate::error::classify;
use crate::{PgStore, Tables, from_millis, millis};

/// Tells listeners that the replica set's coordination state changed (delivered at commit).
async fn notify(
    conn: &mut sqlx::PgConnection,
    channel: &str,
    replica_set: &ReplicaSetName,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(replica_set.as_str())
        .execute(conn)
        .await
        .map(drop)
}

impl PgStore {
    async fn notify_coordination(&self, replica_set: &ReplicaSetName) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await.map_err(|e| classify("notify", e))?;
        notify(&mut conn, &self.tables.coordination_channel, replica_set)
            .await
            .map_err(|e| classify("notify", e))
    }
}

#[async_trait]
impl CoordinationStore for PgStore {
    async fn register(
        &self,
        replica_set: &ReplicaSetName,
        slot_count: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        let err = |e| classify("register", e);
        let t = &self.tables;
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        let created = sqlx::query(&self.sql.coordination.create_replica_set)
            .bind(replica_set.as_str())
            .bind(slot_count.get() as i32)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
            == 1;
        if created {
            sqlx::query(&self.sql.coordination.create_slots)
                .bind(replica_set.as_str())
                .bind(slot_count.get() as i32)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        sqlx::query(&self.sql.coordination.create_lease)
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let row = sqlx::query(&self.sql.coordination.next_incarnation)
            .bind(replica_set.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        StoreError::check_slot_count(replica_set, row.get::<i32, _>(0) as u64, slot_count)?;
        let incarnation: i64 = row.get(1);
        sqlx::query(&self.sql.coordination.upsert_worker)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation)
            .bind(PROTOCOL_VERSION as i32)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        // Fence the previous incarnation of this id out of the slots it still owns.
        sqlx::query(&self.sql.coordination.fence_previous_incarnation)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        notify(&mut tx, &t.coordination_channel, replica_set).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Incarnation(incarnation as u64))
    }

    async fn heartbeat(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck> {
        let err = |e| classify("heartbeat", e);
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        let beat = sqlx::query(&self.sql.coordination.beat)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if beat.rows_affected() == 0 {
            return Err(StoreError::not_registered(replica_set, worker));
        }
        let leader = sqlx::query(&self.sql.coordination.take_lease)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .bind(millis(lease))
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
            == 1;
        tx.commit().await.map_err(err)?;
        Ok(HeartbeatAck { leader })
    }

    async fn snapshot(&self, replica_set: &ReplicaSetName) -> StoreResult<Snapshot> {
        let err = |e| classify("read coordination state", e);
        let mut tx = crate::begin::begin(
            &self.pool,
            Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        )
        .await
        .map_err(err)?;
        let Some(set) = sqlx::query(&self.sql.coordination.read_replica_set)
            .bind(replica_set.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
        else {
            return Err(StoreError::UnknownReplicaSet(replica_set.clone()));
        };
        let slot_count = SlotCount::new(set.get::<i32, _>(0) as u64).unwrap_or_default();
        let members: Vec<String> = set.get(2);
        let leader: Option<String> = set.get(3);
        let lease = match leader {
            Some(holder) => Some(Lease {
                holder: StoreError::stored_worker_id(holder)?,
                incarnation: Incarnation(set.get::<i64, _>(4) as u64),
                remaining: from_millis(set.get::<Option<i64>, _>(5).unwrap_or(0)),
            }),
            None => None,
        };
        let workers = sqlx::query(&self.sql.coordination.read_workers)
            .bind(replica_set.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
            .into_iter()
            .map(|row| {
                Ok(WorkerRecord {
                    id: StoreError::stored_worker_id(row.get(0))?,
                    incarnation: Incarnation(row.get::<i64, _>(1) as u64),
                    heartbeat_age: from_millis(row.get(2)),
                    registered_age: from_millis(row.get(3)),
                    acked_generation: Generation(row.get::<i64, _>(4) as u64),
                    protocol: row.get::<i32, _>(5) as u32,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut slots = vec![SlotRecord::default(); slot_count.get() as usize];
        for row in sqlx::query(&self.sql.coordination.read_slots)
            .bind(replica_set.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
        {
            let slot = row.get::<i32, _>(0) as usize;
            if let Some(record) = slots.get_mut(slot) {
                *record = SlotRecord {
                    owner: row
                        .get::<Option<String>, _>(1)
                        .map(StoreError::stored_worker_id)
                        .transpose()?,
                    epoch: Epoch(row.get::<i64, _>(2) as u64),
                    next_owner: row
                        .get::<Option<String>, _>(3)
                        .map(StoreError::stored_worker_id)
                        .transpose()?,
                };
            }
        }
        tx.commit().await.map_err(err)?;
        Ok(Snapshot {
            replica_set: replica_set.clone(),
            slot_count,
            generation: Generation(set.get::<i64, _>(1) as u64),
            members: members
                .into_iter()
                .map(StoreError::stored_worker_id)
                .collect::<StoreResult<_>>()?,
            lease,
            workers,
            slots,
        })
    }

    async fn create_generation(
        &self,
        replica_set: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()> {
        let err = |e| classify("create a generation", e);
        let t = &self.tables;
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        let Some(row) = sqlx::query(&self.sql.coordination.lock_replica_set)
            .bind(replica_set.as_str())
            .bind(plan.leader.as_str())
            .bind(plan.leader_incarnation.0 as i64)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
        else {
            return Err(StoreError::UnknownReplicaSet(replica_set.clone()));
        };
        let actual = Generation(row.get::<i64, _>(0) as u64);
        let leads = row.get::<Option<bool>, _>(1).unwrap_or(false);
        plan.check_applies(replica_set, actual, leads)?;
        if !plan.changes.is_empty() {
            let slots: Vec<i32> = plan.changes.iter().map(|c| c.slot.0 as i32).collect();
            let epochs: Vec<i64> = plan.changes.iter().map(|c| c.epoch.0 as i64).collect();
            let kinds: Vec<&str> = plan.changes.iter().map(|c| c.action.kind()).collect();
            let targets: Vec<Option<&str>> =
                plan.changes.iter().map(|c| c.action.target().map(WorkerId::as_str)).collect();
            let updated = sqlx::query(&self.sql.coordination.apply_changes)
                .bind(replica_set.as_str())
                .bind(&slots)
                .bind(&epochs)
                .bind(&kinds)
                .bind(&targets)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            if updated.rows_affected() != plan.changes.len() as u64 {
                return Err(plan.conflict(replica_set, actual));
            }
        }
        let evicted: Vec<&WorkerId> = plan.evict.iter().collect();
        self.fold_progress(&mut tx, replica_set, &evicted).await.map_err(err)?;
        let evict: Vec<&str> = plan.evict.iter().map(WorkerId::as_str).collect();
        sqlx::query(&self.sql.coordination.evict_workers)
            .bind(replica_set.as_str())
            .bind(&evict)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let members: Vec<&str> = plan.members.iter().map(WorkerId::as_str).collect();
        sqlx::query(&self.sql.coordination.set_generation)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&self.sql.coordination.record_generation)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .bind(plan.leader.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&self.sql.coordination.prune_generations)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        notify(&mut tx, &t.coordination_channel, replica_set).await.map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn release_slot(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()> {
        let err = |e| classify("release a slot", e);
        let t = &self.tables;
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        // A change of owner: a new version of the replica set's row first (see `fencing.rs`).
        sqlx::query(self.fencing.owner_change_sql())
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let released = sqlx::query(&self.sql.coordination.release_slot)
            .bind(replica_set.as_str())
            .bind(slot.0 as i32)
            .bind(worker.as_str())
            .bind(epoch.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if released.rows_affected() == 0 {
            return Err(StoreError::Fenced { worker: worker.clone(), slot });
        }
        notify(&mut tx, &t.coordination_channel, replica_set).await.map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn ack_generation(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        let acked = sqlx::query(&self.sql.coordination.ack_generation)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .bind(generation.0 as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| classify("acknowledge a generation", e))?;
        if acked.rows_affected() == 0 {
            return Err(StoreError::not_registered(replica_set, worker));
        }
        self.notify_coordination(replica_set).await
    }

    async fn deregister(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()> {
        let err = |e| classify("deregister", e);
        let t = &self.tables;
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        // The leaver's slots change owner: a new version of the replica set's row first (see
        // `fencing.rs`).
        sqlx::query(self.fencing.owner_change_sql())
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let deleted = sqlx::query(&self.sql.coordination.delete_worker)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if deleted.rows_affected() == 0 {
            return tx.commit().await.map_err(err);
        }
        self.fold_progress(&mut tx, replica_set, &[worker]).await.map_err(err)?;
        // The leaver's slots go to their pending new owners (or none); handoffs pending to the
        // leaver are cancelled, so no slot is ever handed to a worker that has gone.
        sqlx::query(&self.sql.coordination.hand_over_slots)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&self.sql.coordination.resign_lease)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        notify(&mut tx, &t.coordination_channel, replica_set).await.map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn recent_generations(
        &self,
        replica_set: &ReplicaSetName,
        limit: usize,
    ) -> StoreResult<Vec<orchestrator_core::ports::GenerationRecord>> {
        let err = |e| classify("read the generations", e);
        sqlx::query(&self.sql.coordination.recent_generations)
            .bind(replica_set.as_str())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(err)?
            .into_iter()
            .map(|row| {
                Ok(orchestrator_core::ports::GenerationRecord {
                    generation: Generation(row.get::<i64, _>(0) as u64),
                    members: row
                        .get::<Vec<String>, _>(1)
                        .into_iter()
                        .map(StoreError::stored_worker_id)
                        .collect::<StoreResult<_>>()?,
                    leader: StoreError::stored_worker_id(row.get(2))?,
                    age: from_millis(row.get(3)),
                })
            })
            .collect()
    }
}

/// The coordination store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct CoordinationSql {
    /// Creates the replica set's row unless it exists.
    create_replica_set: String,
    /// Creates a new replica set's slot rows.
    create_slots: String,
    /// Creates the replica set's lease row unless it exists.
    create_lease: String,
    /// Counts one more incarnation; returns the slot count and that incarnation.
    next_incarnation: String,
    /// Registers the worker's new incarnation.
    upsert_worker: String,
    /// Fences the slots a previous incarnation of the worker still owns.
    fence_previous_incarnation: String,
    /// Records the worker's heartbeat.
    beat: String,
    /// Takes or renews the leader lease when free, expired or the worker's own.
    take_lease: String,
    /// The replica set's row and its lease.
    read_replica_set: String,
    /// The registered workers.
    read_workers: String,
    /// Every slot's owner, epoch and pending owner.
    read_slots: String,
    /// Locks the replica set's row; its generation and whether the planner leads.
    lock_replica_set: String,
    /// Applies a plan's slot changes, each only at its expected epoch.
    apply_changes: String,
    /// Deletes evicted workers.
    evict_workers: String,
    /// Records the new generation and its members.
    set_generation: String,
    /// Adds the generation to the history.
    record_generation: String,
    /// Keeps the last 100 generations of the history.
    prune_generations: String,
    /// Hands a slot to its pending owner.
    release_slot: String,
    /// Records the generation a worker runs.
    ack_generation: String,
    /// Deletes a leaving worker's incarnation.
    delete_worker: String,
    /// Gives a leaver's slots to their pending owners and cancels handoffs to it.
    hand_over_slots: String,
    /// Frees the lease a leaver holds.
    resign_lease: String,
    /// The last generations, newest first.
    recent_generations: String,
}

impl CoordinationSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            create_replica_set: format!(
                "INSERT INTO {} (name, slot_count) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                t.replica_sets
            ),
            create_slots: format!(
                "INSERT INTO {} (replica_set, slot) SELECT $1, s FROM generate_series(0, $2 - 1) AS s",
                t.slots
            ),
            create_lease: format!(
                "INSERT INTO {} (replica_set) VALUES ($1) ON CONFLICT (replica_set) DO NOTHING",
                t.leases
            ),
            next_incarnation: format!(
                "UPDATE {} SET last_incarnation = last_incarnation + 1 WHERE name = $1 \
                 RETURNING slot_count, last_incarnation",
                t.replica_sets
            ),
            upsert_worker: format!(
                "INSERT INTO {} (replica_set, worker_id, incarnation, registered_at, last_heartbeat, protocol) \
                 VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp(), $4) \
                 ON CONFLICT (replica_set, worker_id) DO UPDATE SET incarnation = excluded.incarnation, \
                     registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat, \
                     acked_generation = 0, protocol = excluded.protocol",
                t.workers
            ),
            fence_previous_incarnation: format!(
                "UPDATE {} SET epoch = epoch + 1 WHERE replica_set = $1 AND owner = $2",
                t.slots
            ),
            beat: format!(
                "UPDATE {} SET last_heartbeat = clock_timestamp() \
                 WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3",
                t.workers
            ),
            take_lease: format!(
                "UPDATE {} SET leader = $2, leader_incarnation = $3, \
                     lease_expires_at = clock_timestamp() + $4 * INTERVAL '1 millisecond' \
                 WHERE replica_set = $1 AND (leader IS NULL OR lease_expires_at IS NULL \
                     OR lease_expires_at <= clock_timestamp() \
                     OR (leader = $2 AND leader_incarnation = $3))",
                t.leases
            ),
            read_replica_set: format!(
                "SELECT r.slot_count, r.generation, r.members, l.leader, l.leader_incarnation, \
                     (GREATEST(EXTRACT(EPOCH FROM l.lease_expires_at - clock_timestamp()), 0) * 1000)::bigint \
                 FROM {} AS r LEFT JOIN {} AS l ON l.replica_set = r.name WHERE r.name = $1",
                t.replica_sets, t.leases
            ),
            read_workers: format!(
                "SELECT worker_id, incarnation, \
                     (EXTRACT(EPOCH FROM clock_timestamp() - last_heartbeat) * 1000)::bigint, \
                     (EXTRACT(EPOCH FROM clock_timestamp() - registered_at) * 1000)::bigint, \
                     acked_generation, protocol \
                 FROM {} WHERE replica_set = $1 ORDER BY worker_id",
                t.workers
            ),
            read_slots: format!(
                "SELECT slot, owner, epoch, next_owner FROM {} WHERE replica_set = $1",
                t.slots
            ),
            lock_replica_set: format!(
                "SELECT r.generation, l.leader = $2 AND l.leader_incarnation = $3 \
                     AND l.lease_expires_at > clock_timestamp() \
                 FROM {} AS r LEFT JOIN {} AS l ON l.replica_set = r.name \
                 WHERE r.name = $1 FOR UPDATE OF r",
                t.replica_sets, t.leases
            ),
            apply_changes: format!(
                "UPDATE {} AS s SET \
                     owner = CASE WHEN c.kind = 'grant' THEN c.target ELSE s.owner END, \
                     next_owner = CASE WHEN c.kind = 'handoff' THEN c.target ELSE NULL END, \
                     epoch = CASE WHEN c.kind = 'grant' THEN s.epoch + 1 ELSE s.epoch END \
                 FROM unnest($2::int[], $3::bigint[], $4::text[], $5::text[]) AS c(slot, epoch, kind, target) \
                 WHERE s.replica_set = $1 AND s.slot = c.slot AND s.epoch = c.epoch",
                t.slots
            ),
            evict_workers: format!(
                "DELETE FROM {} WHERE replica_set = $1 AND worker_id = ANY($2)",
                t.workers
            ),
            set_generation: format!(
                "UPDATE {} SET generation = $2, members = $3 WHERE name = $1",
                t.replica_sets
            ),
            record_generation: format!(
                "INSERT INTO {} (replica_set, generation, members, leader) VALUES ($1, $2, $3, $4)",
                t.generations
            ),
            prune_generations: format!(
                "DELETE FROM {} WHERE replica_set = $1 AND generation <= $2 - 100",
                t.generations
            ),
            release_slot: format!(
                "UPDATE {} SET owner = next_owner, next_owner = NULL, epoch = epoch + 1 \
                 WHERE replica_set = $1 AND slot = $2 AND owner = $3 AND epoch = $4 AND next_owner IS NOT NULL",
                t.slots
            ),
            ack_generation: format!(
                "UPDATE {} SET acked_generation = GREATEST(acked_generation, $4) \
                 WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3",
                t.workers
            ),
            delete_worker: format!(
                "DELETE FROM {} WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3",
                t.workers
            ),
            hand_over_slots: format!(
                "UPDATE {} SET owner = CASE WHEN owner = $2 THEN next_owner ELSE owner END, \
                     epoch = CASE WHEN owner = $2 THEN epoch + 1 ELSE epoch END, next_owner = NULL \
                 WHERE replica_set = $1 AND (owner = $2 OR next_owner = $2)",
                t.slots
            ),
            resign_lease: format!(
                "UPDATE {} SET leader = NULL, lease_expires_at = NULL \
                 WHERE replica_set = $1 AND leader = $2 AND leader_incarnation = $3",
                t.leases
            ),
            recent_generations: format!(
                "SELECT generation, members, leader, \
                     (GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - created_at), 0) * 1000)::bigint \
                 FROM {} WHERE replica_set = $1 ORDER BY generation DESC LIMIT $2",
                t.generations
            ),
        }
    }
}
