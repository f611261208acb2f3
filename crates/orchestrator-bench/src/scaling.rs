//! What scaling costs: rows the database scans per event processed with 1, 2 and 4 workers, and how
//! long slots stop processing while a worker joins, for slots that move and slots that stay.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, CoordinationStore, EventStore};
use orchestrator_core::{Event, ExpectedVersion, ReplicaSetName, SlotCount, Strategy, StreamId};
use orchestrator_postgres::PgTx;
use orchestrator_postgres::testing::TestSchema;
use orchestrator_runtime::{HandlerError, Orchestrator, Projection};
use tokio::sync::oneshot;

use crate::new_event;
use crate::runtime::{Noop, insert_events, settings, wait_settled};

/// `seq_tup_read + idx_tup_fetch` of the events table: rows the server read from it.
async fn rows_read(schema: &TestSchema) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint \
         FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'orch_events'",
    )
    .bind(&schema.schema)
    .fetch_one(&schema.pool)
    .await?)
}

/// Starts `workers` workers sharing one projection; returns their stop handles.
fn start_workers(
    schema: &TestSchema,
    replica_set: &str,
    workers: usize,
    slots: SlotCount,
    strategy: Strategy,
    shared: Arc<dyn Projection<PgTx>>,
) -> Result<Vec<oneshot::Sender<()>>> {
    let mut stops = Vec::new();
    for i in 0..workers {
        let mut settings = settings(&format!("w{i}"), 1000)?;
        settings.replica_set = ReplicaSetName::new(replica_set)?;
        settings.slots = slots;
        settings.strategy = strategy;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let store = schema.store.clone();
        let worker = Orchestrator::new(store.clone(), settings)?;
        let projections = vec![shared.clone()];
        tokio::spawn(async move {
            let feed = store.change_feed().await.expect("listen");
            worker
                .with_change_feed(feed)
                .run(
                    async move {
                        let _ = stop_rx.await;
                    },
                    projections,
                )
                .await
        });
        stops.push(stop_tx);
    }
    Ok(stops)
}

/// Waits until `handled` reaches `target`.
async fn wait_handled(handled: &AtomicU64, target: u64) -> Result<()> {
    let started = Instant::now();
    while handled.load(Ordering::SeqCst) < target {
        if started.elapsed() > Duration::from_secs(900) {
            anyhow::bail!("workers too slow: {} of {target}", handled.load(Ordering::SeqCst));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Rows read from the events table per event processed, with `workers` workers that joined
/// before `events` events arrive (inserted in bulk while they run).
///
/// A warm-up of 10,000 events is processed and the table analyzed first, so every worker count is
/// measured in the same steady state (before the one-range read was planned per call, a worker
/// started on an empty table read 5.5-8 rows per event until the table was analyzed).
pub(crate) async fn rows_scanned_per_event(workers: usize, events: u64) -> Result<f64> {
    const WARM_UP: u64 = 10_000;
    let schema = TestSchema::start(SlotCount::DEFAULT).await.context("PostgreSQL is required")?;
    let rs = ReplicaSetName::new("scan")?;
    let noop = Noop::idle();
    let handled = noop.handled();
    let stops = start_workers(
        &schema,
        "scan",
        workers,
        SlotCount::DEFAULT,
        Strategy::default(),
        Arc::new(noop),
    )?;
    wait_settled(&schema.store, &rs, workers, Duration::from_secs(60)).await?;
    insert_events(&schema, 0, WARM_UP).await?;
    sqlx::query("ANALYZE orch_events").execute(&schema.pool).await?;
    wait_handled(&handled, WARM_UP).await?;
    // Statistics reach the shared counters within a second of a backend's transaction.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rows_read(&schema).await?;
    insert_events(&schema, WARM_UP, events).await?;
    wait_handled(&handled, WARM_UP + events).await?;
    for stop in stops {
        let _ = stop.send(());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows_read(&schema).await?;
    schema.drop_schema().await;
    Ok((after - before) as f64 / events as f64)
}

/// Records when each slot's events were handled.
struct Stamps(Mutex<BTreeMap<u32, Vec<Instant>>>);

#[async_trait]
impl Projection<PgTx> for Stamps {
    fn name(&self) -> &str {
        "stamps"
    }
    async fn handle(&self, _tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        self.0.lock().unwrap().entry(event.slot.0).or_default().push(Instant::now());
        Ok(())
    }
    async fn handle_batch(&self, _tx: &mut PgTx, events: &[Event]) -> Result<(), HandlerError> {
        let now = Instant::now();
        let mut stamps = self.0.lock().unwrap();
        for event in events {
            stamps.entry(event.slot.0).or_default().push(now);
        }
        Ok(())
    }
}

/// Longest stretch without processing, per group of slots, around a join.
#[derive(Debug)]
pub(crate) struct Pauses {
    /// Longest gap between two handlings of one slot while one worker ran alone (the baseline).
    pub(crate) steady: Duration,
    /// Longest gap of a slot that stayed with the first worker, from the join on.
    pub(crate) unmoved: Duration,
    /// Longest gap of a slot that moved to the joiner, from the join on.
    pub(crate) moved: Duration,
}

/// One aggregate id per slot, so a round of appends gives every slot one event.
fn aggregate_per_slot(slots: SlotCount) -> Vec<String> {
    let mut found: BTreeMap<u32, String> = BTreeMap::new();
    for n in 0.. {
        let id = format!("acct-{n}");
        found.entry(slots.slot_of(&id).0).or_insert(id);
        if found.len() == slots.get() as usize {
            break;
        }
    }
    found.into_values().collect()
}

/// One worker processes a steady stream of appends (every 20 ms one event for each of 16 slots);
/// a second joins.
pub(crate) async fn pauses_on_join(strategy: Strategy) -> Result<Pauses> {
    let slots = SlotCount::new(16)?;
    let schema = TestSchema::start(slots).await.context("PostgreSQL is required")?;
    let rs = ReplicaSetName::new("pauses")?;
    let stamps = Arc::new(Stamps(Mutex::new(BTreeMap::new())));
    let appending = {
        let store = schema.store.clone();
        let aggregates = aggregate_per_slot(slots);
        tokio::spawn(async move {
            let mut n = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                for aggregate in &aggregates {
                    let stream = StreamId::new("bench", "Account", aggregate.clone());
                    n += 1;
                    if store
                        .append(&stream, ExpectedVersion::Any, vec![new_event(n)])
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })
    };
    let first = start_workers(&schema, "pauses", 1, slots, strategy, stamps.clone())?;
    wait_settled(&schema.store, &rs, 1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let joined = Instant::now();
    let mut second_settings = settings("w-joiner", 1000)?;
    second_settings.replica_set = rs.clone();
    second_settings.slots = slots;
    second_settings.strategy = strategy;
    let (stop_second, stopped) = oneshot::channel::<()>();
    let store = schema.store.clone();
    let joiner = Orchestrator::new(store.clone(), second_settings)?;
    let projections: Vec<Arc<dyn Projection<PgTx>>> = vec![stamps.clone()];
    tokio::spawn(async move {
        let feed = store.change_feed().await.expect("listen");
        joiner
            .with_change_feed(feed)
            .run(
                async move {
                    let _ = stopped.await;
                },
                projections,
            )
            .await
    });
    wait_settled(&schema.store, &rs, 2, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = Instant::now();
    let snapshot = schema.store.snapshot(&rs).await?;
    appending.abort();
    for stop in first {
        let _ = stop.send(());
    }
    let _ = stop_second.send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    schema.drop_schema().await;

    let stamps = stamps.0.lock().unwrap();
    let longest_gap = |slot: u32, from: Instant, to: Instant| -> Duration {
        let times: Vec<Instant> = stamps
            .get(&slot)
            .map(|t| t.iter().copied().filter(|t| *t >= from && *t <= to).collect())
            .unwrap_or_default();
        let mut edges = vec![from];
        edges.extend(times);
        edges.push(to);
        edges.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    };
    let mut pauses =
        Pauses { steady: Duration::ZERO, unmoved: Duration::ZERO, moved: Duration::ZERO };
    for slot in slots.all() {
        pauses.steady = pauses.steady.max(longest_gap(slot.0, steady_from, joined));
        let gap = longest_gap(slot.0, joined, ended);
        let stayed = snapshot.slot(slot).owner.as_ref().is_some_and(|o| o.as_str() == "w0");
        if stayed {
            pauses.unmoved = pauses.unmoved.max(gap);
        } else {
            pauses.moved = pauses.moved.max(gap);
        }
    }
    Ok(pauses)
}
