//! The checkpoint store port on SQLite: fenced commits inside the projection's transaction.
//!
//! The transaction is `BEGIN IMMEDIATE`, holding SQLite's write lock from the start, so the
//! ownership check and the checkpoint writes cannot interleave with a change of owner.

use std::collections::BTreeMap;

use async_trait::async_trait;
use orchestrator_core::ports::{CheckpointStore, Fence, StoreError, StoreResult};
use orchestrator_core::{Position, ReplicaSetName, Slot};
use sqlx::Row;

use crate::error::classify;
use crate::{NOW_MS, SqliteStore, SqliteTx};

#[async_trait]
impl CheckpointStore for SqliteStore {
    type Tx = SqliteTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        let sql = format!(
            "SELECT slot, global_position FROM {} WHERE replica_set = ? AND projection = ?",
            self.tables.checkpoints
        );
        let rows = sqlx::query(&sql)
            .bind(replica_set.as_str())
            .bind(projection)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify("load checkpoints", e))?;
        let mut loaded: BTreeMap<Slot, Position> =
            slots.iter().map(|s| (*s, Position::START)).collect();
        for row in rows {
            let slot = Slot(row.get::<i64, _>(0) as u32);
            if let Some(position) = loaded.get_mut(&slot) {
                *position = Position::global(row.get::<i64, _>(1) as u64);
            }
        }
        Ok(loaded)
    }

    async fn begin(&self) -> StoreResult<SqliteTx> {
        self.begin_write("begin a transaction").await
    }

    async fn commit(
        &self,
        mut tx: SqliteTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        let err = |e| classify("commit checkpoints", e);
        let owns = format!(
            "SELECT COUNT(*) FROM {} WHERE replica_set = ? AND slot = ? AND owner = ? AND epoch = ?",
            self.tables.slots
        );
        for slot in checkpoints.keys() {
            let fenced = || StoreError::Fenced { worker: fence.worker.clone(), slot: *slot };
            let epoch = fence.grants.get(slot).ok_or_else(fenced)?;
            let owned: i64 = sqlx::query_scalar(&owns)
                .bind(fence.replica_set.as_str())
                .bind(i64::from(slot.0))
                .bind(fence.worker.as_str())
                .bind(epoch.0 as i64)
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
            if owned != 1 {
                return Err(fenced());
            }
        }
        let advance = format!(
            "INSERT INTO {t} (replica_set, projection, slot, commit_position, global_position, updated_at) \
             VALUES (?, ?, ?, 0, ?, {NOW_MS}) \
             ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                 global_position = excluded.global_position, updated_at = excluded.updated_at \
             WHERE {t}.global_position <= excluded.global_position",
            t = self.tables.checkpoints
        );
        for (slot, position) in checkpoints {
            let advanced = sqlx::query(&advance)
                .bind(fence.replica_set.as_str())
                .bind(projection)
                .bind(i64::from(slot.0))
                .bind(position.global as i64)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            if advanced.rows_affected() != 1 {
                return Err(StoreError::CheckpointRegression {
                    projection: projection.to_owned(),
                    slot: *slot,
                });
            }
        }
        tx.commit().await.map_err(err)
    }
}
