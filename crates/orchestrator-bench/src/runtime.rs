//! Runtime benchmarks on PostgreSQL: single-worker throughput against a plain read+checkpoint loop,
//! time from a join to everyone processing, and append-to-projected latency on an idle worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, CoordinationStore, EventStore};
use orchestrator_core::{Event, ExpectedVersion, ReplicaSetName, SlotCount, StreamId, WorkerId};
use orchestrator_postgres::testing::TestSchema;
use orchestrator_postgres::{PgStore, PgTx};
use orchestrator_runtime::{HandlerError, Orchestrator, Projection, Settings};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use crate::new_event;

/// Counts events; writes nothing. Works on any store's transaction.
pub(crate) struct Noop {
    handled: Arc<AtomicU64>,
    first_at: Arc<std::sync::Mutex<Option<Instant>>>,
    done: std::sync::Mutex<Option<(u64, oneshot::Sender<Instant>)>>,
}

impl Noop {
    /// Reports on `done` when `events` were handled; `first_at` gets the first batch's time.
    pub(crate) fn counting(
        events: u64,
        done: oneshot::Sender<Instant>,
        first_at: Arc<std::sync::Mutex<Option<Instant>>>,
    ) -> Self {
        Self {
            handled: Arc::default(),
            first_at,
            done: std::sync::Mutex::new(Some((events, done))),
        }
    }

    /// How many events it handled so far.
    pub(crate) fn handled(&self) -> Arc<AtomicU64> {
        self.handled.clone()
    }

    /// Handles everything and tells nobody.
    pub(crate) fn idle() -> Self {
        Self {
            handled: Arc::default(),
            first_at: Arc::default(),
            done: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    async fn handle(&self, _tx: &mut Tx, _event: &Event) -> Result<(), BoxError> {
        Ok(())
    }

    async fn handle_batch(&self, _tx: &mut Tx, events: &[Event]) -> Result<(), HandlerError> {
        self.first_at.lock().unwrap().get_or_insert_with(Instant::now);
        let total =
            self.handled.fetch_add(events.len() as u64, Ordering::SeqCst) + events.len() as u64;
        let mut done = self.done.lock().unwrap();
        if done.as_ref().is_some_and(|(target, _)| total >= *target) {
            let (_, sender) = done.take().unwrap();
            let _ = sender.send(Instant::now());
        }
        Ok(())
    }
}

pub(crate) fn settings(worker: &str, batch: usize) -> Result<Settings> {
    let mut settings = Settings::new(ReplicaSetName::new("bench")?);
    settings.worker_id = WorkerId::new(worker)?;
    settings.batch_size = batch;
    Ok(settings)
}

/// Events per second of one worker with a no-op transactional projection, from its first batch
/// to its last (the commit of the last batch is within a batch of the count).
pub(crate) async fn worker_throughput(
    schema: &TestSchema,
    events: u64,
    batch: usize,
) -> Result<f64> {
    let (done_tx, done_rx) = oneshot::channel();
    let first_at = Arc::new(std::sync::Mutex::new(None));
    let projection = Noop::counting(events, done_tx, first_at.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = Orchestrator::new(schema.store.clone(), settings("w1", batch)?)?;
    let running = tokio::spawn(worker.run(
        async move {
            let _ = stop_rx.await;
        },
        vec![Arc::new(projection)],
    ));
    let finished = tokio::time::timeout(Duration::from_secs(600), done_rx)
        .await
        .context("worker too slow")??;
    let started = first_at.lock().unwrap().context("no batch handled")?;
    let _ = stop_tx.send(());
    running.await??;
    Ok(events as f64 / (finished - started).as_secs_f64())
}

/// Resident memory of this process, in KiB (`VmRSS`, read by procfs).
fn rss_kib() -> u64 {
    procfs::process::Process::myself()
        .and_then(|me| me.status())
        .ok()
        .and_then(|status| status.vmrss)
        .unwrap_or(0)
}

/// The process's RSS while one worker processes `events` events (batch 1000): (events handled, KiB)
/// sampled every 100 ms.
pub(crate) async fn worker_rss(schema: &TestSchema, events: u64) -> Result<Vec<(u64, u64)>> {
    let (done_tx, done_rx) = oneshot::channel();
    let projection = Noop::counting(events, done_tx, Arc::default());
    let handled = projection.handled();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = Orchestrator::new(schema.store.clone(), settings("w1", 1000)?)?;
    let running = tokio::spawn(worker.run(
        async move {
            let _ = stop_rx.await;
        },
        vec![Arc::new(projection)],
    ));
    let mut samples = Vec::new();
    let mut done = std::pin::pin!(tokio::time::timeout(Duration::from_secs(900), done_rx));
    loop {
        samples.push((handled.load(Ordering::SeqCst), rss_kib()));
        tokio::select! {
            finished = &mut done => { finished.context("worker too slow")??; break; }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    samples.push((handled.load(Ordering::SeqCst), rss_kib()));
    let _ = stop_tx.send(());
    running.await??;
    Ok(samples)
}

/// The reference: read a batch by keyset and upsert one checkpoint row, one transaction per batch.
pub(crate) async fn plain_read_checkpoint(pool: &PgPool, events: u64, batch: usize) -> Result<f64> {
    sqlx::query("CREATE TABLE IF NOT EXISTS plain_checkpoints (name TEXT PRIMARY KEY, position BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    let mut after = 0i64;
    let mut seen = 0u64;
    let started = Instant::now();
    while seen < events {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&crate::keyset_read_sql("orch_events", false))
            .bind(after)
            .bind(batch as i64)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = rows.last() else { bail!("plain loop stopped at {seen}") };
        after = last.get(0);
        seen += rows.len() as u64;
        sqlx::query(
            "INSERT INTO plain_checkpoints VALUES ('noop', $1) ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(after)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Time from a second worker starting to both owning their slots with every handoff done and
/// the generation acknowledged by both (default settings, change feed on).
pub(crate) async fn join_to_processing(schema: &TestSchema) -> Result<Duration> {
    let rs = ReplicaSetName::new("join-bench")?;
    let mut stops = Vec::new();
    let mut start = |id: &str| -> Result<()> {
        let mut settings = settings(id, 100)?;
        settings.replica_set = rs.clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let store = schema.store.clone();
        let worker = Orchestrator::new(store.clone(), settings)?;
        tokio::spawn(async move {
            let feed = store.change_feed().await.expect("listen");
            let projection: Arc<dyn Projection<PgTx>> = Arc::new(Noop::idle());
            worker
                .with_change_feed(feed)
                .run(
                    async move {
                        let _ = stop_rx.await;
                    },
                    vec![projection],
                )
                .await
        });
        stops.push(stop_tx);
        Ok(())
    };
    start("first")?;
    wait_settled(&schema.store, &rs, 1, Duration::from_secs(30)).await?;
    let joined = Instant::now();
    start("second")?;
    wait_settled(&schema.store, &rs, 2, Duration::from_secs(30)).await?;
    let took = joined.elapsed();
    for stop in stops {
        let _ = stop.send(());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(took)
}

pub(crate) async fn wait_settled(
    store: &PgStore,
    rs: &ReplicaSetName,
    members: usize,
    within: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(snapshot) = store.snapshot(rs).await {
            let settled = snapshot.members.len() == members
                && snapshot.slots.iter().all(|s| s.owner.is_some() && s.next_owner.is_none())
                && snapshot.members.iter().all(|m| {
                    snapshot.worker(m).is_some_and(|w| w.acked_generation >= snapshot.generation)
                });
            if settled {
                return Ok(());
            }
        }
        if started.elapsed() > within {
            bail!("{members} members did not settle within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Append-to-projected latency on an idle worker with the change feed: `samples` single-event
/// appends spaced out, each timed from before the append call to the handler seeing it.
pub(crate) async fn append_to_projected(
    schema: &TestSchema,
    samples: usize,
) -> Result<Vec<Duration>> {
    struct Timer(mpsc::UnboundedSender<Instant>);
    #[async_trait]
    impl Projection<PgTx> for Timer {
        fn name(&self) -> &str {
            "latency"
        }
        async fn handle(&self, _tx: &mut PgTx, _event: &Event) -> Result<(), BoxError> {
            let _ = self.0.send(Instant::now());
            Ok(())
        }
    }
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let mut settings = settings("idle", 100)?;
    settings.replica_set = ReplicaSetName::new("latency-bench")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let feed = schema.store.change_feed().await?;
    let worker = Orchestrator::new(schema.store.clone(), settings)?.with_change_feed(feed);
    let running = tokio::spawn(worker.run(
        async move {
            let _ = stop_rx.await;
        },
        vec![Arc::new(Timer(seen_tx))],
    ));
    // Let it join and catch up with what is already there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    while seen_rx.try_recv().is_ok() {}
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let stream = StreamId::new("bench", "Latency", format!("l-{}", i % 50));
        let sent = Instant::now();
        schema.store.append(&stream, ExpectedVersion::Any, vec![new_event(10_000_000 + i)]).await?;
        let seen = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
            .await?
            .context("worker stopped")?;
        latencies.push(seen - sent);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    running.await??;
    latencies.sort();
    Ok(latencies)
}

/// A fresh schema with `events` events spread round-robin over 1000 aggregates (so every batch
/// touches most slots, as in production), bulk-inserted 10,000 per transaction.
pub(crate) async fn seeded_schema(events: u64) -> Result<TestSchema> {
    let schema = TestSchema::start(SlotCount::DEFAULT)
        .await
        .context("PostgreSQL is required for the benchmarks")?;
    insert_events(&schema, 0, events).await?;
    sqlx::query("VACUUM ANALYZE orch_events").execute(&schema.pool).await?;
    Ok(schema)
}

/// Inserts `events` events numbered from `from`, round-robin over 1000 aggregates, 10,000 per
/// transaction, straight into the events table (the port's append is measured elsewhere).
pub(crate) async fn insert_events(schema: &TestSchema, from: u64, events: u64) -> Result<()> {
    insert_events_into(&schema.pool, SlotCount::DEFAULT, from, events).await
}

/// [`insert_events`] into the `orch_events` table `pool` sees, bucketed into `slots` slots.
pub(crate) async fn insert_events_into(
    pool: &PgPool,
    slots: SlotCount,
    from: u64,
    events: u64,
) -> Result<()> {
    const AGGREGATES: u64 = 1000;
    const CHUNK: u64 = 10_000;
    let slot_numbers: Vec<i32> =
        (0..AGGREGATES).map(|a| slots.slot_of(&format!("acct-{a}")).0 as i32).collect();
    let hashes: Vec<i64> = (0..AGGREGATES)
        .map(|a| i64::from(orchestrator_core::fnv1a_32(format!("acct-{a}").as_bytes())))
        .collect();
    let mut first = from;
    while first < from + events {
        let n = CHUNK.min(from + events - first);
        sqlx::query(
            "INSERT INTO orch_events (bounded_context, aggregate_type, aggregate_id, aggregate_version, slot, \
                 partition_hash, event_id, event_type, event_version, payload, metadata) \
             SELECT 'bench', 'Account', 'acct-' || (i % 1000), i / 1000 + 1, ($3::int[])[i % 1000 + 1], \
                 ($4::bigint[])[i % 1000 + 1], gen_random_uuid(), 'Deposited', 1, \
                 decode(repeat('78', 200), 'hex'), '{}'::jsonb \
             FROM generate_series($1::bigint, $2::bigint) AS i",
        )
        .bind(first as i64)
        .bind((first + n - 1) as i64)
        .bind(&slot_numbers)
        .bind(&hashes)
        .execute(pool)
        .await?;
        first += n;
    }
    Ok(())
}
