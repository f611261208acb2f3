//! The checkpoint store port on SQLite: fenced commits inside the projection's transaction.
//!
//! The transaction is `BEGIN IMMEDIATE`, holding SQLite's write lock from the start, so the
//! ownership check and the checkpoint writes cannot interleave with a change of owner.

use std::collections::BTreeMap;

use async_trait::async_trait;
use orchestrator_core::ports::{
    CheckpointStore, Fence, ProjectionStop, StoppedProjection, StoreError, StoreResult,
};
use orchestrator_core::{Position, ReplicaSetName, Slot};
use sqlx::Row;

use crate::error::classify;
use crate::event_store::positions_json;
use crate::{NOW_MS, SqliteStore, SqliteTx, Tables};

/// The checkpoint store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct CheckpointSql {
    /// Reads a projection's checkpoints.
    load: String,
    /// Reads the slots a worker owns, with their epochs.
    owned_slots: String,
    /// Advances checkpoints given as a JSON array of `[slot, position]`, never backwards.
    advance: String,
    /// Finds a checkpoint of the JSON array that is ahead of its new position.
    find_ahead: String,
    /// Lists the projections with checkpoints.
    projections: String,
    /// Deletes a projection's checkpoints.
    delete_checkpoints: String,
    /// Deletes a projection's stop (resumes it).
    delete_stop: String,
    /// Deletes a projection's dead letters.
    delete_dead_letters: String,
    /// Deletes a projection's log of skipped letters.
    delete_skipped_letters: String,
    /// Fences every slot of the replica set.
    fence_all_slots: String,
    /// Records a projection's stop unless it is stopped already.
    stop_projection: String,
    /// Lists the stopped projections, with their ages.
    stopped_projections: String,
}

impl CheckpointSql {
    pub(crate) fn new(t: &Tables) -> Self {
        let delete_of_projection =
            |table: &str| format!("DELETE FROM {table} WHERE replica_set = ? AND projection = ?");
        Self {
            load: format!(
                "SELECT slot, global_position FROM {} WHERE replica_set = ? AND projection = ?",
                t.checkpoints
            ),
            owned_slots: format!(
                "SELECT slot, epoch FROM {} WHERE replica_set = ? AND owner = ?",
                t.slots
            ),
            advance: format!(
                "INSERT INTO {t} (replica_set, projection, slot, commit_position, global_position, updated_at) \
                 SELECT ?1, ?2, json_extract(value, '$[0]'), 0, json_extract(value, '$[1]'), {NOW_MS} \
                 FROM json_each(?3) WHERE true \
                 ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                     global_position = excluded.global_position, updated_at = excluded.updated_at \
                 WHERE {t}.global_position <= excluded.global_position",
                t = t.checkpoints
            ),
            find_ahead: format!(
                "SELECT c.slot FROM json_each(?3) AS j JOIN {} AS c \
                   ON c.replica_set = ?1 AND c.projection = ?2 AND c.slot = json_extract(j.value, '$[0]') \
                 WHERE c.global_position > json_extract(j.value, '$[1]') LIMIT 1",
                t.checkpoints
            ),
            projections: format!(
                "SELECT DISTINCT projection FROM {} WHERE replica_set = ? ORDER BY projection",
                t.checkpoints
            ),
            delete_checkpoints: delete_of_projection(&t.checkpoints),
            delete_stop: delete_of_projection(&t.stopped_projections),
            delete_dead_letters: delete_of_projection(&t.dead_letters),
            delete_skipped_letters: delete_of_projection(&t.skipped_letters),
            fence_all_slots: format!(
                "UPDATE {} SET epoch = epoch + 1 WHERE replica_set = ?",
                t.slots
            ),
            stop_projection: format!(
                "INSERT INTO {} (replica_set, projection, commit_position, global_position, aggregate, \
                     event_type, error, stopped_at) VALUES (?, ?, ?, ?, ?, ?, ?, {NOW_MS}) \
                 ON CONFLICT (replica_set, projection) DO NOTHING",
                t.stopped_projections
            ),
            stopped_projections: format!(
                "SELECT projection, commit_position, global_position, aggregate, event_type, error, \
                     MAX({NOW_MS} - stopped_at, 0) \
                 FROM {} WHERE replica_set = ? ORDER BY projection",
                t.stopped_projections
            ),
        }
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    type Tx = SqliteTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        let rows = sqlx::query(&self.sql.checkpoints.load)
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

    fn is_store_failure(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        crate::error::is_store_failure(error)
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
        let sql = &self.sql.checkpoints;
        if checkpoints.is_empty() {
            return tx.commit().await.map_err(err);
        }
        // The worker's slots and epochs, read inside the write transaction (BEGIN IMMEDIATE holds
        // SQLite's only write lock, so no change of ownership can interleave) and compared here.
        // A join with the claims in SQL was planned badly with bound parameters: 34 ms per commit
        // for 256 slots, against well under a millisecond for this.
        let owned: BTreeMap<i64, i64> = sqlx::query_as(&sql.owned_slots)
            .bind(fence.replica_set.as_str())
            .bind(fence.worker.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
            .into_iter()
            .collect();
        let lost = checkpoints.keys().find(|slot| {
            fence
                .grants
                .get(slot)
                .is_none_or(|epoch| owned.get(&i64::from(slot.0)) != Some(&(epoch.0 as i64)))
        });
        if let Some(slot) = lost {
            return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
        }
        let positions = positions_json(checkpoints);
        let advanced = sqlx::query(&sql.advance)
            .bind(fence.replica_set.as_str())
            .bind(projection)
            .bind(&positions)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if advanced.rows_affected() != checkpoints.len() as u64 {
            let ahead: Option<i64> = sqlx::query_scalar(&sql.find_ahead)
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
        sqlx::query_scalar(&self.sql.checkpoints.projections)
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
        // A reset projection is no longer stopped and has no dead letters: it starts over from the
        // first event. The log of skipped letters stays, as a record.
        let sql = &self.sql.checkpoints;
        for delete in [&sql.delete_checkpoints, &sql.delete_stop, &sql.delete_dead_letters] {
            sqlx::query(delete)
                .bind(replica_set.as_str())
                .bind(projection)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        sqlx::query(&sql.fence_all_slots)
            .bind(replica_set.as_str())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        let err = |e| classify("remove a projection", e);
        let mut tx = self.begin_write("remove a projection").await?;
        let sql = &self.sql.checkpoints;
        for delete in [
            &sql.delete_checkpoints,
            &sql.delete_stop,
            &sql.delete_dead_letters,
            &sql.delete_skipped_letters,
        ] {
            sqlx::query(delete)
                .bind(replica_set.as_str())
                .bind(projection)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    async fn stop_projection(
        &self,
        replica_set: &ReplicaSetName,
        stop: &ProjectionStop,
    ) -> StoreResult<()> {
        sqlx::query(&self.sql.checkpoints.stop_projection)
            .bind(replica_set.as_str())
            .bind(&stop.projection)
            .bind(stop.position.commit as i64)
            .bind(stop.position.global as i64)
            .bind(&stop.aggregate)
            .bind(&stop.event_type)
            .bind(&stop.error)
            .execute(&self.pool)
            .await
            .map_err(|e| classify("record a stopped projection", e))?;
        Ok(())
    }

    async fn stopped_projections(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<Vec<StoppedProjection>> {
        let rows: Vec<(String, i64, i64, String, String, String, i64)> =
            sqlx::query_as(&self.sql.checkpoints.stopped_projections)
                .bind(replica_set.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| classify("list stopped projections", e))?;
        Ok(rows
            .into_iter()
            .map(|(projection, commit, global, aggregate, event_type, error, age)| {
                StoppedProjection {
                    stop: ProjectionStop {
                        projection,
                        position: Position { commit: commit as u64, global: global as u64 },
                        aggregate,
                        event_type,
                        error,
                    },
                    age: crate::from_millis(age),
                }
            })
            .collect())
    }

    async fn resume_projection(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<bool> {
        let deleted = sqlx::query(&self.sql.checkpoints.delete_stop)
            .bind(replica_set.as_str())
            .bind(projection)
            .execute(&self.pool)
            .await
            .map_err(|e| classify("resume a projection", e))?;
        Ok(deleted.rows_affected() > 0)
    }
}
