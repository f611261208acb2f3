//! Processing inside one worker : projections that do not wait for each other, a
//! handler that hangs past HANDLER_TIMEOUT, concurrency groups that keep per-key order while
//! workers join and leave, a pool too small for the settings, and the lag estimate's error bound.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, EventStore, ReadRequest};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, Position, ReplicaSetName, Scope, SlotCount,
    Strategy, StreamId, Tracing,
};
use orchestrator_memory::{MemoryStore, MemoryTx};
use orchestrator_runtime::{
    HandlerError, Orchestrator, Projection, RunError, Settings, SystemClock, Telemetry,
};
use support::{Cluster, Harness, fast_settings};
use tokio::sync::{Semaphore, oneshot};

const WITHIN: Duration = Duration::from_secs(60);

/// Counts events; can be held at a gate (every batch waits for a permit) or hang on one batch.
struct Gated {
    name: &'static str,
    scope: Scope,
    handled: AtomicU64,
    batches: AtomicU64,
    gate: Option<Arc<Semaphore>>,
    /// The batch (1-based) whose first attempt never returns.
    hang_on: Option<u64>,
}

impl Gated {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            scope: Scope::all(),
            handled: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            gate: None,
            hang_on: None,
        }
    }
}

#[async_trait]
impl Projection<MemoryTx> for Gated {
    fn name(&self) -> &str {
        self.name
    }

    fn scope(&self) -> Scope {
        self.scope.clone()
    }

    async fn handle(&self, _tx: &mut MemoryTx, _event: &Event) -> Result<(), BoxError> {
        Ok(())
    }

    async fn handle_batch(&self, _tx: &mut MemoryTx, events: &[Event]) -> Result<(), HandlerError> {
        let batch = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hang_on == Some(batch) {
            std::future::pending::<()>().await;
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("open").forget();
        }
        self.handled.fetch_add(events.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

fn memory(slots: u64) -> MemoryStore {
    MemoryStore::new(SlotCount::new(slots).unwrap(), Arc::new(SystemClock::new()))
}

fn settings(worker: &str, slots: u64) -> Settings {
    let mut settings = fast_settings("main-projections", worker, Strategy::Incremental);
    settings.slots = SlotCount::new(slots).unwrap();
    settings.timing.coordination_timeout = Duration::from_secs(30);
    settings.handler_timeout = Some(Duration::from_secs(20));
    settings
}

/// `n` events round-robin over `aggregates` aggregates; aggregate types `A`, `B`, `C`, `D` by
/// aggregate number.
async fn append(store: &MemoryStore, from: u64, n: u64, aggregates: u64) {
    for i in from..from + n {
        let aggregate = i % aggregates;
        let kind = ["A", "B", "C", "D"][(aggregate % 4) as usize];
        let stream = StreamId::new("bench", kind, format!("agg-{aggregate}"));
        let event = NewEvent {
            event_id: EventId(orchestrator_core::Uuid::from_u64_pair(7, i)),
            event_type: "Happened".into(),
            event_version: 1,
            payload: Vec::new(),
            metadata: "{}".into(),
            tracing: Tracing::default(),
        };
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < WITHIN, "{what} did not happen within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn(
    store: &MemoryStore,
    settings: Settings,
    telemetry: Option<&Telemetry>,
    projections: Vec<Arc<dyn Projection<MemoryTx>>>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), RunError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let mut worker = Orchestrator::new(store.clone(), settings).unwrap();
    if let Some(telemetry) = telemetry {
        worker = worker.with_telemetry(telemetry);
    }
    let task = tokio::spawn(worker.run(
        async move {
            let _ = stopped.await;
        },
        projections,
    ));
    (stop, task)
}

/// A projection held at its first batch never delays the others of its worker; released, it
/// catches up on its own and every projection has handled every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_projection_does_not_hold_the_others_back() {
    let store = memory(16);
    append(&store, 0, 2_000, 100).await;
    let gate = Arc::new(Semaphore::new(0));
    let mut blocked = Gated::new("blocked");
    blocked.gate = Some(gate.clone());
    let blocked = Arc::new(blocked);
    let fast: Vec<Arc<Gated>> =
        ["fast_1", "fast_2", "fast_3"].into_iter().map(|n| Arc::new(Gated::new(n))).collect();
    let mut projections: Vec<Arc<dyn Projection<MemoryTx>>> = vec![blocked.clone()];
    projections.extend(fast.iter().map(|p| p.clone() as Arc<dyn Projection<MemoryTx>>));
    let (stop, task) = spawn(&store, settings("w1", 16), None, projections);
    wait_until("the fast projections handle everything", || {
        fast.iter().all(|p| p.handled.load(Ordering::SeqCst) == 2_000)
    })
    .await;
    assert_eq!(blocked.handled.load(Ordering::SeqCst), 0, "still held at its first batch");
    // More events: the fast ones keep going.
    append(&store, 2_000, 500, 100).await;
    wait_until("the fast projections handle the new events", || {
        fast.iter().all(|p| p.handled.load(Ordering::SeqCst) == 2_500)
    })
    .await;
    gate.add_permits(1_000_000);
    wait_until("the blocked one catches up", || blocked.handled.load(Ordering::SeqCst) == 2_500)
        .await;
    for p in &fast {
        assert_eq!(p.handled.load(Ordering::SeqCst), 2_500, "{}: exactly once", p.name);
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A handler that never returns is abandoned after HANDLER_TIMEOUT (its transaction rolled back,
/// counted in `handler_timeouts_total`) and the batch is retried; the other projection is not
/// held up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_is_abandoned_after_the_timeout_and_retried() {
    let store = memory(16);
    append(&store, 0, 300, 20).await;
    let mut hung = Gated::new("hung");
    hung.hang_on = Some(2);
    let hung = Arc::new(hung);
    let other = Arc::new(Gated::new("other"));
    let telemetry = Telemetry::new().unwrap();
    let mut settings = settings("w1", 16);
    settings.handler_timeout = Some(Duration::from_millis(300));
    let (stop, task) = spawn(
        &store,
        settings,
        Some(&telemetry),
        vec![hung.clone(), other.clone() as Arc<dyn Projection<MemoryTx>>],
    );
    wait_until("the other projection handles everything", || {
        other.handled.load(Ordering::SeqCst) == 300
    })
    .await;
    wait_until("the hung batch is retried and everything handled", || {
        hung.handled.load(Ordering::SeqCst) == 300
    })
    .await;
    let body = telemetry.render();
    let timeouts = value(&body, "pupsourcing_orchestrator_handler_timeouts_total", "hung");
    assert_eq!(timeouts, Some(1.0), "{body}");
    assert_eq!(value(&body, "pupsourcing_orchestrator_handler_timeouts_total", "other"), Some(0.0));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// The value of `series` for `projection` in a Prometheus text body.
fn value(body: &str, series: &str, projection: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (name, v) = line.rsplit_once(' ')?;
        (name.starts_with(&format!("{series}{{"))
            && name.contains(&format!("projection=\"{projection}\"")))
        .then(|| v.parse().ok())
        .flatten()
    })
}

/// `DATABASE_POOL_SIZE` below what the worker needs is refused before it starts.
#[tokio::test]
async fn a_pool_too_small_for_the_settings_is_refused_at_start() {
    let store = memory(16);
    let mut settings = settings("w1", 16);
    settings.processing_concurrency = 4;
    settings.database_pool_size = Some(8);
    let projections: Vec<Arc<dyn Projection<MemoryTx>>> =
        vec![Arc::new(Gated::new("a")), Arc::new(Gated::new("b"))];
    let worker = Orchestrator::new(store, settings).unwrap();
    let err = worker.run(async {}, projections).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid DATABASE_POOL_SIZE: 8 connections cannot serve 2 projection(s) at \
         PROCESSING_CONCURRENCY=4 (one transaction per projection and group, one read per group, \
         one for coordination): at least 13"
    );
}

/// The lag metric above the count limit is an estimate: within 10% of the exact backlog on a
/// backlog of hashed keys, for an unscoped projection over every slot, one scoped to a quarter of
/// the events, and a worker owning a quarter of the slots in four groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_estimate_stays_within_its_bound() {
    let store = memory(64);
    append(&store, 0, 60_000, 1000).await;
    let gate = Arc::new(Semaphore::new(0));
    let mut all = Gated::new("all");
    all.gate = Some(gate.clone());
    let mut scoped = Gated::new("scoped");
    scoped.gate = Some(gate.clone());
    scoped.scope = Scope { aggregate_types: vec!["B".into()], bounded_contexts: vec![] };
    let (all, scoped) = (Arc::new(all), Arc::new(scoped));
    let telemetry = Telemetry::new().unwrap();
    let mut settings = settings("w1", 64);
    settings.batch_size = 500;
    settings.processing_concurrency = 4;
    let (stop, task) = spawn(
        &store,
        settings,
        Some(&telemetry),
        vec![all.clone(), scoped.clone() as Arc<dyn Projection<MemoryTx>>],
    );
    // Let each lane handle some batches (the densities are measured on them), then hold them.
    gate.add_permits(4 * 8);
    wait_until("the first batches", || {
        all.batches.load(Ordering::SeqCst) >= 8 && scoped.batches.load(Ordering::SeqCst) >= 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await; // a few lag measurements
    let rs = ReplicaSetName::new("main-projections").unwrap();
    for (projection, scope) in [("all", Scope::all()), ("scoped", scoped.scope.clone())] {
        let checkpoints = orchestrator_core::ports::CheckpointStore::load(
            &store,
            &rs,
            projection,
            &store.slot_count().all().collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        let request = ReadRequest {
            cursors: checkpoints.into_iter().collect::<Vec<(_, Position)>>(),
            scope,
            limit: usize::MAX,
        };
        let exact = store.backlog(&request).await.unwrap().events as f64;
        let measured = value(
            &telemetry.render(),
            "pupsourcing_orchestrator_projection_lag_events",
            projection,
        )
        .unwrap();
        let error = (measured - exact).abs() / exact;
        assert!(exact > 10_000.0, "{projection}: a backlog far above the count limit: {exact}");
        assert!(
            error < 0.10,
            "{projection}: estimate {measured} against {exact} ({:.1}%)",
            error * 100.0
        );
        eprintln!("{projection}: estimate {measured}, exact {exact}, error {:.2}%", error * 100.0);
    }
    gate.add_permits(1_000_000);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// PROCESSING_CONCURRENCY=4 on every store, while workers join and one leaves: every event once,
/// per-aggregate order kept (the audit projection checks both).
async fn concurrency_groups_keep_per_key_order<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::Incremental).await else { return };
    let concurrent = |id: &str| {
        let mut settings = fast_settings("main-projections", id, Strategy::Incremental);
        settings.processing_concurrency = 4;
        settings.batch_size = 7;
        settings
    };
    cluster.append(150).await;
    for id in ["w1", "w2"] {
        let projections =
            cluster.projections.iter().map(|p| cluster.harness.audit(p, id, None)).collect();
        cluster.spawn(id, concurrent(id), projections).await;
    }
    cluster.append(150).await;
    cluster.wait_all_applied(WITHIN).await;
    let projections =
        cluster.projections.iter().map(|p| cluster.harness.audit(p, "w3", None)).collect();
    cluster.spawn("w3", concurrent("w3"), projections).await;
    cluster.append(100).await;
    cluster.leave("w1").await.unwrap();
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_groups_memory() {
    concurrency_groups_keep_per_key_order::<support::adapters::Memory>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_groups_sqlite() {
    concurrency_groups_keep_per_key_order::<support::adapters::Sqlite>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_groups_postgres() {
    concurrency_groups_keep_per_key_order::<support::adapters::Postgres>().await;
}
