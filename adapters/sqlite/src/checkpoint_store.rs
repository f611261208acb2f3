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
        if checkpoints.is_empty() {
            return tx.commit().await.map_err(err);
        }
        // Claims and positions travel as JSON arrays so each check is one statement whatever the
        // number of slots (a batch commits every slot the worker owns).
        let mut claims = Vec::with_capacity(checkpoints.len());
        for slot in checkpoints.keys() {
            let Some(epoch) = fence.grants.get(slot) else {
                return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
            };
            claims.push(format!("[{},{}]", slot.0, epoch.0));
        }
        let claims = format!("[{}]", claims.join(","));
        let owned_sql = format!(
            "SELECT s.slot FROM json_each(?3) AS j JOIN {} AS s \
               ON s.replica_set = ?1 AND s.slot = json_extract(j.value, '$[0]') \
             WHERE s.owner = ?2 AND s.epoch = json_extract(j.value, '$[1]')",
            self.tables.slots
        );
        let owned: Vec<i64> = sqlx::query_scalar(&owned_sql)
            .bind(fence.replica_set.as_str())
            .bind(fence.worker.as_str())
            .bind(&claims)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        if owned.len() != checkpoints.len() {
            let lost = checkpoints.keys().find(|s| !owned.contains(&i64::from(s.0))).copied();
            return Err(StoreError::Fenced {
                worker: fence.worker.clone(),
                slot: lost.unwrap_or(Slot(0)),
            });
        }
        let positions: Vec<String> =
            checkpoints.iter().map(|(slot, p)| format!("[{},{}]", slot.0, p.global)).collect();
        let positions = format!("[{}]", positions.join(","));
        let advance = format!(
            "INSERT INTO {t} (replica_set, projection, slot, commit_position, global_position, updated_at) \
             SELECT ?1, ?2, json_extract(value, '$[0]'), 0, json_extract(value, '$[1]'), {NOW_MS} \
             FROM json_each(?3) WHERE true \
             ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                 global_position = excluded.global_position, updated_at = excluded.updated_at \
             WHERE {t}.global_position <= excluded.global_position",
            t = self.tables.checkpoints
        );
        let advanced = sqlx::query(&advance)
            .bind(fence.replica_set.as_str())
            .bind(projection)
            .bind(&positions)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if advanced.rows_affected() != checkpoints.len() as u64 {
            let ahead_sql = format!(
                "SELECT c.slot FROM json_each(?3) AS j JOIN {} AS c \
                   ON c.replica_set = ?1 AND c.projection = ?2 AND c.slot = json_extract(j.value, '$[0]') \
                 WHERE c.global_position > json_extract(j.value, '$[1]') LIMIT 1",
                self.tables.checkpoints
            );
            let ahead: Option<i64> = sqlx::query_scalar(&ahead_sql)
                .bind(fence.replica_set.as_str())
                .bind(projection)
                .bind(&positions)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err)?;
            let slot = Slot(ahead.unwrap_or(0) as u32);
            return Err(StoreError::CheckpointRegression {
                projection: projection.to_owned(),
                slot,
            });
        }
        tx.commit().await.map_err(err)
    }
    async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>> {
        let sql = format!(
            "SELECT DISTINCT projection FROM {} WHERE replica_set = ? ORDER BY projection",
            self.tables.checkpoints
        );
        sqlx::query_scalar(&sql)
            .bind(replica_set.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify("list projections", e))
    }

    async fn reset(
        &self,
        mut tx: SqliteTx,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()> {
        let err = |e| classify("reset a projection", e);
        let delete = format!(
            "DELETE FROM {} WHERE replica_set = ? AND projection = ?",
            self.tables.checkpoints
        );
        sqlx::query(&delete)
            .bind(replica_set.as_str())
            .bind(projection)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let fence =
            format!("UPDATE {} SET epoch = epoch + 1 WHERE replica_set = ?", self.tables.slots);
        sqlx::query(&fence).bind(replica_set.as_str()).execute(&mut *tx).await.map_err(err)?;
        tx.commit().await.map_err(err)
    }
}
