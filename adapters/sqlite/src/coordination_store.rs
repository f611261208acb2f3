//! The coordination store port on SQLite. Every time is SQLite's clock, in milliseconds.
//! Every writing call is one `BEGIN IMMEDIATE` transaction, so calls never interleave.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{CoordinationStore, HeartbeatAck, StoreError, StoreResult};
use orchestrator_core::{
    Epoch, Generation, GenerationPlan, Incarnation, Lease, PROTOCOL_VERSION, ReplicaSetName, Slot,
    SlotCount, SlotRecord, Snapshot, WorkerId, WorkerRecord,
};
use sqlx::Row;

use crate::error::classify;
use crate::{NOW_MS, SqliteStore, Tables, from_millis, millis};

/// The coordination store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct CoordinationSql {
    /// Creates the replica set's row unless it exists.
    create_replica_set: String,
    /// Creates the slots of a new replica set, unowned.
    create_slots: String,
    /// Numbers a new incarnation; returns the slot count and the incarnation.
    next_incarnation: String,
    /// Registers a worker, or restarts it under its new incarnation.
    upsert_worker: String,
    /// Fences a worker id's previous incarnation out of its slots.
    fence_owner: String,
    /// Records a worker's heartbeat.
    beat: String,
    /// Takes or renews the leader's lease when free, expired or already held.
    take_lease: String,
    /// Reads the replica set's row, with the lease's remaining time.
    read_replica_set: String,
    /// Reads the workers, with their ages.
    read_workers: String,
    /// Reads the slots.
    read_slots: String,
    /// Reads the generation and whether the planner holds a live lease.
    check_leader: String,
    /// Grants, hands off or revokes one slot at its epoch.
    change_slot: String,
    /// Evicts one worker.
    evict_worker: String,
    /// Sets the new generation and its members.
    advance_generation: String,
    /// Records a generation in the history.
    record_generation: String,
    /// Keeps the last 100 generations of the history.
    prune_generations: String,
    /// Hands a slot over to its pending new owner.
    release_slot: String,
    /// Records the generation a worker acknowledged.
    ack_generation: String,
    /// Removes one incarnation of a worker.
    delete_worker: String,
    /// Frees a leaver's slots and cancels handoffs pending to it.
    free_slots: String,
    /// Gives up the leader's lease.
    resign: String,
    /// Reads the last generations, newest first.
    recent_generations: String,
}

impl CoordinationSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            create_replica_set: format!(
                "INSERT INTO {} (name, slot_count, created_at) VALUES (?, ?, {NOW_MS}) ON CONFLICT (name) DO NOTHING",
                t.replica_sets
            ),
            create_slots: format!(
                "WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n + 1 < ?) \
                 INSERT INTO {} (replica_set, slot) SELECT ?, n FROM s",
                t.slots
            ),
            next_incarnation: format!(
                "UPDATE {} SET last_incarnation = last_incarnation + 1 WHERE name = ? \
                 RETURNING slot_count, last_incarnation",
                t.replica_sets
            ),
            upsert_worker: format!(
                "INSERT INTO {} (replica_set, worker_id, incarnation, registered_at, last_heartbeat, protocol) \
                 VALUES (?, ?, ?, {NOW_MS}, {NOW_MS}, {PROTOCOL_VERSION}) \
                 ON CONFLICT (replica_set, worker_id) DO UPDATE SET incarnation = excluded.incarnation, \
                     registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat, \
                     acked_generation = 0, protocol = excluded.protocol",
                t.workers
            ),
            fence_owner: format!(
                "UPDATE {} SET epoch = epoch + 1 WHERE replica_set = ? AND owner = ?",
                t.slots
            ),
            beat: format!(
                "UPDATE {} SET last_heartbeat = {NOW_MS} WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
                t.workers
            ),
            take_lease: format!(
                "UPDATE {} SET leader = ?2, leader_incarnation = ?3, lease_expires_at = {NOW_MS} + ?4 \
                 WHERE name = ?1 AND (leader IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= {NOW_MS} \
                     OR (leader = ?2 AND leader_incarnation = ?3))",
                t.replica_sets
            ),
            read_replica_set: format!(
                "SELECT slot_count, generation, members, leader, leader_incarnation, \
                     MAX(COALESCE(lease_expires_at, 0) - {NOW_MS}, 0) FROM {} WHERE name = ?",
                t.replica_sets
            ),
            read_workers: format!(
                "SELECT worker_id, incarnation, {NOW_MS} - last_heartbeat, {NOW_MS} - registered_at, acked_generation, protocol \
                 FROM {} WHERE replica_set = ? ORDER BY worker_id",
                t.workers
            ),
            read_slots: format!(
                "SELECT slot, owner, epoch, next_owner FROM {} WHERE replica_set = ?",
                t.slots
            ),
            check_leader: format!(
                "SELECT generation, COALESCE(leader = ? AND leader_incarnation = ? AND lease_expires_at > {NOW_MS}, 0) \
                 FROM {} WHERE name = ?",
                t.replica_sets
            ),
            change_slot: format!(
                "UPDATE {} SET owner = CASE WHEN ?3 = 'grant' THEN ?4 ELSE owner END, \
                     next_owner = CASE WHEN ?3 = 'handoff' THEN ?4 ELSE NULL END, \
                     epoch = CASE WHEN ?3 = 'grant' THEN epoch + 1 ELSE epoch END \
                 WHERE replica_set = ?1 AND slot = ?2 AND epoch = ?5",
                t.slots
            ),
            evict_worker: format!(
                "DELETE FROM {} WHERE replica_set = ? AND worker_id = ?",
                t.workers
            ),
            advance_generation: format!(
                "UPDATE {} SET generation = ?, members = ? WHERE name = ?",
                t.replica_sets
            ),
            record_generation: format!(
                "INSERT INTO {} (replica_set, generation, members, leader, created_at) VALUES (?, ?, ?, ?, {NOW_MS})",
                t.generations
            ),
            prune_generations: format!(
                "DELETE FROM {} WHERE replica_set = ? AND generation <= ? - 100",
                t.generations
            ),
            release_slot: format!(
                "UPDATE {} SET owner = next_owner, next_owner = NULL, epoch = epoch + 1 \
                 WHERE replica_set = ? AND slot = ? AND owner = ? AND epoch = ? AND next_owner IS NOT NULL",
                t.slots
            ),
            ack_generation: format!(
                "UPDATE {} SET acked_generation = MAX(acked_generation, ?) \
                 WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
                t.workers
            ),
            delete_worker: format!(
                "DELETE FROM {} WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
                t.workers
            ),
            free_slots: format!(
                "UPDATE {} SET owner = CASE WHEN owner = ?2 THEN next_owner ELSE owner END, \
                     epoch = CASE WHEN owner = ?2 THEN epoch + 1 ELSE epoch END, next_owner = NULL \
                 WHERE replica_set = ?1 AND (owner = ?2 OR next_owner = ?2)",
                t.slots
            ),
            resign: format!(
                "UPDATE {} SET leader = NULL, lease_expires_at = NULL WHERE name = ? AND leader = ? AND leader_incarnation = ?",
                t.replica_sets
            ),
            recent_generations: format!(
                "SELECT generation, members, leader, MAX({NOW_MS} - created_at, 0) \
                 FROM {} WHERE replica_set = ? ORDER BY generation DESC LIMIT ?",
                t.generations
            ),
        }
    }
}

/// Members are stored space-separated: worker ids never contain spaces.
fn members_from(text: &str) -> StoreResult<Vec<WorkerId>> {
    text.split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| StoreError::stored_worker_id(s.to_owned()))
        .collect()
}

fn members_to(members: &[WorkerId]) -> String {
    members.iter().map(WorkerId::as_str).collect::<Vec<_>>().join(" ")
}

#[async_trait]
impl CoordinationStore for SqliteStore {
    async fn register(
        &self,
        replica_set: &ReplicaSetName,
        slot_count: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        let err = |e| classify("register", e);
        let sql = &self.sql.coordination;
        let mut tx = self.begin_write("register").await?;
        let created = sqlx::query(&sql.create_replica_set)
            .bind(replica_set.as_str())
            .bind(i64::from(slot_count.get()))
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
            == 1;
        if created {
            sqlx::query(&sql.create_slots)
                .bind(i64::from(slot_count.get()))
                .bind(replica_set.as_str())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        let row = sqlx::query(&sql.next_incarnation)
            .bind(replica_set.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        StoreError::check_slot_count(replica_set, row.get::<i64, _>(0) as u64, slot_count)?;
        let incarnation: i64 = row.get(1);
        sqlx::query(&sql.upsert_worker)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        // Fence the previous incarnation of this id out of the slots it still owns.
        sqlx::query(&sql.fence_owner)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
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
        let sql = &self.sql.coordination;
        let mut tx = self.begin_write("heartbeat").await?;
        let beat = sqlx::query(&sql.beat)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if beat.rows_affected() == 0 {
            return Err(StoreError::not_registered(replica_set, worker));
        }
        let leader = sqlx::query(&sql.take_lease)
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
        let sql = &self.sql.coordination;
        // A read transaction: the three reads see one snapshot of the file.
        let mut tx = self.pool.begin().await.map_err(err)?;
        let Some(set) = sqlx::query(&sql.read_replica_set)
            .bind(replica_set.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
        else {
            return Err(StoreError::UnknownReplicaSet(replica_set.clone()));
        };
        let slot_count = SlotCount::new(set.get::<i64, _>(0) as u64).unwrap_or_default();
        let lease = match set.get::<Option<String>, _>(3) {
            Some(holder) => Some(Lease {
                holder: StoreError::stored_worker_id(holder)?,
                incarnation: Incarnation(set.get::<i64, _>(4) as u64),
                remaining: from_millis(set.get(5)),
            }),
            None => None,
        };
        let workers = sqlx::query(&sql.read_workers)
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
                    protocol: row.get::<i64, _>(5) as u32,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut slots = vec![SlotRecord::default(); slot_count.get() as usize];
        for row in sqlx::query(&sql.read_slots)
            .bind(replica_set.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
        {
            if let Some(record) = slots.get_mut(row.get::<i64, _>(0) as usize) {
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
            members: members_from(&set.get::<String, _>(2))?,
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
        let sql = &self.sql.coordination;
        let mut tx = self.begin_write("create a generation").await?;
        let Some(row) = sqlx::query(&sql.check_leader)
            .bind(plan.leader.as_str())
            .bind(plan.leader_incarnation.0 as i64)
            .bind(replica_set.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
        else {
            return Err(StoreError::UnknownReplicaSet(replica_set.clone()));
        };
        let actual = Generation(row.get::<i64, _>(0) as u64);
        let leads = row.get::<i64, _>(1) == 1;
        plan.check_applies(replica_set, actual, leads)?;
        for slot_change in &plan.changes {
            let (kind, target) =
                (slot_change.action.kind(), slot_change.action.target().map(WorkerId::as_str));
            let updated = sqlx::query(&sql.change_slot)
                .bind(replica_set.as_str())
                .bind(i64::from(slot_change.slot.0))
                .bind(kind)
                .bind(target)
                .bind(slot_change.epoch.0 as i64)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            if updated.rows_affected() != 1 {
                return Err(plan.conflict(replica_set, actual));
            }
        }
        for worker in &plan.evict {
            sqlx::query(&sql.evict_worker)
                .bind(replica_set.as_str())
                .bind(worker.as_str())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        let members = members_to(&plan.members);
        sqlx::query(&sql.advance_generation)
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&sql.record_generation)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .bind(plan.leader.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&sql.prune_generations)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
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
        let mut tx = self.begin_write("release a slot").await?;
        let released = sqlx::query(&self.sql.coordination.release_slot)
            .bind(replica_set.as_str())
            .bind(i64::from(slot.0))
            .bind(worker.as_str())
            .bind(epoch.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if released.rows_affected() == 0 {
            return Err(StoreError::Fenced { worker: worker.clone(), slot });
        }
        tx.commit().await.map_err(err)
    }

    async fn ack_generation(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        let err = |e| classify("acknowledge a generation", e);
        let mut tx = self.begin_write("acknowledge a generation").await?;
        let acked = sqlx::query(&self.sql.coordination.ack_generation)
            .bind(generation.0 as i64)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if acked.rows_affected() == 0 {
            return Err(StoreError::not_registered(replica_set, worker));
        }
        tx.commit().await.map_err(err)
    }

    async fn deregister(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()> {
        let err = |e| classify("deregister", e);
        let sql = &self.sql.coordination;
        let mut tx = self.begin_write("deregister").await?;
        let deleted = sqlx::query(&sql.delete_worker)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if deleted.rows_affected() == 0 {
            return tx.commit().await.map_err(err);
        }
        // The leaver's slots go to their pending new owners (or none); handoffs pending to the
        // leaver are cancelled, so no slot is ever handed to a worker that has gone.
        sqlx::query(&sql.free_slots)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(&sql.resign)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
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
                    members: members_from(row.get::<&str, _>(1))?,
                    leader: StoreError::stored_worker_id(row.get(2))?,
                    age: from_millis(row.get(3)),
                })
            })
            .collect()
    }
}
