//! A cluster of in-process workers over one store, with an audit projection that records every
//! event it applies, so scenarios can assert exact counts and per-aggregate order.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::ports::{ChangeFeed, CheckpointStore, EventStore};
use orchestrator_core::{
    EventId, ExpectedVersion, NewEvent, ReplicaSetName, SlotCount, Strategy, StreamId, Timing,
    Tracing, WorkerId,
};
use orchestrator_runtime::{Orchestrator, Projection, RunError, Settings, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod adapters;
pub mod pausable;

/// Slots of every test store.
pub const SLOTS: u64 = 16;

/// One applied event as the audit projection recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub global: u64,
    pub times: i64,
    pub aggregate: String,
    pub version: i64,
    pub handled_seq: i64,
    pub worker: String,
}

/// What an adapter provides to run the scenarios.
#[async_trait]
pub trait Harness: Sized + Send + Sync + 'static {
    type S: Store;
    /// Whether an open write transaction blocks every other writer (SQLite).
    const SINGLE_WRITER: bool = false;
    async fn start() -> Option<Self>;
    fn store(&self) -> Self::S;
    /// The audit projection `name` as run by `worker`; it fails every time on `fail_on` (a global position).
    fn audit(
        &self,
        name: &str,
        worker: &str,
        fail_on: Option<u64>,
    ) -> Arc<dyn Projection<<Self::S as CheckpointStore>::Tx>>;
    async fn audit_rows(&self, name: &str) -> Vec<AuditRow>;
    /// Wake-ups from the store, where it has them (PostgreSQL).
    async fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        None
    }
    async fn finish(self) {}
}

/// Timing fast enough for tests: stale after 1.5 s.
pub fn fast_settings(replica_set: &str, worker: &str, strategy: Strategy) -> Settings {
    let mut settings = Settings::new(ReplicaSetName::new(replica_set).unwrap());
    settings.worker_id = WorkerId::new(worker).unwrap();
    settings.timing = Timing {
        heartbeat_interval: Duration::from_millis(200),
        stale_worker_timeout: Duration::from_millis(1500),
        coordination_timeout: Duration::from_secs(4),
        poll_interval: Duration::from_millis(100),
        registration_wait: Duration::from_millis(200),
    };
    settings.idle_poll = Duration::from_millis(20);
    settings.batch_size = 25;
    settings.slots = SlotCount::new(SLOTS).unwrap();
    settings.strategy = strategy;
    settings.retry.initial_backoff = Duration::from_millis(10);
    settings.retry.max_attempts = 3;
    settings
}

pub struct Worker {
    pub id: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), RunError>>,
}

/// Workers sharing one store.
pub struct Cluster<H: Harness> {
    pub harness: H,
    pub workers: Vec<Worker>,
    pub appended: u64,
    pub strategy: Strategy,
    pub projections: Vec<String>,
}

impl<H: Harness> Cluster<H> {
    pub async fn start(strategy: Strategy) -> Option<Self> {
        // RUST_LOG=info shows the workers' log lines when a scenario needs explaining.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let harness = H::start().await?;
        Some(Self {
            harness,
            workers: Vec::new(),
            appended: 0,
            strategy,
            projections: vec!["audit".into(), "audit_b".into()],
        })
    }

    pub async fn spawn(
        &mut self,
        id: &str,
        settings: Settings,
        projections: Vec<Arc<dyn Projection<<H::S as CheckpointStore>::Tx>>>,
    ) {
        let store = self.harness.store();
        let feed = self.harness.change_feed().await;
        self.spawn_on(store, feed, id, settings, projections);
    }

    /// Starts a worker on a store of its own (a wrapper around the harness's).
    pub fn spawn_on<T: Store>(
        &mut self,
        store: T,
        feed: Option<Box<dyn ChangeFeed>>,
        id: &str,
        settings: Settings,
        projections: Vec<Arc<dyn Projection<<T as CheckpointStore>::Tx>>>,
    ) {
        let (tx, rx) = oneshot::channel::<()>();
        let mut worker = Orchestrator::new(store, settings).unwrap();
        if let Some(feed) = feed {
            worker = worker.with_change_feed(feed);
        }
        let handle = tokio::spawn(worker.run(
            async move {
                let _ = rx.await;
            },
            projections,
        ));
        self.workers.push(Worker { id: id.to_owned(), shutdown: Some(tx), handle });
    }

    /// Starts a worker running both audit projections.
    pub async fn join(&mut self, id: &str) {
        let projections =
            self.projections.iter().map(|p| self.harness.audit(p, id, None)).collect();
        let settings = fast_settings("main-projections", id, self.strategy);
        self.spawn(id, settings, projections).await;
    }

    fn index(&self, id: &str) -> usize {
        self.workers.iter().position(|w| w.id == id).unwrap()
    }

    /// SIGTERM: asks a worker to leave and waits for it.
    pub async fn leave(&mut self, id: &str) -> Result<(), RunError> {
        let worker = self.workers.remove(self.index(id));
        let _ = worker.shutdown.unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), worker.handle)
            .await
            .expect("worker left in time")
            .unwrap()
    }

    /// kill -9: the worker disappears without a word.
    pub fn crash(&mut self, id: &str) {
        let worker = self.workers.remove(self.index(id));
        worker.handle.abort();
    }

    /// Waits for a worker to end on its own.
    pub async fn wait_exit(&mut self, id: &str) -> Result<(), RunError> {
        let worker = self.workers.remove(self.index(id));
        tokio::time::timeout(Duration::from_secs(30), worker.handle)
            .await
            .expect("worker ended in time")
            .unwrap()
    }

    pub async fn append(&mut self, n: u64) {
        let store = self.harness.store();
        for _ in 0..n {
            self.appended += 1;
            let seq = self.appended;
            let stream = StreamId::new("bank", "Account", format!("acct-{}", seq % 20));
            // As an application would: a transient failure is retried; if the failed attempt had
            // committed after all, the retry finds the event id taken, and the event is in.
            let mut retried = false;
            loop {
                match store.append(&stream, ExpectedVersion::Any, vec![new_event(seq)]).await {
                    Ok(_) => break,
                    Err(orchestrator_core::ports::StoreError::DuplicateEvent { .. }) if retried => {
                        break;
                    }
                    Err(err) if err.is_retryable() => {
                        retried = true;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(err) => panic!("append {seq}: {err}"),
                }
            }
        }
    }

    /// Waits until every projection applied every appended event, then checks exactly-once and
    /// per-aggregate order. Returns how many events each worker applied (first projection).
    pub async fn wait_all_applied(&self, within: Duration) -> BTreeMap<String, usize> {
        let started = Instant::now();
        for projection in &self.projections {
            loop {
                let rows = self.harness.audit_rows(projection).await;
                if rows.len() as u64 >= self.appended {
                    check_exactly_once_in_order(projection, &rows, self.appended);
                    break;
                }
                assert!(
                    started.elapsed() < within,
                    "{projection}: {} of {} events applied within {within:?}",
                    rows.len(),
                    self.appended
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        let mut by_worker = BTreeMap::new();
        for row in self.harness.audit_rows(&self.projections[0]).await {
            *by_worker.entry(row.worker).or_insert(0) += 1;
        }
        by_worker
    }

    pub async fn stop_all(mut self) {
        let ids: Vec<String> = self.workers.iter().map(|w| w.id.clone()).collect();
        for id in ids {
            self.leave(&id).await.unwrap();
        }
        self.harness.finish().await;
    }
}

pub fn new_event(n: u64) -> NewEvent {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id[6] = 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    NewEvent {
        event_id: EventId::from_bytes(id),
        event_type: "Deposited".into(),
        event_version: 1,
        payload: n.to_string().into_bytes(),
        metadata: "{}".into(),
        tracing: Tracing::default(),
    }
}

/// Every appended event applied exactly once (`times = 1`), and within each aggregate the handling
/// order (`handled_seq`) follows the versions 1, 2, 3, ...
pub fn check_exactly_once_in_order(projection: &str, rows: &[AuditRow], appended: u64) {
    assert_eq!(rows.len() as u64, appended, "{projection}: rows");
    for row in rows {
        assert_eq!(row.times, 1, "{projection}: event {} applied {} times", row.global, row.times);
    }
    let mut by_aggregate: BTreeMap<&str, Vec<&AuditRow>> = BTreeMap::new();
    for row in rows {
        by_aggregate.entry(&row.aggregate).or_default().push(row);
    }
    for (aggregate, mut rows) in by_aggregate {
        rows.sort_by_key(|r| r.handled_seq);
        let versions: Vec<i64> = rows.iter().map(|r| r.version).collect();
        let expected: Vec<i64> = (1..=rows.len() as i64).collect();
        assert_eq!(versions, expected, "{projection}: {aggregate} handled out of order");
    }
}
