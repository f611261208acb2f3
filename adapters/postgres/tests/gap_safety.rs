//! Gap safety, horizon isolation and fencing under real concurrency on PostgreSQL.
//!
//! Many appenders (units of work, some writing an unrelated row first, some appending to two
//! streams) hold their transactions open for random times, so later positions commit before
//! earlier ones, while a reader keeps reading: every event must be seen exactly once and each
//! stream's events in version order. Without the read-horizon protection (appenders registering
//! before their first write) the reader skips the events of transactions that commit late, and
//! this test fails. Transactions that do not append to the events table (another database, another
//! table, another table prefix) must not hold delivery back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, EventStore, Fence, ReadRequest, StoreError, UnitOfWork,
    UnitOfWorkStore,
};
use orchestrator_core::{
    Epoch, EventId, ExpectedVersion, Generation, GenerationPlan, NewEvent, Position,
    ReplicaSetName, Scope, Slot, SlotAction, SlotChange, SlotCount, StreamId, TablePrefix, Uuid,
    WorkerId,
};
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema};
use orchestrator_postgres::{PgStore, migrate};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use sqlx::PgPool;

fn event(n: u64) -> NewEvent {
    NewEvent::new(EventId(Uuid::from_u64_pair(0, n)), "Deposited", n.to_string())
}

fn test_url() -> String {
    std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

/// Reads every slot from the start until `wanted` events are back, or gives up after `within`.
async fn read_until(
    store: &PgStore,
    wanted: usize,
    within: Duration,
) -> Vec<orchestrator_core::Event> {
    let request = ReadRequest {
        cursors: store.slot_count().all().map(|s| (s, Position::START)).collect(),
        scope: Scope::all(),
        limit: 1000,
    };
    let deadline = Instant::now() + within;
    loop {
        let events = store.read(&request).await.unwrap();
        if events.len() >= wanted || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reader_never_skips_events_committed_out_of_order() {
    const APPENDERS: u64 = 12;
    const APPENDS_EACH: u64 = 25;
    const EVENTS_PER_APPEND: u64 = 2;
    let Some(schema) = TestSchema::start(SlotCount::new(2).unwrap()).await else { return };
    let store = schema.store.clone();
    sqlx::query("CREATE TABLE ledger (n BIGINT PRIMARY KEY)").execute(&schema.pool).await.unwrap();
    let total = (APPENDERS * APPENDS_EACH * EVENTS_PER_APPEND) as usize;
    let finished = Arc::new(AtomicUsize::new(0));

    let mut appenders = Vec::new();
    for appender in 0..APPENDERS {
        let store = store.clone();
        let finished = finished.clone();
        appenders.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(appender);
            for i in 0..APPENDS_EACH {
                // Streams are shared between appenders, so versions interleave across them.
                let account = |rng: &mut SmallRng| {
                    StreamId::new("bank", "Account", format!("acct-{}", rng.random_range(0..40)))
                };
                let (first, second) = (account(&mut rng), account(&mut rng));
                let n = (appender * APPENDS_EACH + i) * EVENTS_PER_APPEND;
                let mut unit =
                    store.begin_unit_of_work(&[first.clone(), second.clone()]).await.unwrap();
                let hold = |rng: &mut SmallRng| Duration::from_millis(rng.random_range(0..20));
                match i % 3 {
                    // The application writes its own row first: the transaction takes its id
                    // before the append, after the streams were locked.
                    0 => {
                        sqlx::query("INSERT INTO ledger VALUES ($1)")
                            .bind(n as i64)
                            .execute(&mut **unit.tx())
                            .await
                            .unwrap();
                        tokio::time::sleep(hold(&mut rng)).await;
                        unit.append(&first, ExpectedVersion::Any, vec![event(n), event(n + 1)])
                            .await
                            .unwrap();
                    }
                    // Two streams in one transaction.
                    1 if first != second => {
                        unit.append(&first, ExpectedVersion::Any, vec![event(n)]).await.unwrap();
                        tokio::time::sleep(hold(&mut rng)).await;
                        unit.append(&second, ExpectedVersion::Any, vec![event(n + 1)])
                            .await
                            .unwrap();
                    }
                    _ => {
                        unit.append(&first, ExpectedVersion::Any, vec![event(n), event(n + 1)])
                            .await
                            .unwrap();
                    }
                }
                tokio::time::sleep(hold(&mut rng) * 2).await;
                unit.commit().await.unwrap();
            }
            finished.fetch_add(1, Ordering::SeqCst);
        }));
    }

    let slots: Vec<Slot> = SlotCount::new(2).unwrap().all().collect();
    let mut cursors: BTreeMap<Slot, Position> =
        slots.iter().map(|s| (*s, Position::START)).collect();
    let mut seen = BTreeSet::new();
    let mut last_version: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} events seen after 30 s: events were skipped",
            seen.len()
        );
        let request = ReadRequest {
            cursors: cursors.iter().map(|(s, p)| (*s, *p)).collect(),
            scope: Scope::all(),
            limit: 7,
        };
        let batch = store.read(&request).await.unwrap();
        if batch.is_empty() {
            // Skipped events never arrive: the deadline above turns that into a failure.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        for e in batch {
            assert!(seen.insert(e.position.global), "event {} delivered twice", e.position.global);
            let last = last_version.entry(e.stream.aggregate_id.clone()).or_insert(0);
            assert_eq!(e.aggregate_version, *last + 1, "{} out of order", e.stream.aggregate_id);
            *last = e.aggregate_version;
            let cursor = cursors.get_mut(&e.slot).unwrap();
            assert!(e.position > *cursor);
            *cursor = e.position;
        }
    }
    for appender in appenders {
        appender.await.unwrap();
    }
    assert_eq!(seen.len(), total);
    schema.drop_schema().await;
}

#[tokio::test]
async fn horizon_stall_reports_the_oldest_open_appender_only() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();
    sqlx::query("CREATE TABLE other (n INT)").execute(&schema.pool).await.unwrap();
    let mut foreign = schema.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO other VALUES (1)").execute(&mut *foreign).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.horizon_stall().await.unwrap(), Duration::ZERO, "not an appender");
    let stream = StreamId::new("bank", "Account", "a");
    let mut unit = store.begin_unit_of_work(std::slice::from_ref(&stream)).await.unwrap();
    unit.append(&stream, ExpectedVersion::Any, vec![event(1)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stall = store.horizon_stall().await.unwrap();
    assert!(stall >= Duration::from_millis(300), "{stall:?}");
    unit.commit().await.unwrap();
    assert_eq!(store.horizon_stall().await.unwrap(), Duration::ZERO);
    foreign.rollback().await.unwrap();
    schema.drop_schema().await;
}

/// Open writing transactions that do not append to this events table hold nobody back: one in
/// another database of the server, one on another table of this database (a projection's slow
/// read-model transaction), one appending under another table prefix. An event appended meanwhile
/// is delivered while all three are still open; an open appender of this table does hold it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_appenders_of_this_events_table_hold_readers_back() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();

    // Set up first (slow: a database, two migrations); the test sessions end transactions left
    // idle for 3 s, so the open transactions below are opened together.
    let twin = TestSchema::start(SlotCount::new(8).unwrap()).await.unwrap();
    // Another database on the same server, with a transaction that has written.
    let database = format!("{}_other", schema.schema);
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&schema.pool).await.unwrap();
    let mut url = test_url();
    let path_start = url.rfind('/').unwrap();
    url.replace_range(path_start + 1.., &database);
    let other_db = PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE t (n INT)").execute(&other_db).await.unwrap();

    sqlx::query("CREATE TABLE read_model (n INT)").execute(&schema.pool).await.unwrap();
    let prefix = TablePrefix::new("other_").unwrap();
    migrate(&schema.pool, &prefix, SlotCount::new(8).unwrap()).await.unwrap();
    let other_prefix = PgStore::open(schema.pool.clone(), prefix).await.unwrap();

    let mut in_other_db = other_db.begin().await.unwrap();
    sqlx::query("INSERT INTO t VALUES (1)").execute(&mut *in_other_db).await.unwrap();

    // Another table of this database.
    let mut other_table = schema.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO read_model VALUES (1)").execute(&mut *other_table).await.unwrap();

    // An appender of another table prefix in this database.
    let theirs = StreamId::new("bank", "Account", "theirs");
    let mut their_unit =
        other_prefix.begin_unit_of_work(std::slice::from_ref(&theirs)).await.unwrap();
    their_unit.append(&theirs, ExpectedVersion::Any, vec![event(99)]).await.unwrap();

    // An appender of a table of the same name in another schema (a schema per tenant, another
    // test): its own key, since the key is the table's OID.
    let mut twin_unit = twin.store.begin_unit_of_work(std::slice::from_ref(&theirs)).await.unwrap();
    twin_unit.append(&theirs, ExpectedVersion::Any, vec![event(98)]).await.unwrap();

    let ours = StreamId::new("bank", "Account", "ours");
    store.append(&ours, ExpectedVersion::NoStream, vec![event(1)]).await.unwrap();
    let delivered = read_until(&store, 1, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), 1, "delivery waited for a transaction that does not append here");
    assert_eq!(store.horizon_stall().await.unwrap(), Duration::ZERO);
    // (Ended now: the test sessions end transactions idle for 3 s.)
    their_unit.commit().await.unwrap();
    twin_unit.commit().await.unwrap();
    twin.drop_schema().await;

    // Our own open appender does hold the next event back, until it ends.
    let mut ours_open =
        store.begin_unit_of_work(&[StreamId::new("bank", "Account", "slow")]).await.unwrap();
    ours_open
        .append(&StreamId::new("bank", "Account", "slow"), ExpectedVersion::Any, vec![event(2)])
        .await
        .unwrap();
    store.append(&ours, ExpectedVersion::Exact(1), vec![event(3)]).await.unwrap();
    assert_eq!(read_until(&store, 2, Duration::from_millis(300)).await.len(), 1, "held back");
    ours_open.commit().await.unwrap();
    assert_eq!(read_until(&store, 3, Duration::from_secs(10)).await.len(), 3);

    other_table.rollback().await.unwrap();
    in_other_db.rollback().await.unwrap();
    other_db.close().await;
    sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .execute(&schema.pool)
        .await
        .unwrap();
    schema.drop_schema().await;
}

/// The zombie's transaction is open, with read-model writes, while its slot moves: PostgreSQL does
/// not block the move, and the zombie's commit must then fail and roll back.
#[tokio::test]
async fn commit_after_a_concurrent_move_is_fenced() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();
    sqlx::query("CREATE TABLE rows (key TEXT PRIMARY KEY, value TEXT)")
        .execute(&schema.pool)
        .await
        .unwrap();
    let rs = ReplicaSetName::new("main").unwrap();
    let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
    let slots = SlotCount::new(8).unwrap();
    let inc = store.register(&rs, slots, &w1).await.unwrap();
    store.register(&rs, slots, &w2).await.unwrap();
    store.heartbeat(&rs, &w1, inc, Duration::from_secs(30)).await.unwrap();
    let grant_all = |expected: u64, to: &WorkerId, epoch: u64| GenerationPlan {
        expected: Generation(expected),
        generation: Generation(expected + 1),
        leader: w1.clone(),
        leader_incarnation: inc,
        members: vec![to.clone()],
        changes: slots
            .all()
            .map(|slot| SlotChange {
                slot,
                epoch: Epoch(epoch),
                action: SlotAction::Grant { to: to.clone() },
            })
            .collect(),
        evict: Vec::new(),
    };
    store.create_generation(&rs, &grant_all(0, &w1, 0)).await.unwrap();

    let mut zombie = store.begin().await.unwrap();
    sqlx::query("INSERT INTO rows VALUES ('k', 'zombie')").execute(&mut *zombie).await.unwrap();
    store.create_generation(&rs, &grant_all(1, &w2, 1)).await.unwrap();
    let fence =
        Fence { replica_set: rs.clone(), worker: w1.clone(), grants: [(Slot(0), Epoch(1))].into() };
    let err = store
        .commit(zombie, &fence, "p", &[(Slot(0), Position { commit: 1, global: 1 })].into())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    let row: Option<String> =
        sqlx::query_scalar("SELECT value FROM rows").fetch_optional(&schema.pool).await.unwrap();
    assert_eq!(row, None);
    schema.drop_schema().await;
}

/// While a commit holds the replica set row, a change of owner waits for it instead of slipping in
/// between the ownership check and the checkpoint write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waits_for_a_commit_in_progress() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();
    let rs = ReplicaSetName::new("main").unwrap();
    let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
    let slots = SlotCount::new(8).unwrap();
    let inc = store.register(&rs, slots, &w1).await.unwrap();
    store.register(&rs, slots, &w2).await.unwrap();
    store.heartbeat(&rs, &w1, inc, Duration::from_secs(30)).await.unwrap();
    let grant = |expected: u64, to: &WorkerId, epoch: u64| GenerationPlan {
        expected: Generation(expected),
        generation: Generation(expected + 1),
        leader: w1.clone(),
        leader_incarnation: inc,
        members: vec![to.clone()],
        changes: vec![SlotChange {
            slot: Slot(0),
            epoch: Epoch(epoch),
            action: SlotAction::Grant { to: to.clone() },
        }],
        evict: Vec::new(),
    };
    store.create_generation(&rs, &grant(0, &w1, 0)).await.unwrap();

    // Take the lock the way commit does (the replica set row, FOR SHARE), then hold it.
    let mut holder = store.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orch_replica_sets WHERE name = 'main' FOR SHARE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mover = {
        let store = store.clone();
        let rs = rs.clone();
        let plan = grant(1, &w2, 1);
        tokio::spawn(async move {
            let started = Instant::now();
            store.create_generation(&rs, &plan).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!mover.is_finished(), "the move must wait for the commit holding the slot row");
    holder.commit().await.unwrap();
    let waited = mover.await.unwrap();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    schema.drop_schema().await;
}

/// A commit holds the replica set row FOR SHARE; a worker frozen half way through one holds it
/// until its session ends. Heartbeats, and taking over an expired lease, must not wait for it:
/// otherwise every heartbeat stalls and no new leader can be chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_lease_takeover_do_not_wait_behind_a_commit() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();
    let rs = ReplicaSetName::new("main").unwrap();
    let (w1, w2) = (WorkerId::new("w1").unwrap(), WorkerId::new("w2").unwrap());
    let slots = SlotCount::new(8).unwrap();
    let inc1 = store.register(&rs, slots, &w1).await.unwrap();
    let inc2 = store.register(&rs, slots, &w2).await.unwrap();
    let lease = Duration::from_millis(300);
    assert!(store.heartbeat(&rs, &w1, inc1, lease).await.unwrap().leader);

    let mut frozen_commit = store.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orch_replica_sets WHERE name = 'main' FOR SHARE")
        .execute(&mut *frozen_commit)
        .await
        .unwrap();
    let within = Duration::from_secs(5);
    let beat = tokio::time::timeout(within, store.heartbeat(&rs, &w2, inc2, lease)).await;
    assert!(!beat.expect("a heartbeat waited behind the commit").unwrap().leader);
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let takeover = tokio::time::timeout(within, store.heartbeat(&rs, &w2, inc2, lease)).await;
    assert!(takeover.expect("taking the lease waited behind the commit").unwrap().leader);
    assert_eq!(store.snapshot(&rs).await.unwrap().leader().map(|l| &l.holder), Some(&w2));
    frozen_commit.rollback().await.unwrap();
    schema.drop_schema().await;
}

/// Columns decoded from PostgreSQL's binary form (transaction id, event id, metadata, creation
/// time) match what SQL says they are.
#[tokio::test]
async fn binary_columns_decode_to_what_sql_reports() {
    let Some(schema) = TestSchema::start(SlotCount::new(8).unwrap()).await else { return };
    let store = schema.store.clone();
    let mut first = event(42);
    first.metadata = r#"{"user": "ann", "n": [1, 2]}"#.into();
    store
        .append(
            &StreamId::new("bank", "Account", "a"),
            ExpectedVersion::NoStream,
            vec![first.clone()],
        )
        .await
        .unwrap();
    let request = ReadRequest {
        cursors: SlotCount::new(8).unwrap().all().map(|s| (s, Position::START)).collect(),
        scope: Scope::all(),
        limit: 10,
    };
    let read = loop {
        let batch = store.read(&request).await.unwrap();
        if !batch.is_empty() {
            break batch;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (xid, id, metadata, created_ms): (i64, String, String, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, event_id::text, metadata::text, (EXTRACT(EPOCH FROM created_at) * 1000)::bigint FROM orch_events",
    )
    .fetch_one(&schema.pool)
    .await
    .unwrap();
    let event = &read[0];
    assert_eq!(event.position.commit as i64, xid);
    assert_eq!(event.event_id.to_string(), id);
    assert_eq!(event.metadata, metadata);
    assert!(
        (event.created_at.as_millis() as i64 - created_ms).abs() <= 1,
        "{} vs {created_ms}",
        event.created_at
    );
    schema.drop_schema().await;
}
