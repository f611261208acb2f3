//! Every metric of docs/metrics.md, driven by the behaviour it measures and read back from
//! `/metrics` over HTTP, as Prometheus would; and `/healthz`, `/readyz`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::ports::{
    BoxError, CheckpointStore, CoordinationStore, DeadLetterAction, DeadLetterFilter,
    DeadLetterStore, EventStore, UnitOfWork, UnitOfWorkStore,
};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, ReplicaSetName, SlotCount, StreamId, Timing,
    Tracing, WorkerId,
};
use orchestrator_memory::{MemoryStore, MemoryTx};
use orchestrator_runtime::{
    FailurePolicy, HandlerError, Orchestrator, Permanent, Projection, RunError, Server, Settings,
    SystemClock, Telemetry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SLOTS: u64 = 16;
const RS: &str = "main-projections";

/// Every series name the runtime exports (histograms by their `_count` series).
const EMITTED: [&str; 22] = [
    "pupsourcing_orchestrator_reconfiguration_total",
    "pupsourcing_orchestrator_generations_total",
    "pupsourcing_orchestrator_workers_registered_total",
    "pupsourcing_orchestrator_partition_assignments_total",
    "pupsourcing_orchestrator_stale_workers_cleaned_total",
    "pupsourcing_orchestrator_coordination_timeouts_total",
    "pupsourcing_orchestrator_events_processed_total",
    "pupsourcing_orchestrator_projection_errors_total",
    "pupsourcing_orchestrator_commits_fenced_total",
    "pupsourcing_orchestrator_handler_timeouts_total",
    "pupsourcing_orchestrator_active_workers",
    "pupsourcing_orchestrator_current_generation",
    "pupsourcing_orchestrator_current_generation_partitions",
    "pupsourcing_orchestrator_owned_slots",
    "pupsourcing_orchestrator_worker_state",
    "pupsourcing_orchestrator_projection_lag_events",
    "pupsourcing_orchestrator_projection_lag_seconds",
    "pupsourcing_orchestrator_read_horizon_stall_seconds",
    "pupsourcing_orchestrator_coordination_duration_seconds_count",
    "pupsourcing_orchestrator_event_processing_duration_seconds_count",
    "pupsourcing_orchestrator_heartbeat_latency_seconds_count",
    "pupsourcing_orchestrator_heartbeat_latency_seconds_bucket",
];

/// A projection that records how often it ran, can be slowed down, and can fail a number of times.
struct Counting {
    handled: AtomicU64,
    delay_per_batch: Duration,
    failures_left: AtomicU64,
}

impl Counting {
    fn new(delay_per_batch: Duration, failures: u64) -> Arc<Self> {
        Arc::new(Self {
            handled: AtomicU64::new(0),
            delay_per_batch,
            failures_left: AtomicU64::new(failures),
        })
    }
}

#[async_trait]
impl Projection<MemoryTx> for Counting {
    fn name(&self) -> &str {
        "orders"
    }
    async fn handle(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), BoxError> {
        tx.put("orders", &event.position.global.to_string(), b"seen".to_vec());
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn handle_batch(
        &self,
        tx: &mut MemoryTx,
        events: &[Event],
    ) -> Result<(), orchestrator_runtime::HandlerError> {
        tokio::time::sleep(self.delay_per_batch).await;
        let failing = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(orchestrator_runtime::HandlerError {
                index: Some(0),
                source: "injected failure".into(),
            });
        }
        for event in events {
            self.handle(tx, event)
                .await
                .map_err(|source| orchestrator_runtime::HandlerError { index: None, source })?;
        }
        Ok(())
    }
}

fn store() -> MemoryStore {
    MemoryStore::new(SlotCount::new(SLOTS).unwrap(), Arc::new(SystemClock::new()))
}

fn settings(worker: &str) -> Settings {
    let mut settings = Settings::new(ReplicaSetName::new(RS).unwrap());
    settings.worker_id = WorkerId::new(worker).unwrap();
    settings.slots = SlotCount::new(SLOTS).unwrap();
    settings.timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        stale_worker_timeout: Duration::from_millis(600),
        coordination_timeout: Duration::from_millis(500),
        poll_interval: Duration::from_millis(50),
        registration_wait: Duration::from_millis(50),
    };
    settings.idle_poll = Duration::from_millis(20);
    settings.batch_size = 10;
    settings.retry.initial_backoff = Duration::from_millis(5);
    settings
}

async fn append(store: &MemoryStore, n: u64) {
    for i in 0..n {
        let stream = StreamId::new("sales", "Order", format!("order-{}", i % 7));
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&(i + 1_000_000 * u64::from(rand_salt())).to_be_bytes());
        let event = NewEvent {
            event_id: EventId::from_bytes(id),
            event_type: "Placed".into(),
            event_version: 1,
            payload: Vec::new(),
            metadata: "{}".into(),
            tracing: Tracing::default(),
        };
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
}

/// Distinct per call, so event ids never repeat within a test.
fn rand_salt() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) as u32
}

/// A worker running in the background with its own telemetry served on a free port.
struct Running {
    telemetry_server: Server,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

async fn start(store: &MemoryStore, worker: &str, projection: Arc<Counting>) -> Running {
    start_with(store, settings(worker), projection).await
}

async fn start_with(
    store: &MemoryStore,
    settings: Settings,
    projection: Arc<dyn Projection<MemoryTx>>,
) -> Running {
    let telemetry = Telemetry::new().unwrap();
    let telemetry_server = telemetry.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let orchestrator =
        Orchestrator::new(store.clone(), settings).unwrap().with_telemetry(&telemetry);
    let task = tokio::spawn(orchestrator.run(
        async {
            let _ = stopped.await;
        },
        vec![projection],
    ));
    Running { telemetry_server, stop: Some(stop), task }
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.telemetry_server.local_addr()
    }

    async fn scrape(&self) -> String {
        get(self.addr(), "/metrics").await.1
    }

    /// Polls `/metrics` until `check` holds for the value of a series (10 s at most).
    async fn wait_for(
        &self,
        series: &str,
        labels: &[(&str, &str)],
        check: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = self.scrape().await;
            if let Some(v) = value(&body, series, labels).filter(|v| check(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{series}{labels:?} never satisfied the check; last scrape:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn leave(mut self) -> Server {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
        self.telemetry_server
    }

    fn crash(self) -> Server {
        self.task.abort();
        self.telemetry_server
    }
}

/// One HTTP/1.1 GET: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of the first series named `name` carrying every label in `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        let matches = series_name == name
            && labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

fn names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Metric names a text file refers to (`pupsourcing_orchestrator_...`).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pupsourcing_orchestrator_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        // The bare prefix, where prose introduces it, names no metric.
        if end > "pupsourcing_orchestrator_".len() {
            found.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    found
}

/// A short run (a worker, a join, a crash, an eviction, a graceful leave) makes every metric
/// appear with the values the behaviour implies; every metric the Grafana dashboard and
/// docs/metrics.md name is among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_emits_every_metric() {
    let store = store();
    let a = start(&store, "worker-a", Counting::new(Duration::ZERO, 0)).await;
    assert_eq!(get(a.addr(), "/healthz").await.0, 200);
    append(&store, 200).await;
    let orders = [("replica_set", RS), ("projection", "orders")];
    a.wait_for("pupsourcing_orchestrator_events_processed_total", &orders, |v| v == 200.0).await;
    assert_eq!(get(a.addr(), "/readyz").await.0, 200);

    let b = start(&store, "worker-b", Counting::new(Duration::ZERO, 0)).await;
    let rs = [("replica_set", RS)];
    a.wait_for("pupsourcing_orchestrator_current_generation_partitions", &rs, |v| v == 2.0).await;
    a.wait_for("pupsourcing_orchestrator_active_workers", &rs, |v| v == 2.0).await;
    b.wait_for("pupsourcing_orchestrator_owned_slots", &rs, |v| v == (SLOTS / 2) as f64).await;
    let _b_server = b.crash();
    a.wait_for("pupsourcing_orchestrator_stale_workers_cleaned_total", &rs, |v| v == 1.0).await;
    a.wait_for("pupsourcing_orchestrator_active_workers", &rs, |v| v == 1.0).await;
    a.wait_for("pupsourcing_orchestrator_owned_slots", &rs, |v| v == SLOTS as f64).await;
    append(&store, 50).await;
    a.wait_for("pupsourcing_orchestrator_events_processed_total", &orders, |v| v >= 250.0).await;

    let body = a.scrape().await;
    let emitted = names(&body);
    for name in EMITTED {
        assert!(emitted.contains(name), "{name} missing from /metrics:\n{body}");
    }
    let at_least = |series: &str, labels: &[(&str, &str)], min: f64| {
        let v = value(&body, series, labels).unwrap_or_else(|| panic!("{series} missing"));
        assert!(v >= min, "{series} = {v}, expected at least {min}");
    };
    assert_eq!(value(&body, "pupsourcing_orchestrator_workers_registered_total", &rs), Some(1.0));
    // Generations 1 (alone), 2 (with b) and 3 (b evicted), all created by a as leader.
    at_least("pupsourcing_orchestrator_generations_total", &rs, 3.0);
    at_least("pupsourcing_orchestrator_reconfiguration_total", &rs, 3.0);
    at_least("pupsourcing_orchestrator_partition_assignments_total", &rs, 3.0);
    at_least("pupsourcing_orchestrator_current_generation", &rs, 3.0);
    at_least("pupsourcing_orchestrator_coordination_duration_seconds_count", &rs, 2.0);
    at_least("pupsourcing_orchestrator_heartbeat_latency_seconds_count", &rs, 1.0);
    at_least("pupsourcing_orchestrator_event_processing_duration_seconds_count", &orders, 1.0);
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_projection_errors_total", &orders),
        Some(0.0)
    );
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_worker_state", &[("state", "processing")]),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_worker_state", &[("state", "coordinating")]),
        Some(0.0)
    );

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    for document in ["deploy/grafana/orchestrator-dashboard.json", "docs/metrics.md"] {
        let text = std::fs::read_to_string(format!("{root}/{document}"))
            .unwrap_or_else(|e| panic!("cannot read {document}: {e}"));
        let mentioned = referenced(&text);
        assert!(!mentioned.is_empty(), "{document} names no metric");
        for name in mentioned {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            let known = emitted.contains(&name)
                || emitted.contains(&format!("{base}_count"))
                || emitted.contains(base);
            assert!(known, "{document} uses {name}, which the runtime does not emit");
        }
    }

    let server = a.leave().await;
    let body = get(server.local_addr(), "/metrics").await.1;
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_worker_state", &[("state", "stopped")]),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_worker_state", &[("state", "processing")]),
        Some(0.0)
    );
    assert_eq!(get(server.local_addr(), "/healthz").await.0, 503);
    assert_eq!(get(server.local_addr(), "/readyz").await.0, 503);
}

/// Lag rises while a slow projection works through a backlog and falls to zero once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_reported_while_behind_and_zero_when_caught_up() {
    let store = store();
    let a = start(&store, "worker-a", Counting::new(Duration::from_millis(40), 0)).await;
    let orders = [("replica_set", RS), ("projection", "orders")];
    a.wait_for("pupsourcing_orchestrator_owned_slots", &[("replica_set", RS)], |v| {
        v == SLOTS as f64
    })
    .await;
    append(&store, 400).await;
    let behind =
        a.wait_for("pupsourcing_orchestrator_projection_lag_events", &orders, |v| v > 0.0).await;
    assert!(behind <= 400.0);
    a.wait_for("pupsourcing_orchestrator_projection_lag_seconds", &orders, |v| v > 0.0).await;
    a.wait_for("pupsourcing_orchestrator_events_processed_total", &orders, |v| v == 400.0).await;
    a.wait_for("pupsourcing_orchestrator_projection_lag_events", &orders, |v| v == 0.0).await;
    a.wait_for("pupsourcing_orchestrator_projection_lag_seconds", &orders, |v| v == 0.0).await;
    a.leave().await;
}

/// Each failed attempt of a handler is counted; the retries then succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_failures_are_counted() {
    let store = store();
    let projection = Counting::new(Duration::ZERO, 2);
    let a = start(&store, "worker-a", projection.clone()).await;
    append(&store, 30).await;
    let orders = [("replica_set", RS), ("projection", "orders")];
    a.wait_for("pupsourcing_orchestrator_events_processed_total", &orders, |v| v == 30.0).await;
    let body = a.scrape().await;
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_projection_errors_total", &orders),
        Some(2.0)
    );
    assert_eq!(projection.handled.load(Ordering::Relaxed), 30);
    a.leave().await;
}

/// Parks `order-3` (a permanent failure on its first event), then hangs when its letters are
/// retried.
struct HangsOnRetry {
    parked: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Projection<MemoryTx> for HangsOnRetry {
    fn name(&self) -> &str {
        "orders"
    }
    fn failure_policy(&self) -> Option<FailurePolicy> {
        Some(FailurePolicy::Park)
    }
    async fn handle(&self, _tx: &mut MemoryTx, _event: &Event) -> Result<(), BoxError> {
        Ok(())
    }
    async fn handle_batch(&self, _tx: &mut MemoryTx, events: &[Event]) -> Result<(), HandlerError> {
        if let Some(index) = events.iter().position(|e| e.stream.aggregate_id == "order-3") {
            if !self.parked.swap(true, Ordering::SeqCst) {
                return Err(HandlerError::at(index, Permanent::new("undecodable")));
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Ok(())
    }
}

/// A retry of dead letters whose handler does not return in time counts as a failure and a
/// timeout, as a batch's does, and the letters stay parked with the timeout as their error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_times_out_is_counted() {
    let store = store();
    let mut settings = settings("worker-a");
    settings.handler_timeout = Some(Duration::from_millis(200));
    let projection = Arc::new(HangsOnRetry { parked: Default::default() });
    let a = start_with(&store, settings, projection).await;
    append(&store, 30).await;
    let rs = ReplicaSetName::new(RS).unwrap();
    let orders_3 = DeadLetterFilter {
        projection: Some("orders".to_owned()),
        key: Some("order-3".to_owned()),
        ..Default::default()
    };
    let orders = [("replica_set", RS), ("projection", "orders")];
    // 30 events over 7 orders: order-3 has 4 of them, all parked (none applied).
    a.wait_for("pupsourcing_orchestrator_dead_letters", &orders, |v| v == 4.0).await;
    let errors = a.scrape().await;
    assert_eq!(
        value(&errors, "pupsourcing_orchestrator_projection_errors_total", &orders),
        Some(1.0)
    );
    store.request(&rs, &orders_3, DeadLetterAction::Retry).await.unwrap();
    a.wait_for("pupsourcing_orchestrator_handler_timeouts_total", &orders, |v| v == 1.0).await;
    let body = a.scrape().await;
    assert_eq!(
        value(&body, "pupsourcing_orchestrator_projection_errors_total", &orders),
        Some(2.0)
    );
    let letters = store.dead_letters(&rs, &orders_3).await.unwrap();
    assert_eq!(letters.len(), 4);
    assert!(letters.iter().all(|l| l.error.contains("did not return within")), "{letters:?}");
    a.leave().await;
}

/// A commit made under an epoch that moved on (here: a projection reset while a batch is in
/// flight) is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_commits_are_counted() {
    let store = store();
    let a = start(&store, "worker-a", Counting::new(Duration::from_millis(50), 0)).await;
    let orders = [("replica_set", RS), ("projection", "orders")];
    append(&store, 300).await;
    a.wait_for("pupsourcing_orchestrator_events_processed_total", &orders, |v| v >= 10.0).await;
    let tx = store.begin().await.unwrap();
    store.reset(tx, &ReplicaSetName::new(RS).unwrap(), "orders").await.unwrap();
    a.wait_for("pupsourcing_orchestrator_commits_fenced_total", &orders, |v| v >= 1.0).await;
    a.leave().await;
}

/// A member that heartbeats but never acknowledges the generation makes the leader's
/// coordination time out, and the timeout is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordination_timeouts_are_counted() {
    let store = store();
    let a = start(&store, "worker-a", Counting::new(Duration::ZERO, 0)).await;
    // worker-a leads (it heartbeat first); the ghost joins its replica set.
    a.wait_for("pupsourcing_orchestrator_owned_slots", &[("replica_set", RS)], |v| {
        v == SLOTS as f64
    })
    .await;
    let rs = ReplicaSetName::new(RS).unwrap();
    let ghost = WorkerId::new("ghost").unwrap();
    let incarnation = store.register(&rs, SlotCount::new(SLOTS).unwrap(), &ghost).await.unwrap();
    let heartbeats = {
        let (store, rs, ghost) = (store.clone(), rs.clone(), ghost.clone());
        tokio::spawn(async move {
            loop {
                let _ = store.heartbeat(&rs, &ghost, incarnation, Duration::from_millis(600)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    a.wait_for(
        "pupsourcing_orchestrator_coordination_timeouts_total",
        &[("replica_set", RS)],
        |v| v >= 1.0,
    )
    .await;
    heartbeats.abort();
    a.leave().await;
}

/// A no-op projection on PostgreSQL.
struct PgNoop;

#[async_trait]
impl Projection<orchestrator_postgres::PgTx> for PgNoop {
    fn name(&self) -> &str {
        "orders"
    }
    async fn handle(
        &self,
        _tx: &mut orchestrator_postgres::PgTx,
        _event: &Event,
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

/// On PostgreSQL a transaction that appended and stays open holds every reader back; the worker
/// reports for how long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_horizon_stall_is_reported_on_postgres() {
    let slots = SlotCount::new(SLOTS).unwrap();
    let Some(schema) = orchestrator_postgres::testing::TestSchema::start(slots).await else {
        return;
    };
    let telemetry = Telemetry::new().unwrap();
    let server = telemetry.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = Orchestrator::new(schema.store.clone(), settings("worker-a"))
        .unwrap()
        .with_telemetry(&telemetry);
    let projections: Vec<Arc<dyn Projection<orchestrator_postgres::PgTx>>> = vec![Arc::new(PgNoop)];
    let task = tokio::spawn(worker.run(
        async {
            let _ = stopped.await;
        },
        projections,
    ));
    let stream = StreamId::new("sales", "Order", "order-1");
    let event = NewEvent::new(EventId::from_bytes([7; 16]), "Placed", Vec::new());
    let mut open = schema.store.begin_unit_of_work(std::slice::from_ref(&stream)).await.unwrap();
    open.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    let running = Running { telemetry_server: server, stop: Some(stop), task };
    let rs = [("replica_set", RS)];
    running
        .wait_for("pupsourcing_orchestrator_read_horizon_stall_seconds", &rs, |v| v >= 0.5)
        .await;
    drop(open);
    running.wait_for("pupsourcing_orchestrator_read_horizon_stall_seconds", &rs, |v| v < 0.5).await;
    running.leave().await;
    schema.drop_schema().await;
}
