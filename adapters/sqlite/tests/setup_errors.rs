//! Migrations and setup failures on SQLite: idempotent migrations from several processes' pools
//! at once, custom prefixes, and classified errors.

use std::str::FromStr;
use std::time::Duration;

use orchestrator_core::ports::StoreError;
use orchestrator_core::{SlotCount, TablePrefix};
use orchestrator_sqlite::{SqliteStore, migrate};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

fn temp_url(name: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("orch-sqlite-setup-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("o.db").display());
    (dir, url)
}

/// Parks, lists, marks and skips a dead letter under the store's prefix (`app2_`).
async fn dead_letters_round_trip(store: &SqliteStore) {
    use orchestrator_core::ports::{
        CheckpointStore, DeadLetterAction, DeadLetterFilter, DeadLetterStore, Fence, NewDeadLetter,
    };
    use orchestrator_core::{Position, ReplicaSetName, Slot, StreamId, WorkerId};
    let rs = ReplicaSetName::new("prefixed").unwrap();
    let letter = NewDeadLetter {
        position: Position::global(3),
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
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(logged, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_from_many_pools_at_once() {
    let (dir, url) = temp_url("concurrent");
    let prefix = TablePrefix::new("app2_").unwrap();
    let mut runs = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        let prefix = prefix.clone();
        runs.push(tokio::spawn(async move {
            let pool = SqliteStore::connect_pool(&url, 2).await?;
            migrate(&pool, &prefix, SlotCount::new(8).unwrap()).await
        }));
    }
    for run in runs {
        run.await.unwrap().unwrap();
    }
    let pool = SqliteStore::connect_pool(&url, 2).await.unwrap();
    migrate(&pool, &prefix, SlotCount::new(8).unwrap()).await.unwrap();
    let store = SqliteStore::open(pool.clone(), prefix.clone()).await.unwrap();
    dead_letters_round_trip(&store).await;
    let err = migrate(&pool, &prefix, SlotCount::new(16).unwrap()).await.unwrap_err();
    assert!(matches!(err, StoreError::Misconfigured { .. }), "{err}");
    let err =
        SqliteStore::open(pool.clone(), TablePrefix::new("other_").unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("orchestrator migrate"), "{err}");
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_unopenable_file_is_a_setup_error() {
    let err = SqliteStore::connect_pool("sqlite:/nonexistent-dir/sub/o.db", 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Misconfigured { .. } | StoreError::Unavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("open the SQLite database"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_database_is_retryable() {
    let (dir, url) = temp_url("busy");
    let pool = SqliteStore::connect_pool(&url, 2).await.unwrap();
    migrate(&pool, &TablePrefix::default(), SlotCount::new(8).unwrap()).await.unwrap();
    let mut writer = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("INSERT INTO orch_meta VALUES ('k', 'v')").execute(&mut *writer).await.unwrap();
    let impatient = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(&url).unwrap().busy_timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let blocked = impatient.begin_with("BEGIN IMMEDIATE").await.unwrap_err();
    let err = orchestrator_sqlite::classify_error("write", blocked);
    assert!(err.is_retryable(), "{err}");
    writer.rollback().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
