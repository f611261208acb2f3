//! The runtime's scenarios that matter for a diesel projection, on real PostgreSQL, with the
//! runtime's own cluster harness (`crates/orchestrator-runtime/tests/support`, included by path):
//! workers joining, a crash, a zombie frozen with a batch in flight whose commit is refused, a
//! failing handler, every connection cut, a reset while workers run, and sqlx and diesel workers
//! sharing one projection. Each ends by checking that every event took effect exactly once per
//! projection, in per-aggregate order. The audit projection writes with diesel's query builder
//! (`insert_into(..).on_conflict(..)`), and its reset hook with `delete`.

#[allow(dead_code, unreachable_pub, clippy::all)]
#[path = "../../../crates/orchestrator-runtime/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orchestrator_core::ports::{BoxError, ChangeFeed, CheckpointStore};
use orchestrator_core::{Event, ReplicaSetName, SlotCount, Strategy};
use orchestrator_diesel::testing::TestSchema;
use orchestrator_diesel::{DieselStore, DieselTx};
use orchestrator_postgres::PgTx;
use orchestrator_runtime::{Projection, reset_projection};
use support::{AuditRow, Cluster, Harness, SLOTS, fast_settings};

const WITHIN: Duration = Duration::from_secs(30);

diesel::table! {
    audit (projection, global_position) {
        projection -> Text,
        global_position -> BigInt,
        times -> BigInt,
        aggregate_id -> Text,
        aggregate_version -> BigInt,
        handled_seq -> BigInt,
        worker_id -> Text,
    }
}

/// The audit projection, written with diesel: one row per event, counting applications.
struct DieselAudit {
    name: String,
    worker: String,
    fail_on: Option<u64>,
}

fn failure(event: &Event) -> BoxError {
    format!("projection configured to fail at {}", event.position.global).into()
}

#[async_trait]
impl Projection<DieselTx> for DieselAudit {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, tx: &mut DieselTx, event: &Event) -> Result<(), BoxError> {
        if self.fail_on == Some(event.position.global) {
            return Err(failure(event));
        }
        let seq = || diesel::dsl::sql::<diesel::sql_types::BigInt>("nextval('audit_seq')");
        diesel::insert_into(audit::table)
            .values((
                audit::projection.eq(&self.name),
                audit::global_position.eq(event.position.global as i64),
                audit::times.eq(1_i64),
                audit::aggregate_id.eq(&event.stream.aggregate_id),
                audit::aggregate_version.eq(event.aggregate_version as i64),
                audit::handled_seq.eq(seq()),
                audit::worker_id.eq(&self.worker),
            ))
            .on_conflict((audit::projection, audit::global_position))
            .do_update()
            .set((audit::times.eq(audit::times + 1), audit::handled_seq.eq(seq())))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut DieselTx) -> Result<(), BoxError> {
        diesel::delete(audit::table.filter(audit::projection.eq(&self.name)))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// The same audit written with sqlx, for workers on the PostgreSQL store next to diesel ones.
struct SqlxAudit {
    name: String,
    worker: String,
}

#[async_trait]
impl Projection<PgTx> for SqlxAudit {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO audit (projection, global_position, times, aggregate_id, aggregate_version, handled_seq, worker_id) \
             VALUES ($1, $2, 1, $3, $4, nextval('audit_seq'), $5) \
             ON CONFLICT (projection, global_position) DO UPDATE SET times = audit.times + 1, handled_seq = nextval('audit_seq')",
        )
        .bind(&self.name)
        .bind(event.position.global as i64)
        .bind(&event.stream.aggregate_id)
        .bind(event.aggregate_version as i64)
        .bind(&self.worker)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

struct Diesel {
    schema: TestSchema,
}

#[async_trait]
impl Harness for Diesel {
    type S = DieselStore;

    async fn start() -> Option<Self> {
        let schema = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await?;
        sqlx::raw_sql(
            "CREATE SEQUENCE audit_seq; \
             CREATE TABLE audit (projection TEXT NOT NULL, global_position BIGINT NOT NULL, times BIGINT NOT NULL, \
             aggregate_id TEXT NOT NULL, aggregate_version BIGINT NOT NULL, handled_seq BIGINT NOT NULL, \
             worker_id TEXT NOT NULL, PRIMARY KEY (projection, global_position))",
        )
        .execute(&schema.pg.pool)
        .await
        .unwrap();
        Some(Self { schema })
    }

    fn store(&self) -> DieselStore {
        self.schema.store.clone()
    }

    fn audit(
        &self,
        name: &str,
        worker: &str,
        fail_on: Option<u64>,
    ) -> Arc<dyn Projection<DieselTx>> {
        Arc::new(DieselAudit { name: name.into(), worker: worker.into(), fail_on })
    }

    async fn audit_rows(&self, name: &str) -> Vec<AuditRow> {
        let mut conn = self.schema.diesel.get().await.unwrap();
        let rows: Vec<(i64, i64, String, i64, i64, String)> = audit::table
            .filter(audit::projection.eq(name))
            .select((
                audit::global_position,
                audit::times,
                audit::aggregate_id,
                audit::aggregate_version,
                audit::handled_seq,
                audit::worker_id,
            ))
            .load(&mut *conn)
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| AuditRow {
                global: r.0 as u64,
                times: r.1,
                aggregate: r.2,
                version: r.3,
                handled_seq: r.4,
                worker: r.5,
            })
            .collect()
    }

    async fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        Some(Box::new(self.schema.store.change_feed().await.unwrap()))
    }

    async fn finish(self) {
        self.schema.drop_schema().await;
    }
}

async fn workers_join_and_the_work_splits(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<Diesel>::start(strategy).await else { return };
    cluster.join("w1").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.join("w3").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert_eq!(by_worker.len(), 3, "every worker applied events: {by_worker:?}");
    cluster.stop_all().await;
}

async fn a_crashed_worker_is_replaced_after_the_stale_timeout(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<Diesel>::start(strategy).await else { return };
    cluster.join("w1").await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.crash("w2");
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert!(by_worker.contains_key("w1"));
    cluster.stop_all().await;
}

/// A worker frozen with a batch in flight (its diesel transaction open, the commit held) goes
/// stale; the other takes its slots; when the zombie thaws its commit is refused (or its session
/// was ended by the idle-in-transaction timeout) and nothing applies twice.
async fn a_paused_worker_cannot_commit_when_it_resumes(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<Diesel>::start(strategy).await else { return };
    let zombie_store = support::pausable::Pausable::new(cluster.harness.store(), false);
    let projections =
        cluster.projections.iter().map(|p| cluster.harness.audit(p, "zombie", None)).collect();
    cluster.spawn_on(
        zombie_store.clone(),
        cluster.harness.change_feed().await,
        "zombie",
        fast_settings("main-projections", "zombie", strategy),
        projections,
    );
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    zombie_store.pause();
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert!(by_worker.contains_key("w2"), "{by_worker:?}");
    zombie_store.resume();
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// A handler failing on one event: its diesel transaction is dropped each attempt (nothing kept),
/// then the projection stops there (recorded in the store), no checkpoint passes it, and the
/// worker stays and leaves cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler() {
    let Some(mut cluster) = Cluster::<Diesel>::start(Strategy::default()).await else { return };
    cluster.append(60).await;
    let failing = 37;
    let projections = vec![cluster.harness.audit("audit", "w1", Some(failing))];
    cluster
        .spawn("w1", fast_settings("main-projections", "w1", Strategy::default()), projections)
        .await;
    let store = cluster.harness.store();
    let rs = ReplicaSetName::new("main-projections").unwrap();
    let started = std::time::Instant::now();
    let stopped = loop {
        let stopped = CheckpointStore::stopped_projections(&store, &rs).await.unwrap();
        if !stopped.is_empty() {
            break stopped;
        }
        assert!(started.elapsed() < WITHIN, "the stop was not recorded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        (stopped[0].stop.projection.as_str(), stopped[0].stop.position.global),
        ("audit", failing)
    );
    cluster.leave("w1").await.unwrap();
    let slot = SlotCount::new(SLOTS).unwrap().slot_of(&format!("acct-{}", failing % 20));
    let checkpoints = CheckpointStore::load(&store, &rs, "audit", &[slot]).await.unwrap();
    assert!(checkpoints[&slot].global < failing, "checkpoint {} passed it", checkpoints[&slot]);
    let rows = cluster.harness.audit_rows("audit").await;
    assert!(rows.iter().all(|r| r.global != failing && r.times == 1));
    cluster.harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_incremental() {
    workers_join_and_the_work_splits(Strategy::Incremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_recreate() {
    workers_join_and_the_work_splits(Strategy::Recreate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_incremental() {
    a_crashed_worker_is_replaced_after_the_stale_timeout(Strategy::Incremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_incremental() {
    a_paused_worker_cannot_commit_when_it_resumes(Strategy::Incremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_recreate() {
    a_paused_worker_cannot_commit_when_it_resumes(Strategy::Recreate).await;
}

/// Every connection, sqlx's and diesel's, is cut twice while two workers process: they
/// reconnect by themselves and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_is_survived() {
    let Some(mut cluster) = Cluster::<Diesel>::start(Strategy::Incremental).await else { return };
    cluster.join("w1").await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    for _ in 0..2 {
        let killed = cluster.harness.schema.kill_connections().await.unwrap();
        assert!(killed > 0);
        cluster.append(100).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// A worker on the sqlx store and a worker on the diesel store run the same projections on the
/// same tables: slots move between them (a join, then the sqlx worker leaves) and every event
/// still applies exactly once. Switching a projection's API needs no migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_and_diesel_workers_share_a_projection() {
    let Some(mut cluster) = Cluster::<Diesel>::start(Strategy::Incremental).await else { return };
    let pg = cluster.harness.schema.pg.store.clone();
    let feed: Option<Box<dyn ChangeFeed>> = Some(Box::new(pg.change_feed().await.unwrap()));
    let sqlx_projections: Vec<Arc<dyn Projection<PgTx>>> = cluster
        .projections
        .iter()
        .map(|p| {
            Arc::new(SqlxAudit { name: p.clone(), worker: "sqlx".into() })
                as Arc<dyn Projection<PgTx>>
        })
        .collect();
    cluster.spawn_on(
        pg,
        feed,
        "sqlx",
        fast_settings("main-projections", "sqlx", Strategy::Incremental),
        sqlx_projections,
    );
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.join("diesel").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.append(100).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert_eq!(by_worker.len(), 2, "both APIs applied events: {by_worker:?}");
    cluster.leave("sqlx").await.unwrap();
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// `reset_projection` with a diesel projection while two workers run it: the reset hook's diesel
/// `delete` commits with the checkpoints' deletion and the new epochs, the workers are fenced,
/// start over from the first event, and every event is applied once more, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_while_running_rebuilds_once() {
    let Some(mut cluster) = Cluster::<Diesel>::start(Strategy::Incremental).await else { return };
    cluster.join("w1").await;
    cluster.join("w2").await;
    cluster.append(150).await;
    cluster.wait_all_applied(WITHIN).await;
    let store = cluster.harness.store();
    let rs = ReplicaSetName::new("main-projections").unwrap();
    let audit = cluster.harness.audit("audit", "reset", None);
    reset_projection(&store, &rs, audit.as_ref()).await.unwrap();
    cluster.append(50).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert_eq!(by_worker.values().sum::<usize>(), 200, "{by_worker:?}");
    // Nothing is applied a second time later either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}
