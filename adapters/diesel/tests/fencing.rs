//! What the conformance suite cannot see: the fence under real concurrency on diesel's connection,
//! what a dropped `DieselTx` leaves behind, savepoints inside a handler, the same checkpoints
//! shared with sqlx's store, and a diesel pool on the wrong tables refused.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{AnsiTransactionManager, AsyncConnection, RunQueryDsl, TransactionManager};
use orchestrator_core::ports::{CheckpointStore, CoordinationStore, Fence, StoreError};
use orchestrator_core::{
    Epoch, Generation, GenerationPlan, Incarnation, Position, ReplicaSetName, Slot, SlotAction,
    SlotChange, SlotCount, WorkerId,
};
use orchestrator_diesel::testing::TestSchema;
use orchestrator_diesel::{DieselStore, DieselTx};

// diesel-async's `RunQueryDsl` is implemented for every type, so its `load` shadows
// `CheckpointStore::load` wherever both traits are in scope: name the trait.

diesel::table! {
    rows (key) {
        key -> Text,
        value -> Text,
    }
}

const SLOTS: u64 = 8;

struct Setup {
    schema: TestSchema,
    rs: ReplicaSetName,
    w1: WorkerId,
    w2: WorkerId,
    inc: Incarnation,
}

/// A schema with a `rows` table, workers w1 and w2 registered, w1 the leader owning every slot
/// at epoch 1 (generation 1).
async fn setup() -> Option<Setup> {
    let schema = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await?;
    sqlx::query("CREATE TABLE rows (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        .execute(&schema.pg.pool)
        .await
        .unwrap();
    let store = &schema.store;
    let rs = ReplicaSetName::new("main").unwrap();
    let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
    let slots = SlotCount::new(SLOTS).unwrap();
    let inc = store.register(&rs, slots, &w1).await.unwrap();
    store.register(&rs, slots, &w2).await.unwrap();
    store.heartbeat(&rs, &w1, inc, Duration::from_secs(30)).await.unwrap();
    let setup = Setup { schema, rs, w1: w1.clone(), w2, inc };
    setup.grant_all(0, &w1, 0).await;
    Some(setup)
}

impl Setup {
    fn store(&self) -> &DieselStore {
        &self.schema.store
    }

    /// Generation `expected + 1` gives every slot (at `epoch`) to `to`.
    async fn grant_all(&self, expected: u64, to: &WorkerId, epoch: u64) {
        let plan = GenerationPlan {
            expected: Generation(expected),
            generation: Generation(expected + 1),
            leader: self.w1.clone(),
            leader_incarnation: self.inc,
            members: vec![to.clone()],
            changes: SlotCount::new(SLOTS)
                .unwrap()
                .all()
                .map(|slot| SlotChange {
                    slot,
                    epoch: Epoch(epoch),
                    action: SlotAction::Grant { to: to.clone() },
                })
                .collect(),
            evict: Vec::new(),
        };
        self.store().create_generation(&self.rs, &plan).await.unwrap();
    }

    fn fence(&self, worker: &WorkerId, epoch: u64, slots: &[u32]) -> Fence {
        Fence {
            replica_set: self.rs.clone(),
            worker: worker.clone(),
            grants: slots.iter().map(|s| (Slot(*s), Epoch(epoch))).collect(),
        }
    }

    async fn row(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT value FROM rows WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.schema.pg.pool)
            .await
            .unwrap()
    }
}

async fn put(tx: &mut DieselTx, key: &str, value: &str) -> QueryResult<usize> {
    diesel::insert_into(rows::table)
        .values((rows::key.eq(key), rows::value.eq(value)))
        .on_conflict(rows::key)
        .do_update()
        .set(rows::value.eq(diesel::upsert::excluded(rows::value)))
        .execute(&mut **tx)
        .await
}

fn at(slots: &[u32], global: u64) -> std::collections::BTreeMap<Slot, Position> {
    slots.iter().map(|s| (Slot(*s), Position::global(global))).collect()
}

/// The zombie's diesel transaction is open, with read-model writes, while its slots move: the
/// move does not wait for it, and the zombie's commit then fails and rolls everything back.
#[tokio::test]
async fn commit_after_a_concurrent_move_is_fenced() {
    let Some(s) = setup().await else { return };
    let mut zombie = s.store().begin().await.unwrap();
    put(&mut zombie, "k", "zombie").await.unwrap();
    s.grant_all(1, &s.w2, 1).await;
    let err = s
        .store()
        .commit(zombie, &s.fence(&s.w1, 1, &[0, 1]), "p", &at(&[0, 1], 5))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { slot: Slot(0), .. }), "{err}");
    assert_eq!(s.row("k").await, None);
    // The new owner, through diesel, under the new epoch.
    let mut owner = s.store().begin().await.unwrap();
    put(&mut owner, "k", "owner").await.unwrap();
    s.store().commit(owner, &s.fence(&s.w2, 2, &[0, 1]), "p", &at(&[0, 1], 5)).await.unwrap();
    assert_eq!(s.row("k").await.as_deref(), Some("owner"));
    s.schema.drop_schema().await;
}

/// While a diesel connection is between the fence check and COMMIT, a change of owner waits for
/// it: the lock is held by the projection's own connection, not by another session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waits_for_a_diesel_commit_in_progress() {
    let Some(s) = setup().await else { return };
    let mut tx = s.store().begin().await.unwrap();
    put(&mut tx, "k", "committed").await.unwrap();
    // The store's commit without its final COMMIT: lock, check, advance.
    s.store()
        .pg()
        .fencing()
        .commit(&mut tx, &s.fence(&s.w1, 1, &[0, 1]), "p", &at(&[0, 1], 7))
        .await
        .unwrap();
    let mover = {
        let store = s.store().clone();
        let (rs, w1, w2, inc) = (s.rs.clone(), s.w1.clone(), s.w2.clone(), s.inc);
        tokio::spawn(async move {
            let started = Instant::now();
            let plan = GenerationPlan {
                expected: Generation(1),
                generation: Generation(2),
                leader: w1,
                leader_incarnation: inc,
                members: vec![w2.clone()],
                changes: vec![SlotChange {
                    slot: Slot(0),
                    epoch: Epoch(1),
                    action: SlotAction::Grant { to: w2 },
                }],
                evict: Vec::new(),
            };
            store.create_generation(&rs, &plan).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!mover.is_finished(), "the move must wait for the commit holding the replica set row");
    AnsiTransactionManager::commit_transaction(&mut *tx).await.unwrap();
    drop(tx);
    let waited = mover.await.unwrap();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert_eq!(s.row("k").await.as_deref(), Some("committed"));
    let loaded = CheckpointStore::load(s.store(), &s.rs, "p", &[Slot(0), Slot(1)]).await.unwrap();
    assert_eq!(loaded, at(&[0, 1], 7));
    s.schema.drop_schema().await;
}

/// A dropped `DieselTx` (a failed handler, a cancelled batch) rolls back at once: its row locks are
/// gone for the next transaction, and no session is left idle in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_transaction_releases_its_locks_at_once() {
    let Some(s) = setup().await else { return };
    let mut first = s.store().begin().await.unwrap();
    put(&mut first, "k", "dropped").await.unwrap();
    drop(first);
    let mut second = s.store().begin().await.unwrap();
    // Blocks on the row lock while the dropped transaction lives (3 s idle timeout in tests).
    tokio::time::timeout(Duration::from_secs(1), put(&mut second, "k", "kept"))
        .await
        .expect("the dropped transaction still holds its row lock")
        .unwrap();
    s.store().commit(second, &s.fence(&s.w1, 1, &[0]), "p", &at(&[0], 1)).await.unwrap();
    assert_eq!(s.row("k").await.as_deref(), Some("kept"));
    let idle: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
    )
    .bind(&s.schema.pg.schema)
    .fetch_one(&s.schema.pg.pool)
    .await
    .unwrap();
    assert_eq!(idle, 0);
    s.schema.drop_schema().await;
}

/// A handler may use diesel's own `transaction` inside the projection's: it nests as a savepoint,
/// its rollback keeps the outer writes, and the fenced commit goes through.
#[tokio::test]
async fn diesel_transactions_inside_a_handler_are_savepoints() {
    let Some(s) = setup().await else { return };
    let mut tx = s.store().begin().await.unwrap();
    put(&mut tx, "outer", "kept").await.unwrap();
    let inner: QueryResult<()> = tx
        .conn()
        .transaction(async |conn| {
            diesel::insert_into(rows::table)
                .values((rows::key.eq("inner"), rows::value.eq("rolled back")))
                .execute(conn)
                .await?;
            Err(diesel::result::Error::RollbackTransaction)
        })
        .await;
    assert!(inner.is_err());
    // A failing statement inside a savepoint does not poison the outer transaction either.
    let failed: QueryResult<usize> = tx
        .conn()
        .transaction(async |conn| diesel::sql_query("SELECT 1/0").execute(conn).await)
        .await;
    assert!(failed.is_err());
    s.store().commit(tx, &s.fence(&s.w1, 1, &[0, 1]), "p", &at(&[0, 1], 3)).await.unwrap();
    assert_eq!(s.row("outer").await.as_deref(), Some("kept"));
    assert_eq!(s.row("inner").await, None);
    assert_eq!(
        CheckpointStore::load(s.store(), &s.rs, "p", &[Slot(0)]).await.unwrap(),
        at(&[0], 3)
    );
    s.schema.drop_schema().await;
}

/// The diesel store and the sqlx store keep one set of checkpoints: a projection moved from one
/// API to the other continues where it was, and neither can move it backwards.
#[tokio::test]
async fn sqlx_and_diesel_commits_share_the_checkpoints() {
    let Some(s) = setup().await else { return };
    let pg = s.schema.pg.store.clone();
    let fence = s.fence(&s.w1, 1, &[0, 1, 2]);
    let tx = pg.begin().await.unwrap();
    pg.commit(tx, &fence, "p", &at(&[0, 1, 2], 10)).await.unwrap();
    assert_eq!(
        CheckpointStore::load(s.store(), &s.rs, "p", &[Slot(1)]).await.unwrap(),
        at(&[1], 10)
    );
    let tx = s.store().begin().await.unwrap();
    s.store().commit(tx, &fence, "p", &at(&[0, 1, 2], 20)).await.unwrap();
    let tx = pg.begin().await.unwrap();
    let err = pg.commit(tx, &fence, "p", &at(&[0, 1, 2], 15)).await.unwrap_err();
    assert!(matches!(err, StoreError::CheckpointRegression { .. }), "{err}");
    let mut tx = s.store().begin().await.unwrap();
    put(&mut tx, "k", "v").await.unwrap();
    let err = s.store().commit(tx, &fence, "p", &at(&[0, 1, 2], 15)).await.unwrap_err();
    assert!(matches!(err, StoreError::CheckpointRegression { .. }), "{err}");
    assert_eq!(s.row("k").await, None, "a refused commit keeps nothing");
    // Per-slot positions (the other statement) also interoperate.
    let tx = s.store().begin().await.unwrap();
    let mixed = [(Slot(0), Position::global(30)), (Slot(1), Position::global(25))].into();
    s.store().commit(tx, &fence, "p", &mixed).await.unwrap();
    assert_eq!(
        CheckpointStore::load(&pg, &s.rs, "p", &[Slot(0), Slot(1), Slot(2)]).await.unwrap(),
        {
            let mut expected = at(&[2], 20);
            expected.extend(mixed);
            expected
        }
    );
    s.schema.drop_schema().await;
}

/// A diesel pool that resolves other tables than the store (another schema here) is refused,
/// since its commits would check ownership against rows nobody coordinates.
#[tokio::test]
async fn a_diesel_pool_on_other_tables_is_refused() {
    let Some(s) = setup().await else { return };
    let Some(other) = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await else { return };
    let err = DieselStore::open(s.schema.pg.store.clone(), other.diesel.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
    assert!(err.to_string().contains("same tables"), "{err}");
    other.drop_schema().await;
    s.schema.drop_schema().await;
}
