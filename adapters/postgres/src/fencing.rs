//! The fenced commit, the reset and the dead letters' writes, written once and run on any connection to the store's database.
//!
//! [`Fencing`] holds the statements (under the store's table names) and the steps between them: one
//! statement that locks the replica set's row `FOR SHARE`, checks the worker's claims and advances
//! the checkpoints (run a second time when an owner change committed as it began), the diagnosis of
//! a refusal. What it needs from the connection is
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

/// The fence check, shared by both write paths: `$1` replica set, `$3` claimed slots (ascending),
/// `$6` their epochs indexed by slot (`$6[slot + 1]`, `-1` where not claimed), `$7` worker.
///
/// `current`: whether the statement's snapshot is the latest word on owners. The statement locks
/// the replica set's row `FOR SHARE` (`locked`), which every change of owner updates first
/// ([`OWNER_CHANGE`]) and holds until it commits: a change committed before the lock is granted
/// but after the statement's snapshot was taken is invisible to the snapshot, and it shows as a
/// newer version of the row than the snapshot's (`ctid` differs). Not current: nothing is written,
/// and the statement runs again under the lock it now holds (see [`Fencing::commit`]).
///
/// `owned`: the claimed slots the worker really owns at those epochs. The epoch looked up by index
/// is what tells a claimed slot from another: no epoch is `-1`, and slots past the array's end look
/// up NULL. `{slot_filter}` only bounds the rows read, through the primary key: [`DENSE`] for a
/// claim that covers much of its span, [`SPARSE`] otherwise.
const OWNED: &str = "locked AS MATERIALIZED ( \
     SELECT r.ctid FROM {replica_sets} AS r WHERE r.name = $1 FOR SHARE), \
 current AS (SELECT (SELECT ctid FROM locked) IS NOT DISTINCT FROM \
     (SELECT r.ctid FROM {replica_sets} AS r WHERE r.name = $1) AS yes), \
 owned AS ( \
     SELECT array_agg(s.slot) AS slots FROM {slots} AS s \
     WHERE s.replica_set = $1 AND {slot_filter} AND s.owner = $7 \
       AND s.epoch = ($6::bigint[])[s.slot + 1]), \
 fine AS (SELECT (SELECT yes FROM current) \
     AND cardinality((SELECT slots FROM owned)) IS NOT DISTINCT FROM cardinality($3::int[]) AS ok)";

/// The fence check's verdict as [`FencingTx::advance_progress`] and [`FencingTx::advance_slots`]
/// return it: NULL when the snapshot was not current (run again), else whether every claimed slot
/// is owned.
const VERDICT: &str = "CASE WHEN (SELECT yes FROM current) THEN (SELECT ok FROM fine) END AS owned";

/// How every change of owner begins, `$1` the replica set: a new version of the replica set's row,
/// which locks it against fenced commits (they hold it `FOR SHARE`) and tells a commit whose
/// snapshot is older that it is (see [`OWNED`]). Locking the row without updating it would not.
const OWNER_CHANGE: &str = "UPDATE {replica_sets} SET slot_count = slot_count WHERE name = $1";

/// The slots from the first claimed to the last. On a small slots table PostgreSQL scans it whole,
/// and testing `slot = ANY($3)` on every row compared each with every claimed slot: 256 x 256
/// comparisons per commit with one worker, a tenth of the database's CPU with ten projections.
const DENSE: &str = "s.slot BETWEEN ($3::int[])[1] AND ($3::int[])[cardinality($3::int[])]";

/// A few slots spread over a large range: probe the primary key for each one.
const SPARSE: &str = "s.slot = ANY($3::int[])";

/// Which slot filter bounds a claim: [`DENSE`] or [`SPARSE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Density {
    Dense,
    Sparse,
}

impl Density {
    /// Dense when the claim (ascending slots) holds at least a quarter of the slots in its span,
    /// so that the rows read stay within four times the claim.
    fn of(slots: &[i32]) -> Self {
        let span = match (slots.first(), slots.last()) {
            (Some(first), Some(last)) => (last - first) as usize + 1,
            _ => 0,
        };
        if slots.len() * 4 >= span { Self::Dense } else { Self::Sparse }
    }
}

/// One statement built with each slot filter.
#[derive(Debug)]
struct ByDensity {
    dense: String,
    sparse: String,
}

impl ByDensity {
    fn build(statement: impl Fn(&str) -> String) -> Self {
        Self { dense: statement(DENSE), sparse: statement(SPARSE) }
    }

    fn get(&self, density: Density) -> &str {
        match density {
            Density::Dense => &self.dense,
            Density::Sparse => &self.sparse,
        }
    }
}

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
    /// (`bigint[]`), `$7` worker; returns its one row's `owned` (nullable bool) and `advanced`
    /// (bigint), `None` when `owned` is NULL.
    async fn advance_progress(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        to: (i64, i64),
    ) -> StoreResult<Option<(bool, i64)>>;

    /// Runs [`Fencing`]'s per-slot upsert: binds like [`FencingTx::advance_progress`] but `$4` and
    /// `$5` are the per-slot commit and global positions (`bigint[]`, in slot order); returns its
    /// one row's `owned` (nullable bool) and `advanced` (the slots advanced, `int[]`), `None` when
    /// `owned` is NULL.
    async fn advance_slots(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        commits: &[i64],
        globals: &[i64],
    ) -> StoreResult<Option<(bool, Vec<i32>)>>;

    /// Runs [`Fencing`]'s ownership query: binds `$1` replica set, `$2` slots (`int[]`), `$3`
    /// epochs (`bigint[]`), `$4` worker; returns the column `slot` (int) of every row.
    async fn owned_slots(&mut self, sql: &str, claim: &Claim<'_>) -> StoreResult<Vec<i32>>;
}

/// The fenced commit's and the reset's statements under one store's table names, and the steps
/// between them; from [`PgStore::fencing`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fencing {
    sql: Arc<Statements>,
}

/// Every statement of [`Fencing`], built once when the store opens.
#[derive(Debug)]
struct Statements {
    identity: String,
    owner_change: String,
    advance_progress: ByDensity,
    advance_slots: ByDensity,
    owned_slots: String,
    reset_deletes: Vec<String>,
    reset_epochs: String,
    park: String,
    resolve: String,
}

impl PgStore {
    /// The fenced commit and the reset of this store, to run on a connection of another driver
    /// (see [`FencingTx`]).
    pub fn fencing(&self) -> Fencing {
        self.fencing.clone()
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
        let density = Density::of(&slots);
        let claim = Claim {
            replica_set: fence.replica_set.as_str(),
            projection,
            worker: fence.worker.as_str(),
            slots: &slots,
            epochs: &epochs,
        };
        // One statement locks the replica set's row, checks and advances. One row lock per commit
        // instead of one per slot: locking a row writes to it. When an owner change committed just
        // before the lock was granted, the statement wrote nothing and says so; run again, it
        // holds the lock from its start, and its snapshot (READ COMMITTED takes one per
        // statement) sees every change of owner there will be until this transaction ends.
        for attempt in 0..2 {
            if let Some(checked) = self.check_and_advance(tx, &claim, checkpoints, density).await? {
                return self.verdict(tx, fence, &claim, checked).await;
            }
            debug_assert_eq!(attempt, 0, "a statement holding the lock from its start is current");
        }
        Err(StoreError::Unavailable {
            message: "commit checkpoints: the replica set's row changed under its lock".to_owned(),
            source: None,
        })
    }

    /// One run of the statement that fences and advances: `None` if its snapshot was not current
    /// (nothing written), else (owned, the first slot that did not advance).
    async fn check_and_advance<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        claim: &Claim<'_>,
        checkpoints: &BTreeMap<Slot, Position>,
        density: Density,
    ) -> StoreResult<Option<(bool, Option<Slot>)>> {
        let slots = claim.slots;
        let mut positions = checkpoints.values();
        let first = *positions.next().expect("not empty");
        Ok(if checkpoints.len() > 1 && positions.all(|p| *p == first) {
            let checked = tx
                .advance_progress(
                    self.sql.advance_progress.get(density),
                    claim,
                    (first.commit as i64, first.global as i64),
                )
                .await?;
            checked.map(|(owned, advanced)| {
                (owned, (owned && advanced == 0).then(|| Slot(slots[0] as u32)))
            })
        } else {
            let commits: Vec<i64> = checkpoints.values().map(|p| p.commit as i64).collect();
            let globals: Vec<i64> = checkpoints.values().map(|p| p.global as i64).collect();
            let checked = tx
                .advance_slots(self.sql.advance_slots.get(density), claim, &commits, &globals)
                .await?;
            checked.map(|(owned, advanced)| {
                let behind = slots.iter().find(|s| !advanced.contains(s)).map(|s| Slot(*s as u32));
                (owned, if owned { behind } else { None })
            })
        })
    }

    /// The commit's outcome from a current check: `Fenced` (naming a slot lost),
    /// `CheckpointRegression`, or done.
    async fn verdict<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        fence: &Fence,
        claim: &Claim<'_>,
        (owned, behind): (bool, Option<Slot>),
    ) -> StoreResult<()> {
        if !owned {
            // The first claimed slot the worker no longer owns at its epoch, for the error message.
            let still = tx.owned_slots(&self.sql.owned_slots, claim).await?;
            let slots = claim.slots;
            let lost = slots.iter().find(|s| !still.contains(s)).copied().unwrap_or(slots[0]);
            return Err(StoreError::Fenced {
                worker: fence.worker.clone(),
                slot: Slot(lost as u32),
            });
        }
        if let Some(slot) = behind {
            return Err(StoreError::CheckpointRegression {
                projection: claim.projection.to_owned(),
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
        let rs = replica_set.as_str();
        // A change of owner (new epochs): commits in flight finish first, later ones see the new
        // epochs and are fenced.
        tx.execute_text(RESET, &self.sql.owner_change, &[rs]).await?;
        // A reset projection is no longer stopped and has no dead letters: it starts over from the
        // first event. The log of skipped letters stays, as a record.
        for delete in &self.sql.reset_deletes {
            tx.execute_text(RESET, delete, &[rs, projection]).await?;
        }
        tx.execute_text(RESET, &self.sql.reset_epochs, &[rs]).await
    }

    /// The statements under `tables`' names.
    pub(crate) fn new(t: &Tables) -> Self {
        let sql = Statements {
            owner_change: owner_change_sql(t),
            advance_progress: ByDensity::build(|filter| advance_progress(t, filter)),
            advance_slots: ByDensity::build(|filter| advance_slots(t, filter)),
            owned_slots: owned_slots(t),
            reset_deletes: [&t.checkpoints, &t.progress, &t.stopped_projections, &t.dead_letters]
                .map(|table| {
                    format!("DELETE FROM {table} WHERE replica_set = $1 AND projection = $2")
                })
                .to_vec(),
            reset_epochs: format!(
                "UPDATE {} SET epoch = epoch + 1 WHERE replica_set = $1",
                t.slots
            ),
            park: crate::dead_letters::park_sql(t),
            resolve: crate::dead_letters::resolve_sql(t),
            identity: format!(
                "SELECT current_database()::text || '/' || COALESCE(to_regclass('{}')::oid::text, 'missing') AS identity",
                t.slots
            ),
        };
        Self { sql: Arc::new(sql) }
    }

    /// The statement every change of owner starts with, `$1` the replica set: it locks the
    /// replica set's row, which fenced commits hold `FOR SHARE`.
    pub(crate) fn owner_change_sql(&self) -> &str {
        &self.sql.owner_change
    }

    /// The statement parking dead letters.
    pub(crate) fn park_sql(&self) -> &str {
        &self.sql.park
    }

    /// The statement resolving dead letters.
    pub(crate) fn resolve_sql(&self) -> &str {
        &self.sql.resolve
    }

    /// A query whose one row and column (`identity`, text) names the database and the slots table
    /// it resolves to: two connections that return the same value fence against the same rows.
    pub fn identity_sql(&self) -> &str {
        &self.sql.identity
    }
}

/// All claimed slots advance to one position: one upsert of the worker's progress row. Slots its
/// previous progress row listed but this one does not are first written to `checkpoints`
/// (a worker catching up on slots it just received commits them without its older ones).
/// Moving a slot the previous row also listed to an earlier position is a regression (nothing
/// advanced).
fn advance_progress(t: &Tables, slot_filter: &str) -> String {
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
             SELECT {VERDICT}, (SELECT count(*) FROM advanced) AS advanced, \
                 (SELECT count(*) FROM spilled) AS spilled",
        owned = owned(t, slot_filter),
        progress = t.progress,
        checkpoints = t.checkpoints
    )
}

/// Each claimed slot advances to its own position: one upsert of per-slot rows.
fn advance_slots(t: &Tables, slot_filter: &str) -> String {
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
             SELECT {VERDICT}, ARRAY(SELECT slot FROM advanced) AS advanced",
        owned = owned(t, slot_filter),
        checkpoints = t.checkpoints
    )
}

/// [`OWNED`] under `t`'s names, bounded by `slot_filter`.
fn owned(t: &Tables, slot_filter: &str) -> String {
    OWNED
        .replace("{replica_sets}", &t.replica_sets)
        .replace("{slots}", &t.slots)
        .replace("{slot_filter}", slot_filter)
}

/// [`OWNER_CHANGE`] under `t`'s names.
pub(crate) fn owner_change_sql(t: &Tables) -> String {
    OWNER_CHANGE.replace("{replica_sets}", &t.replica_sets)
}

/// The claimed slots the worker still owns at its epochs.
fn owned_slots(t: &Tables) -> String {
    format!(
        "SELECT s.slot FROM {} AS s \
             WHERE s.replica_set = $1 AND s.slot = ANY($2::int[]) AND s.owner = $4 \
               AND s.epoch = ($3::bigint[])[s.slot + 1]",
        t.slots
    )
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
    ) -> StoreResult<Option<(bool, i64)>> {
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
        Ok(row.get::<Option<bool>, _>("owned").map(|owned| (owned, row.get("advanced"))))
    }

    async fn advance_slots(
        &mut self,
        sql: &str,
        claim: &Claim<'_>,
        commits: &[i64],
        globals: &[i64],
    ) -> StoreResult<Option<(bool, Vec<i32>)>> {
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
        Ok(row.get::<Option<bool>, _>("owned").map(|owned| (owned, row.get("advanced"))))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use orchestrator_core::ports::{Fence, StoreError};
    use orchestrator_core::{Epoch, Position, ReplicaSetName, Slot, SlotCount, WorkerId};

    use super::Density;
    use crate::testing::TestSchema;

    #[test]
    fn a_claim_is_dense_when_it_holds_a_quarter_of_its_span() {
        assert_eq!(Density::of(&[3]), Density::Dense);
        assert_eq!(Density::of(&[0, 1, 2, 3]), Density::Dense);
        assert_eq!(Density::of(&[0, 7]), Density::Dense, "2 of a span of 8");
        assert_eq!(Density::of(&[0, 8]), Density::Sparse, "2 of a span of 9");
        assert_eq!(Density::of(&(0..256).collect::<Vec<_>>()), Density::Dense);
    }

    /// A replica set `rs` of `count` slots, every one owned by `w1` at epoch 1 but `stale`, at
    /// epoch 2.
    async fn owned_by_w1(schema: &TestSchema, count: u32, stale: Option<u32>) {
        sqlx::query("INSERT INTO orch_replica_sets (name, slot_count) VALUES ('rs', $1)")
            .bind(count as i32)
            .execute(&schema.pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO orch_slots (replica_set, slot, owner, epoch) \
             SELECT 'rs', s, 'w1', CASE WHEN s = $2 THEN 2 ELSE 1 END \
             FROM generate_series(0, $1 - 1) AS s",
        )
        .bind(count as i32)
        .bind(stale.map(|s| s as i32))
        .execute(&schema.pool)
        .await
        .unwrap();
    }

    /// Both slot filters check every claimed slot, and only those: a slot inside the span that
    /// the worker owns but does not claim never stands in for a claimed one it lost.
    #[tokio::test]
    async fn each_claimed_slot_is_checked_whether_the_claim_is_dense_or_sparse() {
        let Some(schema) = TestSchema::start(SlotCount::new(64).unwrap()).await else { return };
        // w1 owns every slot at epoch 1, except slot 40: moved on to epoch 2 (given away and
        // back, say), so a claim under epoch 1 is stale.
        owned_by_w1(&schema, 64, Some(40)).await;
        let fencing = schema.store.fencing();
        let commit = |slots: &'static [u32], same_position: bool| {
            let (pool, fencing) = (&schema.pool, &fencing);
            async move {
                let fence = Fence {
                    replica_set: ReplicaSetName::new("rs").unwrap(),
                    worker: WorkerId::new("w1").unwrap(),
                    grants: slots.iter().map(|s| (Slot(*s), Epoch(1))).collect(),
                };
                let checkpoints: BTreeMap<Slot, Position> = slots
                    .iter()
                    .map(|s| {
                        let at = if same_position { 10 } else { 10 + u64::from(*s) };
                        (Slot(*s), Position::global(at))
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                let result = fencing.commit(&mut tx, &fence, "p", &checkpoints).await;
                drop(tx);
                result
            }
        };
        for same_position in [true, false] {
            let shape = if same_position { "one position" } else { "per slot" };
            // Dense, with an owned but unclaimed slot inside the span.
            assert_eq!(Density::of(&[37, 39]), Density::Dense);
            commit(&[37, 39], same_position).await.unwrap();
            assert_eq!(Density::of(&[39, 40]), Density::Dense);
            let err = commit(&[39, 40], same_position).await.unwrap_err();
            assert!(matches!(err, StoreError::Fenced { slot: Slot(40), .. }), "{shape}: {err}");
            assert_eq!(Density::of(&[38, 40]), Density::Dense);
            let err = commit(&[38, 40], same_position).await.unwrap_err();
            assert!(matches!(err, StoreError::Fenced { slot: Slot(40), .. }), "{shape}: {err}");
            // Sparse.
            assert_eq!(Density::of(&[0, 63]), Density::Sparse);
            commit(&[0, 63], same_position).await.unwrap();
            assert_eq!(Density::of(&[0, 40]), Density::Sparse);
            let err = commit(&[0, 40], same_position).await.unwrap_err();
            assert!(matches!(err, StoreError::Fenced { slot: Slot(40), .. }), "{shape}: {err}");
        }
        schema.drop_schema().await;
    }

    /// An owner change that commits while a fenced commit waits for the replica set's row fences
    /// that commit, although the commit's statement began before the change committed.
    #[tokio::test]
    async fn a_commit_waiting_on_an_owner_change_is_fenced_by_it() {
        let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
        owned_by_w1(&schema, 8, None).await;
        let fencing = schema.store.fencing();
        // The change of owner, held open after its first statement (the one every change of owner
        // starts with) and its move of slot 0.
        let mut change = schema.pool.begin().await.unwrap();
        sqlx::query(fencing.owner_change_sql()).bind("rs").execute(&mut *change).await.unwrap();
        sqlx::query("UPDATE orch_slots SET owner = 'w2', epoch = 2 WHERE slot = 0")
            .execute(&mut *change)
            .await
            .unwrap();
        let pool = schema.pool.clone();
        let committing = tokio::spawn(async move {
            let fence = Fence {
                replica_set: ReplicaSetName::new("rs").unwrap(),
                worker: WorkerId::new("w1").unwrap(),
                grants: [(Slot(0), Epoch(1)), (Slot(1), Epoch(1))].into_iter().collect(),
            };
            let checkpoints = [(Slot(0), Position::global(5)), (Slot(1), Position::global(5))];
            let mut tx = pool.begin().await.unwrap();
            let result =
                fencing.commit(&mut tx, &fence, "p", &checkpoints.into_iter().collect()).await;
            if result.is_ok() {
                tx.commit().await.unwrap();
            }
            result
        });
        // The commit's statement is waiting for the row.
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE application_name = $1 AND wait_event_type = 'Lock'";
        let mut waited = false;
        for _ in 0..500 {
            let n: i64 = sqlx::query_scalar(waiting)
                .bind(&schema.schema)
                .fetch_one(&schema.pool)
                .await
                .unwrap();
            waited = n > 0;
            if waited {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(waited, "the commit never waited for the replica set's row");
        change.commit().await.unwrap();
        let err = committing.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Fenced { slot: Slot(0), .. }), "{err}");
        schema.drop_schema().await;
    }
}
