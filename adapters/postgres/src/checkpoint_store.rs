//! The checkpoint store port on PostgreSQL: fenced commits inside the projection's transaction.

use std::collections::BTreeMap;

use async_trait::async_trait;
use orchestrator_core::ports::{CheckpointStore, Fence, StoreError, StoreResult};
use orchestrator_core::{Position, ReplicaSetName, Slot};
use sqlx::Row;

use crate::error::classify;
use crate::{PgStore, PgTx};

#[async_trait]
impl CheckpointStore for PgStore {
    type Tx = PgTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        let wanted: Vec<i32> = slots.iter().map(|s| s.0 as i32).collect();
        let rows = sqlx::query(&format!(
            "SELECT slot, commit_position, global_position FROM {} \
             WHERE replica_set = $1 AND projection = $2 AND slot = ANY($3)",
            self.tables.checkpoints
        ))
        .bind(replica_set.as_str())
        .bind(projection)
        .bind(&wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| classify("load checkpoints", e))?;
        let mut loaded: BTreeMap<Slot, Position> =
            slots.iter().map(|s| (*s, Position::START)).collect();
        for row in rows {
            let slot = Slot(row.get::<i32, _>(0) as u32);
            loaded.insert(
                slot,
                Position {
                    commit: row.get::<i64, _>(1) as u64,
                    global: row.get::<i64, _>(2) as u64,
                },
            );
        }
        Ok(loaded)
    }

    async fn begin(&self) -> StoreResult<PgTx> {
        self.pool.begin().await.map_err(|e| classify("begin a transaction", e))
    }

    async fn commit(
        &self,
        mut tx: PgTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        let err = |e| classify("commit checkpoints", e);
        if checkpoints.is_empty() {
            return tx.commit().await.map_err(err);
        }
        let mut slots = Vec::with_capacity(checkpoints.len());
        let mut epochs = Vec::with_capacity(checkpoints.len());
        for slot in checkpoints.keys() {
            let Some(epoch) = fence.grants.get(slot) else {
                return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
            };
            slots.push(slot.0 as i32);
            epochs.push(epoch.0 as i64);
        }
        // Every change of owner locks the replica set's row first (FOR UPDATE or an UPDATE); holding
        // it FOR SHARE makes changes wait for this commit, and one that committed before is visible
        // to the next statement (READ COMMITTED takes a new snapshot per statement). One row lock per
        // commit instead of one per slot: locking a row writes to it.
        sqlx::query(&format!(
            "SELECT 1 FROM {} WHERE name = $1 FOR SHARE",
            self.tables.replica_sets
        ))
        .bind(fence.replica_set.as_str())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let commits: Vec<i64> = checkpoints.values().map(|p| p.commit as i64).collect();
        let globals: Vec<i64> = checkpoints.values().map(|p| p.global as i64).collect();
        // Check ownership and advance the checkpoints in one statement (one snapshot): nothing is
        // written unless every slot is still ours at its epoch.
        let row = sqlx::query(&format!(
            "WITH owned AS ( \
                 SELECT array_agg(s.slot) AS slots FROM {slots} AS s \
                 JOIN unnest($3::int[], $6::bigint[]) AS g(slot, epoch) ON s.slot = g.slot \
                 WHERE s.replica_set = $1 AND s.owner = $7 AND s.epoch = g.epoch), \
             advanced AS ( \
                 INSERT INTO {checkpoints} AS c (replica_set, projection, slot, commit_position, global_position) \
                 SELECT $1, $2, u.slot, u.commit_position, u.global_position \
                 FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS u(slot, commit_position, global_position) \
                 WHERE cardinality((SELECT slots FROM owned)) = cardinality($3::int[]) \
                 ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                     commit_position = excluded.commit_position, \
                     global_position = excluded.global_position, updated_at = clock_timestamp() \
                 WHERE (c.commit_position, c.global_position) <= (excluded.commit_position, excluded.global_position) \
                 RETURNING slot) \
             SELECT COALESCE((SELECT slots FROM owned), '{{}}'), ARRAY(SELECT slot FROM advanced)",
            slots = self.tables.slots,
            checkpoints = self.tables.checkpoints
        ))
        .bind(fence.replica_set.as_str())
        .bind(projection)
        .bind(&slots)
        .bind(&commits)
        .bind(&globals)
        .bind(&epochs)
        .bind(fence.worker.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let owned: Vec<i32> = row.get(0);
        let advanced: Vec<i32> = row.get(1);
        if owned.len() != slots.len() {
            let lost = slots.iter().find(|s| !owned.contains(s)).copied().unwrap_or(slots[0]);
            return Err(StoreError::Fenced {
                worker: fence.worker.clone(),
                slot: Slot(lost as u32),
            });
        }
        if advanced.len() != slots.len() {
            let behind = slots.iter().find(|s| !advanced.contains(s)).copied().unwrap_or(slots[0]);
            return Err(StoreError::CheckpointRegression {
                projection: projection.to_owned(),
                slot: Slot(behind as u32),
            });
        }
        tx.commit().await.map_err(err)
    }
}
