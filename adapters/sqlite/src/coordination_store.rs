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
use crate::{NOW_MS, SqliteStore, from_millis, millis};

fn worker_id(text: String) -> StoreResult<WorkerId> {
    WorkerId::new(text)
        .map_err(|e| StoreError::Other { message: format!("corrupt worker id: {e}"), source: None })
}

/// Members are stored space-separated: worker ids never contain spaces.
fn members_from(text: &str) -> StoreResult<Vec<WorkerId>> {
    text.split(' ').filter(|s| !s.is_empty()).map(|s| worker_id(s.to_owned())).collect()
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
        let t = &self.tables;
        let mut tx = self.begin_write("register").await?;
        let create = format!(
            "INSERT INTO {} (name, slot_count, created_at) VALUES (?, ?, {NOW_MS}) ON CONFLICT (name) DO NOTHING",
            t.replica_sets
        );
        let created = sqlx::query(&create)
            .bind(replica_set.as_str())
            .bind(i64::from(slot_count.get()))
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
            == 1;
        if created {
            let slots = format!(
                "WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n + 1 < ?) \
                 INSERT INTO {} (replica_set, slot) SELECT ?, n FROM s",
                t.slots
            );
            sqlx::query(&slots)
                .bind(i64::from(slot_count.get()))
                .bind(replica_set.as_str())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        let bump = format!(
            "UPDATE {} SET last_incarnation = last_incarnation + 1 WHERE name = ? \
             RETURNING slot_count, last_incarnation",
            t.replica_sets
        );
        let row =
            sqlx::query(&bump).bind(replica_set.as_str()).fetch_one(&mut *tx).await.map_err(err)?;
        StoreError::check_slot_count(replica_set, row.get::<i64, _>(0) as u64, slot_count)?;
        let incarnation: i64 = row.get(1);
        let upsert = format!(
            "INSERT INTO {} (replica_set, worker_id, incarnation, registered_at, last_heartbeat, protocol) \
             VALUES (?, ?, ?, {NOW_MS}, {NOW_MS}, {PROTOCOL_VERSION}) \
             ON CONFLICT (replica_set, worker_id) DO UPDATE SET incarnation = excluded.incarnation, \
                 registered_at = excluded.registered_at, last_heartbeat = excluded.last_heartbeat, \
                 acked_generation = 0, protocol = excluded.protocol",
            t.workers
        );
        sqlx::query(&upsert)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        // Fence the previous incarnation of this id out of the slots it still owns.
        let fence =
            format!("UPDATE {} SET epoch = epoch + 1 WHERE replica_set = ? AND owner = ?", t.slots);
        sqlx::query(&fence)
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
        let t = &self.tables;
        let mut tx = self.begin_write("heartbeat").await?;
        let beat = format!(
            "UPDATE {} SET last_heartbeat = {NOW_MS} WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
            t.workers
        );
        let beat = sqlx::query(&beat)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if beat.rows_affected() == 0 {
            return Err(StoreError::NotRegistered {
                replica_set: replica_set.clone(),
                worker: worker.clone(),
            });
        }
        let take = format!(
            "UPDATE {} SET leader = ?2, leader_incarnation = ?3, lease_expires_at = {NOW_MS} + ?4 \
             WHERE name = ?1 AND (leader IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= {NOW_MS} \
                 OR (leader = ?2 AND leader_incarnation = ?3))",
            t.replica_sets
        );
        let leader = sqlx::query(&take)
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
        let t = &self.tables;
        // A read transaction: the three reads see one snapshot of the file.
        let mut tx = self.pool.begin().await.map_err(err)?;
        let set_sql = format!(
            "SELECT slot_count, generation, members, leader, leader_incarnation, \
                 MAX(COALESCE(lease_expires_at, 0) - {NOW_MS}, 0) FROM {} WHERE name = ?",
            t.replica_sets
        );
        let Some(set) = sqlx::query(&set_sql)
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
                holder: worker_id(holder)?,
                incarnation: Incarnation(set.get::<i64, _>(4) as u64),
                remaining: from_millis(set.get(5)),
            }),
            None => None,
        };
        let workers_sql = format!(
            "SELECT worker_id, incarnation, {NOW_MS} - last_heartbeat, {NOW_MS} - registered_at, acked_generation, protocol \
             FROM {} WHERE replica_set = ? ORDER BY worker_id",
            t.workers
        );
        let workers = sqlx::query(&workers_sql)
            .bind(replica_set.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
            .into_iter()
            .map(|row| {
                Ok(WorkerRecord {
                    id: worker_id(row.get(0))?,
                    incarnation: Incarnation(row.get::<i64, _>(1) as u64),
                    heartbeat_age: from_millis(row.get(2)),
                    registered_age: from_millis(row.get(3)),
                    acked_generation: Generation(row.get::<i64, _>(4) as u64),
                    protocol: row.get::<i64, _>(5) as u32,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let slots_sql =
            format!("SELECT slot, owner, epoch, next_owner FROM {} WHERE replica_set = ?", t.slots);
        let mut slots = vec![SlotRecord::default(); slot_count.get() as usize];
        for row in sqlx::query(&slots_sql)
            .bind(replica_set.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
        {
            if let Some(record) = slots.get_mut(row.get::<i64, _>(0) as usize) {
                *record = SlotRecord {
                    owner: row.get::<Option<String>, _>(1).map(worker_id).transpose()?,
                    epoch: Epoch(row.get::<i64, _>(2) as u64),
                    next_owner: row.get::<Option<String>, _>(3).map(worker_id).transpose()?,
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
        let t = &self.tables;
        let mut tx = self.begin_write("create a generation").await?;
        let check = format!(
            "SELECT generation, COALESCE(leader = ? AND leader_incarnation = ? AND lease_expires_at > {NOW_MS}, 0) \
             FROM {} WHERE name = ?",
            t.replica_sets
        );
        let Some(row) = sqlx::query(&check)
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
        let change = format!(
            "UPDATE {} SET owner = CASE WHEN ?3 = 'grant' THEN ?4 ELSE owner END, \
                 next_owner = CASE WHEN ?3 = 'handoff' THEN ?4 ELSE NULL END, \
                 epoch = CASE WHEN ?3 = 'grant' THEN epoch + 1 ELSE epoch END \
             WHERE replica_set = ?1 AND slot = ?2 AND epoch = ?5",
            t.slots
        );
        for slot_change in &plan.changes {
            let (kind, target) =
                (slot_change.action.kind(), slot_change.action.target().map(WorkerId::as_str));
            let updated = sqlx::query(&change)
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
        let evict = format!("DELETE FROM {} WHERE replica_set = ? AND worker_id = ?", t.workers);
        for worker in &plan.evict {
            sqlx::query(&evict)
                .bind(replica_set.as_str())
                .bind(worker.as_str())
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        let members = members_to(&plan.members);
        let advance =
            format!("UPDATE {} SET generation = ?, members = ? WHERE name = ?", t.replica_sets);
        sqlx::query(&advance)
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let history = format!(
            "INSERT INTO {} (replica_set, generation, members, leader, created_at) VALUES (?, ?, ?, ?, {NOW_MS})",
            t.generations
        );
        sqlx::query(&history)
            .bind(replica_set.as_str())
            .bind(plan.generation.0 as i64)
            .bind(&members)
            .bind(plan.leader.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let prune = format!(
            "DELETE FROM {} WHERE replica_set = ? AND generation <= ? - 100",
            t.generations
        );
        sqlx::query(&prune)
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
        let release = format!(
            "UPDATE {} SET owner = next_owner, next_owner = NULL, epoch = epoch + 1 \
             WHERE replica_set = ? AND slot = ? AND owner = ? AND epoch = ? AND next_owner IS NOT NULL",
            self.tables.slots
        );
        let released = sqlx::query(&release)
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
        let ack = format!(
            "UPDATE {} SET acked_generation = MAX(acked_generation, ?) \
             WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
            self.tables.workers
        );
        let acked = sqlx::query(&ack)
            .bind(generation.0 as i64)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .bind(incarnation.0 as i64)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if acked.rows_affected() == 0 {
            return Err(StoreError::NotRegistered {
                replica_set: replica_set.clone(),
                worker: worker.clone(),
            });
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
        let t = &self.tables;
        let mut tx = self.begin_write("deregister").await?;
        let delete = format!(
            "DELETE FROM {} WHERE replica_set = ? AND worker_id = ? AND incarnation = ?",
            t.workers
        );
        let deleted = sqlx::query(&delete)
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
        let free = format!(
            "UPDATE {} SET owner = CASE WHEN owner = ?2 THEN next_owner ELSE owner END, \
                 epoch = CASE WHEN owner = ?2 THEN epoch + 1 ELSE epoch END, next_owner = NULL \
             WHERE replica_set = ?1 AND (owner = ?2 OR next_owner = ?2)",
            t.slots
        );
        sqlx::query(&free)
            .bind(replica_set.as_str())
            .bind(worker.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let resign = format!(
            "UPDATE {} SET leader = NULL, lease_expires_at = NULL WHERE name = ? AND leader = ? AND leader_incarnation = ?",
            t.replica_sets
        );
        sqlx::query(&resign)
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
        let sql = format!(
            "SELECT generation, members, leader, MAX({NOW_MS} - created_at, 0) \
             FROM {} WHERE replica_set = ? ORDER BY generation DESC LIMIT ?",
            self.tables.generations
        );
        sqlx::query(&sql)
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
                    leader: worker_id(row.get(2))?,
                    age: from_millis(row.get(3)),
                })
            })
            .collect()
    }
}
