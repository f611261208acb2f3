//! The checkpoint store port on PostgreSQL: fenced commits inside the projection's transaction.
//!
//! A slot's checkpoint is the greatest of its row in `checkpoints` and of every `progress` row that
//! lists it. A commit whose slots all advance to one position (the runtime's usual batch, after its
//! cursors converge) writes the worker's single progress row; other commits write per-slot rows.
//! Only an owner that passes the fence writes either, so every row is a true "processed up to".

use std::collections::BTreeMap;

use async_trait::async_trait;
use orchestrator_core::ports::{CheckpointStore, Fence, StoreError, StoreResult};
use orchestrator_core::{Position, ReplicaSetName, Slot, WorkerId};
use sqlx::Row;

use crate::error::classify;
use crate::{PgStore, PgTx};

/// The fence check, shared by both write paths: `$1` replica set, `$3` claimed slots, `$6` their
/// epochs indexed by slot (`$6[slot + 1]`), `$7` worker. Yields `slots`, the claimed slots the
/// worker really owns at those epochs. Probing the primary key with `slot = ANY($3)` and looking the
/// epoch up by index keeps it proportional to the claim whatever the planner knows of the table.
const OWNED: &str = "owned AS ( \
     SELECT array_agg(s.slot) AS slots FROM {slots} AS s \
     WHERE s.replica_set = $1 AND s.slot = ANY($3::int[]) AND s.owner = $7 \
       AND s.epoch = ($6::bigint[])[s.slot + 1]), \
 fine AS (SELECT cardinality((SELECT slots FROM owned)) IS NOT DISTINCT FROM cardinality($3::int[]) AS ok)";

/// Epochs laid out by slot number (`-1` where not claimed), as [`OWNED`] expects.
fn epochs_by_slot(fence: &Fence, slots: &[i32]) -> Vec<i64> {
    let len = slots.iter().copied().max().map_or(0, |max| max as usize + 1);
    let mut epochs = vec![-1; len];
    for slot in slots {
        if let Some(epoch) = fence.grants.get(&Slot(*slot as u32)) {
            epochs[*slot as usize] = epoch.0 as i64;
        }
    }
    epochs
}

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
        let rows = sqlx::query(&format!(
            "SELECT slot, commit_position, global_position FROM {checkpoints} \
             WHERE replica_set = $1 AND projection = $2 AND slot = ANY($3) \
             UNION ALL \
             SELECT s, p.commit_position, p.global_position FROM {progress} AS p, unnest(p.slots) AS s \
             WHERE p.replica_set = $1 AND p.projection = $2 AND p.slots && $3 AND s = ANY($3)",
            checkpoints = self.tables.checkpoints,
            progress = self.tables.progress
        ))
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
        for slot in checkpoints.keys() {
            if !fence.grants.contains_key(slot) {
                return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
            }
            slots.push(slot.0 as i32);
        }
        let epochs = epochs_by_slot(fence, &slots);
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
        let mut positions = checkpoints.values();
        let first = *positions.next().expect("not empty");
        let (owned, advanced) = if checkpoints.len() > 1 && positions.all(|p| *p == first) {
            self.advance_progress(&mut tx, fence, projection, &slots, &epochs, first).await?
        } else {
            self.advance_slots(&mut tx, fence, projection, &slots, &epochs, checkpoints).await?
        };
        if !owned {
            let lost = self.first_lost_slot(&mut tx, fence, &slots, &epochs).await?;
            return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: lost });
        }
        if let Some(slot) = advanced {
            return Err(StoreError::CheckpointRegression {
                projection: projection.to_owned(),
                slot,
            });
        }
        tx.commit().await.map_err(err)
    }

    async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(&format!(
            "SELECT projection FROM {} WHERE replica_set = $1 \
             UNION SELECT projection FROM {} WHERE replica_set = $1 ORDER BY 1",
            self.tables.checkpoints, self.tables.progress
        ))
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
        let err = |e| classify("reset a projection", e);
        // The lock every commit takes FOR SHARE: commits in flight finish first, later ones see
        // the new epochs and are fenced.
        sqlx::query(&format!(
            "SELECT 1 FROM {} WHERE name = $1 FOR UPDATE",
            self.tables.replica_sets
        ))
        .bind(replica_set.as_str())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        for table in [&self.tables.checkpoints, &self.tables.progress] {
            sqlx::query(&format!("DELETE FROM {table} WHERE replica_set = $1 AND projection = $2"))
                .bind(replica_set.as_str())
                .bind(projection)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        sqlx::query(&format!(
            "UPDATE {} SET epoch = epoch + 1 WHERE replica_set = $1",
            self.tables.slots
        ))
        .bind(replica_set.as_str())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        let err = |e| classify("remove a projection", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        for table in [&self.tables.checkpoints, &self.tables.progress] {
            sqlx::query(&format!("DELETE FROM {table} WHERE replica_set = $1 AND projection = $2"))
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
    /// All claimed slots advance to `to`: one upsert of the worker's progress row. Slots its
    /// previous progress row listed but this one does not are first written to `checkpoints`
    /// (a worker catching up on slots it just received commits them without its older ones).
    /// Moving a slot the previous row also listed to an earlier position is a regression.
    /// Returns (fence passed, slot that would have moved backwards).
    async fn advance_progress(
        &self,
        tx: &mut PgTx,
        fence: &Fence,
        projection: &str,
        slots: &[i32],
        epochs: &[i64],
        to: Position,
    ) -> StoreResult<(bool, Option<Slot>)> {
        let t = &self.tables;
        let row = sqlx::query(&format!(
            "WITH {owned}, \
             previous AS (SELECT slots, commit_position, global_position FROM {progress} \
                 WHERE replica_set = $1 AND projection = $2 AND worker_id = $7), \
             spilled AS ( \
                 INSERT INTO {checkpoints} AS c (replica_set, projection, slot, commit_position, global_position) \
                 SELECT $1, $2, s, p.commit_position, p.global_position FROM previous AS p, unnest(p.slots) AS s \
                 WHERE (SELECT ok FROM fine) AND NOT (s = ANY($3::int[])) \
                 ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                     commit_position = excluded.commit_position, global_position = excluded.global_position, \
                     updated_at = clock_timestamp() \
                 WHERE (c.commit_position, c.global_position) < (excluded.commit_position, excluded.global_position) \
                 RETURNING 1), \
             advanced AS ( \
                 INSERT INTO {progress} AS p (replica_set, projection, worker_id, slots, commit_position, global_position) \
                 SELECT $1, $2, $7, $3, $4, $5 WHERE (SELECT ok FROM fine) \
                 ON CONFLICT (replica_set, projection, worker_id) DO UPDATE SET slots = excluded.slots, \
                     commit_position = excluded.commit_position, global_position = excluded.global_position, \
                     updated_at = clock_timestamp() \
                 WHERE (p.commit_position, p.global_position) <= (excluded.commit_position, excluded.global_position) \
                    OR NOT (p.slots && excluded.slots) \
                 RETURNING 1) \
             SELECT (SELECT ok FROM fine), (SELECT count(*) FROM advanced), (SELECT count(*) FROM spilled)",
            owned = OWNED.replace("{slots}", &t.slots),
            progress = t.progress,
            checkpoints = t.checkpoints
        ))
        .bind(fence.replica_set.as_str())
        .bind(projection)
        .bind(slots)
        .bind(to.commit as i64)
        .bind(to.global as i64)
        .bind(epochs)
        .bind(fence.worker.as_str())
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| classify("commit checkpoints", e))?;
        let owned: bool = row.get(0);
        let advanced: i64 = row.get(1);
        Ok((owned, (owned && advanced == 0).then(|| Slot(slots[0] as u32))))
    }

    /// Each claimed slot advances to its own position: one upsert of per-slot rows.
    async fn advance_slots(
        &self,
        tx: &mut PgTx,
        fence: &Fence,
        projection: &str,
        slots: &[i32],
        epochs: &[i64],
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<(bool, Option<Slot>)> {
        let t = &self.tables;
        let commits: Vec<i64> = checkpoints.values().map(|p| p.commit as i64).collect();
        let globals: Vec<i64> = checkpoints.values().map(|p| p.global as i64).collect();
        let row = sqlx::query(&format!(
            "WITH {owned}, \
             advanced AS ( \
                 INSERT INTO {checkpoints} AS c (replica_set, projection, slot, commit_position, global_position) \
                 SELECT $1, $2, u.slot, u.commit_position, u.global_position \
                 FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS u(slot, commit_position, global_position) \
                 WHERE (SELECT ok FROM fine) \
                 ON CONFLICT (replica_set, projection, slot) DO UPDATE SET \
                     commit_position = excluded.commit_position, \
                     global_position = excluded.global_position, updated_at = clock_timestamp() \
                 WHERE (c.commit_position, c.global_position) <= (excluded.commit_position, excluded.global_position) \
                 RETURNING slot) \
             SELECT (SELECT ok FROM fine), ARRAY(SELECT slot FROM advanced)",
            owned = OWNED.replace("{slots}", &t.slots),
            checkpoints = t.checkpoints
        ))
        .bind(fence.replica_set.as_str())
        .bind(projection)
        .bind(slots)
        .bind(&commits)
        .bind(&globals)
        .bind(epochs)
        .bind(fence.worker.as_str())
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| classify("commit checkpoints", e))?;
        let owned: bool = row.get(0);
        let advanced: Vec<i32> = row.get(1);
        let behind = slots.iter().find(|s| !advanced.contains(s)).map(|s| Slot(*s as u32));
        Ok((owned, if owned { behind } else { None }))
    }

    /// The first claimed slot the worker no longer owns at its epoch, for the error message.
    async fn first_lost_slot(
        &self,
        tx: &mut PgTx,
        fence: &Fence,
        slots: &[i32],
        epochs: &[i64],
    ) -> StoreResult<Slot> {
        let owned: Vec<i32> = sqlx::query_scalar(&format!(
            "SELECT s.slot FROM {} AS s \
             WHERE s.replica_set = $1 AND s.slot = ANY($2::int[]) AND s.owner = $4 \
               AND s.epoch = ($3::bigint[])[s.slot + 1]",
            self.tables.slots
        ))
        .bind(fence.replica_set.as_str())
        .bind(slots)
        .bind(epochs)
        .bind(fence.worker.as_str())
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| classify("commit checkpoints", e))?;
        Ok(Slot(slots.iter().find(|s| !owned.contains(s)).copied().unwrap_or(slots[0]) as u32))
    }

    /// Folds the progress rows of `workers` into per-slot checkpoints and deletes them, inside a
    /// coordination transaction that holds the replica set row (a leave or an eviction).
    pub(crate) async fn fold_progress(
        &self,
        tx: &mut PgTx,
        replica_set: &ReplicaSetName,
        workers: &[&WorkerId],
    ) -> Result<(), sqlx::Error> {
        let workers: Vec<&str> = workers.iter().map(|w| w.as_str()).collect();
        sqlx::query(&format!(
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
            progress = self.tables.progress,
            checkpoints = self.tables.checkpoints
        ))
        .bind(replica_set.as_str())
        .bind(&workers)
        .execute(&mut **tx)
        .await
        .map(drop)
    }
}
