//! The application's side, on real SQLite files and PostgreSQL: a database created by the
//! previous release (its schema, with events, checkpoints and a worker row in it) is upgraded in
//! place by `migrate_with` and processed on; the application's schema steps run once even when
//! many workers migrate at once; a reset runs the projection's hook in the reset transaction;
//! `wait_for_projection` returns once an append is processed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, CheckpointStore};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, ReplicaSetName, SchemaMigration, SlotCount,
    StreamId, TablePrefix, Uuid, WorkerId,
};
use orchestrator_postgres::testing::TestSchema;
use orchestrator_postgres::{PgStore, PgTx};
use orchestrator_runtime::{
    Orchestrator, Projection, Settings, Store, reset_projection, wait_for_projection,
};
use orchestrator_sqlite::{SqliteStore, SqliteTx};

const SLOTS: u64 = 16;

/// The application's schema in these tests: one table, the same SQL on both stores.
const SCHEMA: &[SchemaMigration] = &[SchemaMigration {
    name: "0001_counts",
    sql: "CREATE TABLE counts (aggregate_id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
}];

/// Counts the events it handled per aggregate (in memory: the lifecycle is what is tested).
#[derive(Default)]
struct Counting {
    seen: Mutex<BTreeMap<String, Vec<u64>>>,
    resets: Mutex<u32>,
}

#[async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Counting {
    fn name(&self) -> &str {
        "counting"
    }

    async fn handle(&self, _tx: &mut Tx, event: &Event) -> Result<(), BoxError> {
        let mut seen = self.seen.lock().unwrap();
        seen.entry(event.stream.aggregate_id.clone()).or_default().push(event.aggregate_version);
        Ok(())
    }

    async fn reset(&self, _tx: &mut Tx) -> Result<(), BoxError> {
        *self.resets.lock().unwrap() += 1;
        self.seen.lock().unwrap().clear();
        Ok(())
    }
}

fn settings() -> Settings {
    let mut settings = Settings::new(ReplicaSetName::new("upgrade").unwrap());
    settings.worker_id = WorkerId::new("w1").unwrap();
    settings.timing.heartbeat_interval = Duration::from_millis(200);
    settings.timing.stale_worker_timeout = Duration::from_millis(1500);
    settings.timing.registration_wait = Duration::from_millis(100);
    settings.timing.poll_interval = Duration::from_millis(50);
    settings.idle_poll = Duration::from_millis(20);
    settings.slots = SlotCount::new(SLOTS).unwrap();
    settings
}

fn event(n: u64) -> NewEvent {
    NewEvent::new(EventId(Uuid::from_u64_pair(7, n)), "Deposited", format!("{{\"n\":{n}}}"))
}

/// Runs one worker with `projection` until `done` says so (or 30 s pass).
async fn run_until<S: Store>(
    store: S,
    projection: Arc<Counting>,
    done: impl Fn(&BTreeMap<String, Vec<u64>>) -> bool,
) where
    Counting: Projection<<S as CheckpointStore>::Tx>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Orchestrator::new(store, settings()).unwrap();
    let task = tokio::spawn(worker.run(
        async {
            let _ = stopped.await;
        },
        vec![projection.clone() as Arc<dyn Projection<_>>],
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&projection.seen.lock().unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", projection.seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// What the previous release left: its schema, two events of one account, a checkpoint past the
/// first, and a worker row. Statements for SQLite (`?`) or PostgreSQL (`$n`).
fn previous_release_data(postgres: bool) -> Vec<String> {
    let slot = SlotCount::new(SLOTS).unwrap().slot_of("acct-1").0;
    let hash = orchestrator_core::fnv1a_32(b"acct-1");
    let (id1, id2) = if postgres {
        ("'00000000-0000-0000-0000-000000000001'", "'00000000-0000-0000-0000-000000000002'")
    } else {
        ("X'00000000000000000000000000000001'", "X'00000000000000000000000000000002'")
    };
    let (payload, created) = if postgres { ("'\\x7b7d'", "") } else { ("X'7b7d'", ", 0") };
    let created_col = if postgres { "" } else { ", created_at" };
    let now = if postgres { "clock_timestamp()" } else { "0" };
    let mut rows: Vec<String> = [id1, id2]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            format!(
                "INSERT INTO orch_events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, slot, partition_hash, event_id, event_type, event_version, \
                 payload, metadata{created_col}) \
                 VALUES ('bank', 'Account', 'acct-1', {}, {slot}, {hash}, {id}, 'Deposited', 1, \
                 {payload}, '{{}}'{created})",
                i + 1
            )
        })
        .collect();
    rows.push(format!(
        "INSERT INTO orch_replica_sets (name, slot_count, created_at) VALUES ('upgrade', {SLOTS}, {now})"
    ));
    for slot in 0..SLOTS {
        rows.push(format!("INSERT INTO orch_slots (replica_set, slot) VALUES ('upgrade', {slot})"));
    }
    if postgres {
        rows.push("INSERT INTO orch_leases (replica_set) VALUES ('upgrade')".to_owned());
    }
    rows.push(format!(
        "INSERT INTO orch_checkpoints (replica_set, projection, slot, commit_position, \
         global_position, updated_at) VALUES ('upgrade', 'counting', {slot}, 0, 0, {now})"
    ));
    // A worker of the previous release that has since stopped (its heartbeat is old): it does not
    // keep this release's workers out (a live one would, see the last test).
    let long_ago = if postgres { "clock_timestamp() - interval '1 hour'" } else { "0" };
    rows.push(format!(
        "INSERT INTO orch_workers (replica_set, worker_id, incarnation, registered_at, last_heartbeat) \
         VALUES ('upgrade', 'old-worker', 1, {long_ago}, {long_ago})"
    ));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_of_the_previous_release_is_upgraded_in_place_and_processed_on() {
    let dir = std::env::temp_dir().join(format!("orch-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("old.db").display());
    let pool = SqliteStore::connect_pool(&url, 4).await.unwrap();
    // The previous release: migration 1 only, recorded in its ledger.
    let old = include_str!("../../../migrations/sqlite/0001_init.sql").replace("{prefix}", "orch_");
    sqlx::raw_sql(&old).execute(&pool).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE orch_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
         applied_at TEXT NOT NULL DEFAULT '');
         INSERT INTO orch_schema_migrations (version, name) VALUES (1, 'init');
         INSERT INTO orch_meta (key, value) VALUES ('slot_count', '16');",
    )
    .execute(&pool)
    .await
    .unwrap();
    for row in previous_release_data(false) {
        sqlx::query(&row).execute(&pool).await.unwrap();
    }

    orchestrator_sqlite::migrate_with(
        &pool,
        &TablePrefix::default(),
        SlotCount::new(SLOTS).unwrap(),
        SCHEMA,
    )
    .await
    .unwrap();
    let store = SqliteStore::open(pool.clone(), TablePrefix::default()).await.unwrap();
    check_upgraded(store.clone()).await;
    sqlx::query("INSERT INTO counts VALUES ('x', 1)").execute(&pool).await.unwrap();
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_of_the_previous_release_is_upgraded_in_place_and_processed_on() {
    let Some(schema) = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await else { return };
    // TestSchema migrated to today's schema; recreate the previous release's in its place.
    sqlx::raw_sql(&format!("DROP SCHEMA {s} CASCADE; CREATE SCHEMA {s};", s = schema.schema))
        .execute(&schema.pool)
        .await
        .unwrap();
    for sql in [
        include_str!("../../../migrations/postgres/0001_init.sql"),
        include_str!("../../../migrations/postgres/0002_leases.sql"),
    ] {
        sqlx::raw_sql(&sql.replace("{prefix}", "orch_")).execute(&schema.pool).await.unwrap();
    }
    sqlx::raw_sql(
        "CREATE TABLE orch_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
         applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
         INSERT INTO orch_schema_migrations (version, name) VALUES (1, 'init'), (2, 'leases');
         INSERT INTO orch_meta (key, value) VALUES ('slot_count', '16');",
    )
    .execute(&schema.pool)
    .await
    .unwrap();
    for row in previous_release_data(true) {
        sqlx::query(&row).execute(&schema.pool).await.unwrap();
    }

    orchestrator_postgres::migrate_with(
        &schema.pool,
        &TablePrefix::default(),
        SlotCount::new(SLOTS).unwrap(),
        SCHEMA,
    )
    .await
    .unwrap();
    let store = PgStore::open(schema.pool.clone(), TablePrefix::default()).await.unwrap();
    check_upgraded(store).await;
    sqlx::query("INSERT INTO counts VALUES ('x', 1)").execute(&schema.pool).await.unwrap();
    schema.drop_schema().await;
}

/// The old events read with their aggregate id as partition key, the stream continues at version
/// 3, and a worker processes old and new events; then a reset runs the projection's hook and
/// rebuilds, and `wait_for_projection` sees an append processed.
async fn check_upgraded<S: Store>(store: S)
where
    Counting: Projection<<S as CheckpointStore>::Tx>,
{
    let account = StreamId::new("bank", "Account", "acct-1");
    let old = store.read_stream(&account, 0).await.unwrap();
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(|e| e.partition_key == "acct-1"));
    let appended = store.append(&account, ExpectedVersion::Exact(2), vec![event(3)]).await.unwrap();
    assert_eq!(appended.version, 3);
    assert_eq!(appended.slot, old[0].slot, "the slot follows the stored key");

    let projection = Arc::new(Counting::default());
    run_until(store.clone(), projection.clone(), |seen| {
        seen.get("acct-1").is_some_and(|v| v.len() == 3)
    })
    .await;
    assert_eq!(projection.seen.lock().unwrap()["acct-1"], vec![1, 2, 3]);

    let rs = ReplicaSetName::new("upgrade").unwrap();
    reset_projection(&store, &rs, projection.as_ref()).await.unwrap();
    assert_eq!(*projection.resets.lock().unwrap(), 1);
    assert!(projection.seen.lock().unwrap().is_empty(), "the hook ran");

    // Rebuild from the first event, with wait_for_projection watching a new append.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Orchestrator::new(store.clone(), settings()).unwrap();
    let task = tokio::spawn(worker.run(
        async {
            let _ = stopped.await;
        },
        vec![projection.clone() as Arc<dyn Projection<_>>],
    ));
    let appended = store.append(&account, ExpectedVersion::Exact(3), vec![event(4)]).await.unwrap();
    wait_for_projection(&store, &rs, "counting", &appended, Duration::from_secs(30)).await.unwrap();
    assert_eq!(projection.seen.lock().unwrap()["acct-1"], vec![1, 2, 3, 4], "rebuilt, in order");
    let never =
        wait_for_projection(&store, &rs, "other", &appended, Duration::from_millis(50)).await;
    assert!(never.unwrap_err().to_string().contains("had not processed"));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_schema_steps_run_once_when_many_workers_migrate_together() {
    let dir = std::env::temp_dir().join(format!("orch-app-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("app.db").display());
    const STEPS: &[SchemaMigration] = &[
        SCHEMA[0],
        SchemaMigration { name: "0002_seed", sql: "INSERT INTO counts VALUES ('seeded', 0)" },
    ];
    let steps = STEPS;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let pool = SqliteStore::connect_pool(&url, 2).await.unwrap();
            orchestrator_sqlite::migrate_with(
                &pool,
                &TablePrefix::default(),
                SlotCount::new(SLOTS).unwrap(),
                steps,
            )
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let pool = SqliteStore::connect_pool(&url, 1).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM counts").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 1, "the seeding step ran exactly once");
    pool.close().await;

    let Some(schema) = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await else { return };
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let pool = schema.pool.clone();
        tasks.push(tokio::spawn(async move {
            orchestrator_postgres::migrate_with(
                &pool,
                &TablePrefix::default(),
                SlotCount::new(SLOTS).unwrap(),
                steps,
            )
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM counts").fetch_one(&schema.pool).await.unwrap();
    assert_eq!(n, 1);
    schema.drop_schema().await;
    let _ = std::fs::remove_dir_all(&dir);
}

// The projection's Tx types, named so the bounds above are checked for both stores.
#[allow(dead_code)]
fn _bounds(p: Counting) -> (Box<dyn Projection<PgTx>>, Box<dyn Projection<SqliteTx>>) {
    (Box::new(Counting::default()), Box::new(p))
}

/// A worker of this release meeting a live worker of another coordination protocol (a previous
/// release still running) leaves with a one-line error instead of taking part; a stale one does
/// not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_to_join_live_workers_of_another_release() {
    use orchestrator_core::ports::CoordinationStore;
    let dir = std::env::temp_dir().join(format!("orch-protocol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("mixed.db").display());
    let pool = SqliteStore::connect_pool(&url, 4).await.unwrap();
    orchestrator_sqlite::migrate(&pool, &TablePrefix::default(), SlotCount::new(SLOTS).unwrap())
        .await
        .unwrap();
    let store = SqliteStore::open(pool.clone(), TablePrefix::default()).await.unwrap();
    let rs = ReplicaSetName::new("upgrade").unwrap();
    let old = WorkerId::new("old-release").unwrap();
    store.register(&rs, SlotCount::new(SLOTS).unwrap(), &old).await.unwrap();
    // What a worker of the previous release looks like after `migrate`: protocol 1.
    sqlx::query("UPDATE orch_workers SET protocol = 1 WHERE worker_id = 'old-release'")
        .execute(&pool)
        .await
        .unwrap();

    let worker = Orchestrator::new(store.clone(), settings()).unwrap();
    let projections: Vec<Arc<dyn Projection<SqliteTx>>> = vec![Arc::new(Counting::default())];
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        worker.run(std::future::pending::<()>(), projections),
    )
    .await
    .expect("the worker leaves by itself");
    let message = outcome.unwrap_err().to_string();
    assert!(message.contains("old-release (protocol 1)"), "{message}");
    assert!(message.contains("scale the replica set to zero"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert_eq!(
        snapshot.workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        vec!["old-release"],
        "the new worker deregistered; the old one is untouched"
    );
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
