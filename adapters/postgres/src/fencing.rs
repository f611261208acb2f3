//! The fenced commit, the reset and the dead letters' writes, written once and run on any connection to the store's database.
//!
//! [`Fencing`] holds the statements (under the store's table names) and the steps between them: the
//! replica set's row locked `FOR SHARE`, one statement that checks the worker's claims and advances
//! the checkpoints, the diagnosis of a refusal. What it needs from the connection is
//! [`FencingTx`]: one method per statement shape, so each driver binds the same parameters the same
//! way. sqlx's [`PgTx`] implements it here; `orchestrator-diesel` implements it for a diesel-async
//! connection, so a projection written with diesel commits under the very same SQL.
//!
//! The caller ends the transaction: it commits when [`Fencing::commit`] or [`Fencing::reset`]
//! succeeds, and rolls back (or drops the transaction) when they fail.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::ports::{Fence, StoreError, StoreResult};
use orchestrator_core::{Position, ReplicaSetName, Slot};
use sqlx::Row;

use crate::error::classify;
use crate::{PgStore, PgTx, Tables};

/// The fence check, shared by both write paths: `$1` replica set, `$3` claimed slots, `$6` their
/// epochs indexed by slot (`$6[slot + 1]`), `$7` worker. Yields `slots`, the claimed slots the
/// worker really owns at those epochs. Probing the primary key with `slot = ANY($3)` and looking the
/// epoch up by index keeps it proportional to the claim whatever the planner knows of the table.
const OWNED: &str = "owned AS ( \
     SELECT array_agg(s.slot) AS slots FROM {slots} AS s \
     WHERE s.replica_set = $1 AND s.slot = ANY($3::int[]) AND s.owner = $7 \
       AND s.epoch = ($6::bigint[])[s.slot + 1]), \
 fine AS (SELECT cardinality((SELECT slots FROM owned)) IS NOT DISTINCT FROM cardinality($3::int[]) AS ok)";

/// What failed, in error messages.
const COMMIT: &str = "commit checkpoints";
const RESET: &str = "reset a projection";

/// What a commit claims, as the statements bind it.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The replica set.
    pub replica_set: &'a str,
    /// The projection whose checkpoints advance.
    pub projection: &'a str,
    /// The committing worker.
    pub worker: &'a str,
    /// The slots advanced, ascending.
    pub slots: &'a [i32],
    /// The epoch each slot was granted under, indexed by slot number (`-1` where not claimed).
    pub epochs: &'a [i64],
}

/// The connection a fenced commit or a reset runs on, inside its open transaction: one method per
/// statement shape of [`Fencing`]. Each method runs the SQL it is given with the parameters in the
/// order documented, and maps its driver's errors with the same rules as
/// [`classify_error`](crate::classify_error) (connection loss, serialization failure, deadlock:
/// `Unavailable`).
#[async_trait]
pub trait FencingTx: Send {
    /// Runs `sql` with `params` bound as text `$1`, `$2`, ...; returns nothing. `what` names the
    /// operation in error messages.
    async fn execute_text(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<()>;

    /// Runs `sql` with `params` bound as text like [`FencingTx::execute_text`]; returns the number
    /// of rows it inserted, updated or deleted (its command tag's count).
    async fn execute_count(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<u64>;

    /// Runs [`Fencing`]'s progress upsert: binds `$1` replica set, `$2` projection, `$3` slots
    /// (`int[]`), `$4` commit position and `$5` global position (`bigint`), `$6` epochs
    /// (`bigint[]`), `$7` worker; returns its one row's `owned` (bool) and `advanced` (bigint).
    async fn advance_progress(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        to: (i64, i64),
    ) -> StoreResult<(bool, i64)>;

    /// Runs [`Fencing`]'s per-slot upsert: binds like [`FencingTx::advance_progress`] but `$4` and
    /// `$5` are the per-slot commit and global positions (`bigint[]`, in slot order); returns its
    /// one row's `owned` (bool) and `advanced` (the slots advanced, `int[]`).
    async fn advance_slots(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        commits: &[i64],
        globals: &[i64],
    ) -> StoreResult<(bool, Vec<i32>)>;

    /// Runs [`Fencing`]'s ownership query: binds `$1` replica set, `$2` slots (`int[]`), `$3`
    /// epochs (`bigint[]`), `$4` worker; returns the column `slot` (int) of every row.
    async fn owned_slots(&mut self, sql: &str, claim: &Claim<'_>) -> StoreResult<Vec<i32>>;
}

/// The fenced commit's and the reset's statements under one store's table names, and the steps
/// between them; from [`PgStore::fencing`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fencing {
    tables: Arc<Tables>,
}

impl PgStore {
    /// The fenced commit and the reset of this store, to run on a connection of another driver
    /// (see [`FencingTx`]).
    pub fn fencing(&self) -> Fencing {
        Fencing { tables: self.tables.clone() }
    }
}

impl Fencing {
    /// Checks the fence and advances the checkpoints inside `tx`, as
    /// [`CheckpointStore::commit`](orchestrator_core::ports::CheckpointStore::commit) specifies,
    /// short of ending the transaction: commit `tx` when this returns `Ok`, roll it back otherwise
    /// (`Fenced`, `CheckpointRegression`, or an error of the connection).
    pub async fn commit<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        let mut slots = Vec::with_capacity(checkpoints.len());
        for slot in checkpoints.keys() {
            if !fence.grants.contains_key(slot) {
                return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
            }
            slots.push(slot.0 as i32);
        }
        let epochs = epochs_by_slot(fence, &slots);
        let claim = Claim {
            replica_set: fence.replica_set.as_str(),
            projection,
            worker: fence.worker.as_str(),
            slots: &slots,
            epochs: &epochs,
        };
        // Every change of owner locks the replica set's row first (FOR UPDATE or an UPDATE); holding
        // it FOR SHARE makes changes wait for this commit, and one that committed before is visible
        // to the next statement (READ COMMITTED takes a new snapshot per statement). One row lock per
        // commit instead of one per slot: locking a row writes to it.
        tx.execute_text(COMMIT, &self.lock_replica_set("FOR SHARE"), &[claim.replica_set]).await?;
        let mut positions = checkpoints.values();
        let first = *positions.next().expect("not empty");
        let (owned, behind) = if checkpoints.len() > 1 && positions.all(|p| *p == first) {
            let (owned, advanced) = tx
                .advance_progress(
                    &self.advance_progress(),
                    &claim,
                    (first.commit as i64, first.global as i64),
                )
                .await?;
            (owned, (owned && advanced == 0).then(|| Slot(slots[0] as u32)))
        } else {
            let commits: Vec<i64> = checkpoints.values().map(|p| p.commit as i64).collect();
            let globals: Vec<i64> = checkpoints.values().map(|p| p.global as i64).collect();
            let (owned, advanced) =
                tx.advance_slots(&self.advance_slots(), &claim, &commits, &globals).await?;
            let behind = slots.iter().find(|s| !advanced.contains(s)).map(|s| Slot(*s as u32));
            (owned, if owned { behind } else { None })
        };
        if !owned {
            // The first claimed slot the worker no longer owns at its epoch, for the error message.
            let still = tx.owned_slots(&self.owned_slots(), &claim).await?;
            let lost = slots.iter().find(|s| !still.contains(s)).copied().unwrap_or(slots[0]);
            return Err(StoreError::Fenced {
                worker: fence.worker.clone(),
                slot: Slot(lost as u32),
            });
        }
        if let Some(slot) = behind {
            return Err(StoreError::CheckpointRegression {
                projection: projection.to_owned(),
                slot,
            });
        }
        Ok(())
    }

    /// Deletes every checkpoint of `projection` in `replica_set` and gives every slot a new epoch
    /// inside `tx`, as [`CheckpointStore::reset`](orchestrator_core::ports::CheckpointStore::reset)
    /// specifies, short of committing: commit `tx` when this returns `Ok`.
    pub async fn reset<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()> {
        let t = &self.tables;
        // The lock every commit takes FOR SHARE: commits in flight finish first, later ones see
        // the new epochs and are fenced.
        tx.execute_text(RESET, &self.lock_replica_set("FOR UPDATE"), &[replica_set.as_str()])
            .await?;
        // A reset projection is no longer stopped and has no dead letters: it starts over from the
        // first event. The log of skipped letters stays, as a record.
        for table in [&t.checkpoints, &t.progress, &t.stopped_projections, &t.dead_letters] {
            tx.execute_text(
                RESET,
                &format!("DELETE FROM {table} WHERE replica_set = $1 AND projection = $2"),
                &[replica_set.as_str(), projection],
            )
            .await?;
        }
        tx.execute_text(
            RESET,
            &format!("UPDATE {} SET epoch = epoch + 1 WHERE replica_set = $1", t.slots),
            &[replica_set.as_str()],
        )
        .await
    }

    /// The table names the statements run on.
    pub(crate) fn tables(&self) -> &Tables {
        &self.tables
    }

    /// A query whose one row and column (`identity`, text) names the database and the slots table
    /// it resolves to: two connections that return the same value fence against the same rows.
    pub fn identity_sql(&self) -> String {
        format!(
            "SELECT current_database()::text || '/' || COALESCE(to_regclass('{}')::oid::text, 'missing') AS identity",
            self.tables.slots
        )
    }

    fn lock_replica_set(&self, mode: &str) -> String {
        format!("SELECT 1 FROM {} WHERE name = $1 {mode}", self.tables.replica_sets)
    }

    /// All claimed slots advance to one position: one upsert of the worker's progress row. Slots its
    /// previous progress row listed but this one does not are first written to `checkpoints`
    /// (a worker catching up on slots it just received commits them without its older ones).
    /// Moving a slot the previous row also listed to an earlier position is a regression (nothing
    /// advanced).
    fn advance_progress(&self) -> String {
        let t = &self.tables;
        format!(
            "WITH {owned}, \
             previous AS (SELECT slots, commit_position, global_position FROM {progress} \
                 WHERE replica_set = $1 AND projection = $2 AND worker_id = $7 \
                   AND slots IS DISTINCT FROM $3::int[]), \
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
             SELECT (SELECT ok FROM fine) AS owned, (SELECT count(*) FROM advanced) AS advanced, \
                 (SELECT count(*) FROM spilled) AS spilled",
            owned = OWNED.replace("{slots}", &t.slots),
            progress = t.progress,
            checkpoints = t.checkpoints
        )
    }

    /// Each claimed slot advances to its own position: one upsert of per-slot rows.
    fn advance_slots(&self) -> String {
        let t = &self.tables;
        format!(
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
             SELECT (SELECT ok FROM fine) AS owned, ARRAY(SELECT slot FROM advanced) AS advanced",
            owned = OWNED.replace("{slots}", &t.slots),
            checkpoints = t.checkpoints
        )
    }

    /// The claimed slots the worker still owns at its epochs.
    fn owned_slots(&self) -> String {
        format!(
            "SELECT s.slot FROM {} AS s \
             WHERE s.replica_set = $1 AND s.slot = ANY($2::int[]) AND s.owner = $4 \
               AND s.epoch = ($3::bigint[])[s.slot + 1]",
            self.tables.slots
        )
    }
}

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
impl FencingTx for PgTx {
    async fn execute_text(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<()> {
        let mut query = sqlx::query(sql);
        for param in params {
            query = query.bind(*param);
        }
        query.execute(&mut **self).await.map(drop).map_err(|e| classify(what, e))
    }

    async fn execute_count(&mut self, what: &str, sql: &str, params: &[&str]) -> StoreResult<u64> {
        let mut query = sqlx::query(sql);
        for param in params {
            query = query.bind(*param);
        }
        let done = query.execute(&mut **self).await.map_err(|e| classify(what, e))?;
        Ok(done.rows_affected())
    }

    async fn advance_progress(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        to: (i64, i64),
    ) -> StoreResult<(bool, i64)> {
        let row = sqlx::query(sql)
            .bind(claim.replica_set)
            .bind(claim.projection)
            .bind(claim.slots)
            .bind(to.0)
            .bind(to.1)
            .bind(claim.epochs)
            .bind(claim.worker)
            .fetch_one(&mut **self)
            .await
            .map_err(|e| classify(COMMIT, e))?;
        Ok((row.get("owned"), row.get("advanced")))
    }

    async fn advance_slots(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        commits: &[i64],
        globals: &[i64],
    ) -> StoreResult<(bool, Vec<i32>)> {
        let row = sqlx::query(sql)
            .bind(claim.replica_set)
            .bind(claim.projection)
            .bind(claim.slots)
            .bind(commits)
            .bind(globals)
            .bind(claim.epochs)
            .bind(claim.worker)
            .fetch_one(&mut **self)
            .await
            .map_err(|e| classify(COMMIT, e))?;
        Ok((row.get("owned"), row.get("advanced")))
    }

    async fn owned_slots(&mut self, sql: &str, claim: &Claim<'_>) -> StoreResult<Vec<i32>> {
        sqlx::query_scalar(sql)
            .bind(claim.replica_set)
            .bind(claim.slots)
            .bind(claim.epochs)
            .bind(claim.worker)
            .fetch_all(&mut **self)
            .await
            .map_err(|e| classify(COMMIT, e))
    }
}
