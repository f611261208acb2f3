//! The checkpoint store port on PostgreSQL: fenced commits inside the projection's transaction.
//!
//! A slot's checkpoint is the greatest of its row in `checkpoints` and of every `progress` row that
//! lists it. A commit whose slots all advance to one position (the runtime's usual batch, after its
//! cursors converge) writes the worker's single progress row; other commits write per-slot rows.
//! Only an owner that passes the fence writes either, so every row is a true "processed up to".

use std::collections::BTreeMap;

use async_trait::async_trait;
use orchestrator_core::ports::{
    CheckpointStore, Fence, ProjectionStop, StoppedProjection, StoreResult,
};
use orchestrator_core::{Position, ReplicaSetName, Slot, WorkerId};
use sqlx::Row;

use crate::error::classify;
use crate::{PgStore, PgTx, Tables};

#[async_trait]
impl CheckpointStore for PgStore {
    type Tx = PgTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        let err = |e| classify("load checkpoints", e);
        let wanted: Vec<i32> = slots.iter().map(|s| s.0 as i32).collect();
        let mut loaded: BTreeMap<Slot, Position> =
            slots.iter().map(|s| (*s, Position::START)).collect();
        let mut raise = |slot: i32, position: Position| {
            if let Some(current) = loaded.get_mut(&Slot(slot as u32)) {
                *current = (*current).max(position);
            }
        };
        // One statement, so one snapshot: a commit that moves a slot from a progress row to its own
        // row between two reads would otherwise hide it from both, and the slot would replay.
        let rows = sqlx::query(&self.sql.checkpoints.load)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(&wanted)
            .fetch_all(&self.pool)
            .await
            .map_err(err)?;
        for row in rows {
            raise(row.get(0), position(row.get(1), row.get(2)));
        }
        Ok(loaded)
    }

    fn is_store_failure(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        crate::error::is_store_failure(error)
    }

    async fn begin(&self) -> StoreResult<PgTx> {
        crate::begin::begin(&self.pool, None).await.map_err(|e| classify("begin a transaction", e))
    }

    async fn commit(
        &self,
        mut tx: PgTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        // The SQL and its steps live in `fencing.rs`, shared with the other drivers' stores.
        self.fencing().commit(&mut tx, fence, projection, checkpoints).await?;
        tx.commit().await.map_err(|e| classify("commit checkpoints", e))
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
        mut tx: PgTx,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()> {
        self.fencing().reset(&mut tx, replica_set, projection).await?;
        tx.commit().await.map_err(|e| classify("reset a projection", e))
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
                        position: position(commit, global),
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
        let deleted = sqlx::query(&self.sql.checkpoints.resume_projection)
            .bind(replica_set.as_str())
            .bind(projection)
            .execute(&self.pool)
            .await
            .map_err(|e| classify("resume a projection", e))?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        let err = |e| classify("remove a projection", e);
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        for sql in &self.sql.checkpoints.remove {
            sqlx::query(sql)
                .bind(replica_set.as_str())
                .bind(projection)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }
}

fn position(commit: i64, global: i64) -> Position {
    Position { commit: commit as u64, global: global as u64 }
}

impl PgStore {
    /// Folds the progress rows of `workers` into per-slot checkpoints and deletes them, inside a
    /// coordination transaction that holds the replica set row (a leave or an eviction).
    pub(crate) async fn fold_progress(
        &self,
        tx: &mut PgTx,
        replica_set: &ReplicaSetName,
        workers: &[&WorkerId],
    ) -> Result<(), sqlx::Error> {
        let workers: Vec<&str> = workers.iter().map(|w| w.as_str()).collect();
        sqlx::query(&self.sql.checkpoints.fold_progress)
            .bind(replica_set.as_str())
            .bind(&workers)
            .execute(&mut **tx)
            .await
            .map(drop)
    }
}

/// The checkpoint store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct CheckpointSql {
    /// Every checkpoint row and progress row of the wanted slots, in one snapshot.
    load: String,
    /// The projections with checkpoints.
    projections: String,
    /// Records a stopped projection unless one is recorded.
    stop_projection: String,
    /// The stopped projections and how long ago each stopped.
    stopped_projections: String,
    /// Forgets a projection's stop.
    resume_projection: String,
    /// Folds leavers' progress rows into per-slot checkpoints.
    fold_progress: String,
    /// Deletes one projection's rows, table by table.
    remove: Vec<String>,
}

impl CheckpointSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            load: format!(
                "SELECT slot, commit_position, global_position FROM {checkpoints} \
                 WHERE replica_set = $1 AND projection = $2 AND slot = ANY($3) \
                 UNION ALL \
                 SELECT s, p.commit_position, p.global_position FROM {progress} AS p, unnest(p.slots) AS s \
                 WHERE p.replica_set = $1 AND p.projection = $2 AND p.slots && $3 AND s = ANY($3)",
                checkpoints = t.checkpoints,
                progress = t.progress
            ),
            projections: format!(
                "SELECT projection FROM {} WHERE replica_set = $1 \
                 UNION SELECT projection FROM {} WHERE replica_set = $1 ORDER BY 1",
                t.checkpoints, t.progress
            ),
            stop_projection: format!(
                "INSERT INTO {} (replica_set, projection, commit_position, global_position, aggregate, \
                     event_type, error) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (replica_set, projection) DO NOTHING",
                t.stopped_projections
            ),
            stopped_projections: format!(
                "SELECT projection, commit_position, global_position, aggregate, event_type, error, \
                     (GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - stopped_at), 0) * 1000)::bigint \
                 FROM {} WHERE replica_set = $1 ORDER BY projection",
                t.stopped_projections
            ),
            resume_projection: format!(
                "DELETE FROM {} WHERE replica_set = $1 AND projection = $2",
                t.stopped_projections
            ),
            fold_progress: format!(
                "WITH gone AS (DELETE FROM {progress} WHERE replica_set = $1 AND worker_id = ANY($2) \
                     RETURNING projection, slots, commit_position, global_position), \
                 best AS (SELECT DISTINCT ON (g.projection, s) g.projection, s AS slot, g.commit_position, g.global_position \
                     FROM gone AS g, unnest(g.slots) AS s \
                     ORDER BY g.projection, s, g.commit_position DESC, g.global_position DESC) \
                 INSERT INTO {checkpoints} AS c (replica_set, projection, slot, commit_position, global_position) \
                 SELECT $1, projection, slot, commit_position, global_position FROM best \
                 ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                     commit_position = excluded.commit_position, global_position = excluded.global_position, \
                     updated_at = clock_timestamp() \
                 WHERE (c.commit_position, c.global_position) < (excluded.commit_position, excluded.global_position)",
                progress = t.progress,
                checkpoints = t.checkpoints
            ),
            remove: [
                &t.checkpoints,
                &t.progress,
                &t.stopped_projections,
                &t.dead_letters,
                &t.skipped_letters,
            ]
            .iter()
            .map(|table| format!("DELETE FROM {table} WHERE replica_set = $1 AND projection = $2"))
            .collect(),
        }
    }
}
