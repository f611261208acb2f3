//! The second-round bars of SPEC §5: many projections in one worker (one shared read, rows read
//! per event, the rate of all of them against one alone), the demo's two projections on four
//! worker processes, a slow projection beside nine fast ones, concurrency groups and more workers
//! for an I/O-bound handler, and a per-event upsert handler.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use orchestrator_core::ports::BoxError;
use orchestrator_core::{Event, ReplicaSetName, SlotCount, TablePrefix};
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema};
use orchestrator_postgres::{PgStore, PgTx};
use orchestrator_runtime::{HandlerError, Orchestrator, Projection, Settings};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::oneshot;

use crate::runtime::{insert_events_into, seeded_schema, settings};

/// A no-op projection with a name, counting what it handled; `delay` per batch.
pub(crate) struct Named {
    name: String,
    handled: AtomicU64,
    /// Time of the first batch, and of the batch that reached `target`.
    first: std::sync::Mutex<Option<Instant>>,
    done: std::sync::Mutex<Option<Instant>>,
    target: u64,
    batch_delay: Duration,
    event_delay: Duration,
}

impl Named {
    pub(crate) fn new(name: impl Into<String>, target: u64) -> Arc<Self> {
        Self::slowed(name, target, Duration::ZERO, Duration::ZERO)
    }

    fn slowed(name: impl Into<String>, target: u64, batch: Duration, event: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            handled: AtomicU64::new(0),
            first: std::sync::Mutex::new(None),
            done: std::sync::Mutex::new(None),
            target,
            batch_delay: batch,
            event_delay: event,
        })
    }

    fn handled(&self) -> u64 {
        self.handled.load(Ordering::SeqCst)
    }

    /// Events per second from its first batch to the one that reached the target.
    fn rate(&self) -> Option<f64> {
        let first = (*self.first.lock().unwrap())?;
        let done = (*self.done.lock().unwrap())?;
        Some(self.target as f64 / (done - first).as_secs_f64())
    }

    fn count(&self, n: u64) {
        let total = self.handled.fetch_add(n, Ordering::SeqCst) + n;
        if total >= self.target {
            self.done.lock().unwrap().get_or_insert_with(Instant::now);
        }
    }
}

#[async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Named {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, _tx: &mut Tx, _event: &Event) -> Result<(), BoxError> {
        // The I/O-bound handler: one awaited call per event.
        tokio::time::sleep(self.event_delay).await;
        self.count(1);
        Ok(())
    }

    async fn handle_batch(&self, tx: &mut Tx, events: &[Event]) -> Result<(), HandlerError> {
        self.first.lock().unwrap().get_or_insert_with(Instant::now);
        if !self.batch_delay.is_zero() {
            tokio::time::sleep(self.batch_delay).await;
        }
        if !self.event_delay.is_zero() {
            for (index, event) in events.iter().enumerate() {
                self.handle(tx, event).await.map_err(|e| HandlerError::at(index, e))?;
            }
            return Ok(());
        }
        self.count(events.len() as u64);
        Ok(())
    }
}

/// A store on `schema` with a pool of `size` connections (the test schema's own pool has 8).
pub(crate) async fn store_with_pool(schema: &TestSchema, size: u32) -> Result<PgStore> {
    let url = std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
    let options: PgConnectOptions = url.parse()?;
    let pool = PgStore::pool_options(size)
        .connect_with(PgStore::tune(options).options([("search_path", schema.schema.as_str())]))
        .await?;
    Ok(PgStore::open(pool, TablePrefix::default()).await?)
}

/// `seq_tup_read + idx_tup_fetch` of the events table in `schema`.
pub(crate) async fn rows_read(pool: &PgPool, schema: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint \
         FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'orch_events'",
    )
    .bind(schema)
    .fetch_one(pool)
    .await?)
}

struct Worker {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), orchestrator_runtime::RunError>>,
}

fn start(
    store: PgStore,
    settings: Settings,
    projections: Vec<Arc<dyn Projection<PgTx>>>,
) -> Result<Worker> {
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = Orchestrator::new(store, settings)?;
    let task = tokio::spawn(worker.run(
        async move {
            let _ = stopped.await;
        },
        projections,
    ));
    Ok(Worker { stop, task })
}

impl Worker {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

async fn wait_for(what: &str, within: Duration, check: impl Fn() -> bool) -> Result<()> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// One worker, `count` no-op transactional projections, `events` events already stored, batch
/// 1000, heartbeat every second: (events/s at which all of them committed everything, rows read
/// from the events table per event, lag measurement included).
pub(crate) async fn many_projections(events: u64, count: usize) -> Result<(f64, f64)> {
    let schema = seeded_schema(events).await?;
    let mut settings = settings("w1", 1000)?;
    settings.timing.heartbeat_interval = Duration::from_secs(1);
    let store = store_with_pool(&schema, settings.pool_size(count, false)).await?;
    let projections: Vec<Arc<Named>> =
        (0..count).map(|i| Named::new(format!("noop_{i}"), events)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await; // statistics of the seeding flushed
    let before = rows_read(&schema.pool, &schema.schema).await?;
    let worker =
        start(store, settings, projections.iter().map(|p| p.clone() as _).collect::<Vec<_>>())?;
    wait_for("every projection done", Duration::from_secs(1800), || {
        projections.iter().all(|p| p.handled() >= events)
    })
    .await?;
    let first =
        projections.iter().filter_map(|p| *p.first.lock().unwrap()).min().context("no batch")?;
    let done =
        projections.iter().filter_map(|p| *p.done.lock().unwrap()).max().context("not done")?;
    worker.stop().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows_read(&schema.pool, &schema.schema).await?;
    schema.drop_schema().await;
    Ok((events as f64 / (done - first).as_secs_f64(), (after - before) as f64 / events as f64))
}

/// Ten projections at batch 100, one of them 50 ms per batch, against the nine alone: the events
/// per second of the slowest of the nine fast ones.
pub(crate) async fn isolation(events: u64, with_slow: bool) -> Result<f64> {
    let schema = seeded_schema(events).await?;
    let settings = settings("w1", 100)?;
    let fast: Vec<Arc<Named>> = (0..9).map(|i| Named::new(format!("fast_{i}"), events)).collect();
    let mut projections: Vec<Arc<dyn Projection<PgTx>>> =
        fast.iter().map(|p| p.clone() as _).collect();
    if with_slow {
        projections.push(Named::slowed("slow", events, Duration::from_millis(50), Duration::ZERO));
    }
    let store = store_with_pool(&schema, settings.pool_size(projections.len(), false)).await?;
    let worker = start(store, settings, projections)?;
    wait_for("the nine fast projections done", Duration::from_secs(1800), || {
        fast.iter().all(|p| p.handled() >= events)
    })
    .await?;
    let rate = fast.iter().filter_map(|p| p.rate()).fold(f64::INFINITY, f64::min);
    worker.stop().await?;
    schema.drop_schema().await;
    Ok(rate)
}

/// Steady-state events/s of `workers` workers (each `PROCESSING_CONCURRENCY=concurrency`) running
/// a handler that awaits 1 ms per event, batch 100: counted over `window` after `warm_up`.
pub(crate) async fn io_bound(
    events: u64,
    workers: usize,
    concurrency: usize,
    warm_up: Duration,
    window: Duration,
) -> Result<f64> {
    let schema = seeded_schema(events).await?;
    let projection = Named::slowed("io_bound", u64::MAX, Duration::ZERO, Duration::from_millis(1));
    let mut running = Vec::new();
    for i in 0..workers {
        let mut settings = settings(&format!("w{i}"), 100)?;
        settings.replica_set = ReplicaSetName::new("io-bench")?;
        settings.processing_concurrency = concurrency;
        let store = store_with_pool(&schema, settings.pool_size(1, false)).await?;
        running.push(start(store, settings, vec![projection.clone() as _])?);
    }
    if workers > 1 {
        crate::runtime::wait_settled(
            &schema.store,
            &ReplicaSetName::new("io-bench")?,
            workers,
            Duration::from_secs(60),
        )
        .await?;
    }
    tokio::time::sleep(warm_up).await;
    let from = projection.handled();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let handled = projection.handled() - from;
    let elapsed = started.elapsed();
    if projection.handled() >= events {
        bail!("the backlog ran out during the measurement: use more events");
    }
    for worker in running {
        worker.stop().await?;
    }
    schema.drop_schema().await;
    Ok(handled as f64 / elapsed.as_secs_f64())
}

/// The `orchestrator` binary next to this one (`cargo xtask bench` builds both).
fn orchestrator_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("orchestrator");
    if !path.exists() {
        bail!(
            "{} not found: build it with cargo build --release -p orchestrator-cli",
            path.display()
        );
    }
    Ok(path)
}

/// Four `orchestrator demo worker` processes (the demo's two projections) on a database holding
/// `events` events, batch 1000, heartbeat every second, from scratch until both projections
/// recorded every event: rows read from the events table per event.
pub(crate) async fn demo_workers_rows(events: u64, workers: usize) -> Result<f64> {
    let binary = orchestrator_binary()?;
    let base = std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
    let database = "orch_bench_demo";
    let (server, _) = base.rsplit_once('/').context("a database URL ending in /DATABASE")?;
    let url = format!("{server}/{database}");
    let admin = PgPoolOptions::new().max_connections(1).connect(&base).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
    let migrated =
        std::process::Command::new(&binary).args(["--database-url", &url, "migrate"]).output()?;
    if !migrated.status.success() {
        bail!("migrate failed: {}", String::from_utf8_lossy(&migrated.stderr));
    }
    let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
    insert_events_into(&pool, SlotCount::DEFAULT, 0, events).await?;
    sqlx::query("VACUUM ANALYZE orch_events").execute(&pool).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rows_read(&pool, "public").await?;
    let mut children = Vec::new();
    for i in 0..workers {
        children.push(
            std::process::Command::new(&binary)
                .args([
                    "--database-url",
                    &url,
                    "demo",
                    "worker",
                    "--worker-id",
                    &format!("bench-{i}"),
                ])
                .env("HEARTBEAT_INTERVAL", "1s")
                .env("BATCH_SIZE", "1000")
                .env("RUST_LOG", "warn")
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let started = Instant::now();
    loop {
        let recorded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM demo_audit").fetch_one(&pool).await?;
        if recorded as u64 >= 2 * events {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("demo workers too slow: {recorded} of {}", 2 * events);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "    {workers} demo workers recorded {} events in {:.1?}",
        2 * events,
        started.elapsed()
    );
    for child in &children {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    for mut child in children {
        let _ = child.wait();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows_read(&pool, "public").await?;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    Ok((after - before) as f64 / events as f64)
}

/// A projection upserting one read-model row per event through `handle` (one statement per
/// event, as most projections are written), against the UNNEST reference of `upsert.rs`.
pub(crate) struct PerEventLedger {
    handled: AtomicU64,
    target: u64,
    first: std::sync::Mutex<Option<Instant>>,
    done: std::sync::Mutex<Option<Instant>>,
}

#[async_trait]
impl Projection<PgTx> for PerEventLedger {
    fn name(&self) -> &str {
        "ledger_per_event"
    }

    async fn handle(&self, tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        self.first.lock().unwrap().get_or_insert_with(Instant::now);
        sqlx::query(
            "INSERT INTO bench_ledger (global_position, aggregate_id, aggregate_version, event_type) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (global_position) DO UPDATE SET aggregate_version = excluded.aggregate_version",
        )
        .bind(event.position.global as i64)
        .bind(&event.stream.aggregate_id)
        .bind(event.aggregate_version as i64)
        .bind(&event.event_type)
        .execute(&mut **tx)
        .await?;
        if self.handled.fetch_add(1, Ordering::SeqCst) + 1 >= self.target {
            self.done.lock().unwrap().get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}

/// Events/s of one worker running [`PerEventLedger`] at `batch`.
pub(crate) async fn per_event_upsert(
    schema: &TestSchema,
    events: u64,
    batch: usize,
) -> Result<f64> {
    crate::upsert::create_read_model(&schema.pool, "bench_ledger").await?;
    let ledger = Arc::new(PerEventLedger {
        handled: AtomicU64::new(0),
        target: events,
        first: std::sync::Mutex::new(None),
        done: std::sync::Mutex::new(None),
    });
    let worker = start(schema.store.clone(), settings("w1", batch)?, vec![ledger.clone() as _])?;
    wait_for("the per-event ledger", Duration::from_secs(3600), || {
        ledger.done.lock().unwrap().is_some()
    })
    .await?;
    let first = ledger.first.lock().unwrap().context("no batch")?;
    let done = ledger.done.lock().unwrap().context("not done")?;
    worker.stop().await?;
    Ok(events as f64 / (done - first).as_secs_f64())
}
