//! Migrations and connection failures on PostgreSQL: idempotent and concurrent migrations, custom
//! prefixes, and a clear, correctly classified error for each way a setup can be wrong.

use std::time::Duration;

use orchestrator_core::ports::{EventStore, StoreError};
use orchestrator_core::{ExpectedVersion, SlotCount, StreamId, TablePrefix};
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema};
use orchestrator_postgres::{PgStore, migrate};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Parks, lists, marks and skips a dead letter under the store's prefix (`app2_`), next to the
/// default prefix's tables in the same schema.
async fn dead_letters_round_trip(store: &PgStore, pool: &sqlx::PgPool) {
    use orchestrator_core::ports::{
        CheckpointStore, DeadLetterAction, DeadLetterFilter, DeadLetterStore, Fence, NewDeadLetter,
    };
    use orchestrator_core::{Position, ReplicaSetName, Slot, WorkerId};
    let rs = ReplicaSetName::new("prefixed").unwrap();
    let letter = NewDeadLetter {
        position: Position { commit: 7, global: 3 },
        slot: Slot(2),
        key: "k".to_owned(),
        stream: StreamId::new("a", "b", "c"),
        event_type: "T".to_owned(),
        error: "boom".to_owned(),
        attempts: 2,
    };
    // A commit without checkpoints needs no fence.
    let fence = Fence {
        replica_set: rs.clone(),
        worker: WorkerId::new("w").unwrap(),
        grants: Default::default(),
    };
    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &rs, "p", std::slice::from_ref(&letter)).await.unwrap();
    store.commit(tx, &fence, "p", &Default::default()).await.unwrap();
    let listed = store.dead_letters(&rs, &DeadLetterFilter::default()).await.unwrap();
    assert_eq!((listed.len(), listed[0].position, listed[0].attempts), (1, letter.position, 2));
    let marked = store.request(&rs, &DeadLetterFilter::default(), DeadLetterAction::Skip).await;
    assert_eq!(marked.unwrap(), 1);
    let mut tx = store.begin().await.unwrap();
    assert_eq!(store.resolve(&mut tx, &rs, "p", "k", DeadLetterAction::Skip).await.unwrap(), 1);
    store.commit(tx, &fence, "p", &Default::default()).await.unwrap();
    assert!(store.dead_letter_counts(&rs).await.unwrap().is_empty());
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM app2_skipped_letters")
        .fetch_one(pool)
        .await
        .unwrap();
    let default_prefix: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orch_dead_letters").fetch_one(pool).await.unwrap();
    assert_eq!((logged, default_prefix), (1, 0), "the prefix's own tables");
}

fn url() -> String {
    std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let prefix = TablePrefix::new("app2_").unwrap();
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let pool = schema.pool.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move { migrate(&pool, &prefix, SlotCount::new(8).unwrap()).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    migrate(&schema.pool, &prefix, SlotCount::new(8).unwrap()).await.unwrap();
    let store = PgStore::open(schema.pool.clone(), prefix.clone()).await.unwrap();
    store
        .append(&StreamId::new("a", "b", "c"), ExpectedVersion::NoStream, Vec::new())
        .await
        .unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name LIKE 'app2\\_%'",
    )
    .fetch_one(&schema.pool)
    .await
    .unwrap();
    assert_eq!(
        tables, 14,
        "meta, events, replica_sets, leases, workers, slots, generations, checkpoints, progress, stopped_projections, dead_letters, skipped_letters, schema_migrations, application_migrations"
    );
    dead_letters_round_trip(&store, &schema.pool).await;

    let err = migrate(&schema.pool, &prefix, SlotCount::new(16).unwrap()).await.unwrap_err();
    assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
    assert!(err.to_string().contains("8 slots"), "{err}");
    schema.drop_schema().await;
}

#[tokio::test]
async fn an_unmigrated_schema_says_to_run_migrate() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let err = PgStore::open(schema.pool.clone(), TablePrefix::new("nothere_").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
    assert!(err.to_string().contains("orchestrator migrate"), "{err}");
    assert!(!err.is_retryable());
    schema.drop_schema().await;
}

#[tokio::test]
async fn setup_errors_are_clear_and_classified() {
    if TestSchema::start(SlotCount::new(8).unwrap()).await.is_none() {
        return;
    }
    // Nothing listens on port 1: a down database is transient.
    let err =
        PgStore::connect_pool("postgres://postgres@127.0.0.1:1/postgres", 1).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    // Malformed URL.
    let err = PgStore::connect_pool("postgres://user@host:notaport/db", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
    // Unknown database and unknown role.
    let base: PgConnectOptions = url().parse().unwrap();
    for options in
        [base.clone().database("orch_no_such_database"), base.clone().username("orch_no_such_role")]
    {
        let err = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| orchestrator_postgres::classify_error("connect to PostgreSQL", e))
            .unwrap_err();
        assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
        assert!(!err.is_retryable());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_retryable() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS pair (id INT PRIMARY KEY, v INT); INSERT INTO pair VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
        .execute(&schema.pool)
        .await
        .unwrap();
    let lock_in_order = |first: i32, second: i32| {
        let pool = schema.pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE pair SET v = v + 1 WHERE id = $1")
                .bind(first)
                .execute(&mut *tx)
                .await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            sqlx::query("UPDATE pair SET v = v + 1 WHERE id = $1")
                .bind(second)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
    };
    let (a, b) = (lock_in_order(1, 2), lock_in_order(2, 1));
    let results = [a.await.unwrap(), b.await.unwrap()];
    let deadlocked = results
        .into_iter()
        .find_map(Result::err)
        .expect("one side is chosen as the deadlock victim");
    let err = orchestrator_postgres::classify_error("update", deadlocked);
    assert!(err.is_retryable(), "{err}");
    schema.drop_schema().await;
}
