//! A transactional projection that upserts one read-model row per event through the batch handler
//! (one multi-row `UNNEST` statement per batch), against the plain loop doing the same upsert and
//! the checkpoint in one transaction per batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use orchestrator_core::Event;
use orchestrator_core::ports::BoxError;
use orchestrator_postgres::PgTx;
use orchestrator_postgres::testing::TestSchema;
use orchestrator_runtime::{HandlerError, Orchestrator, Projection};
use sqlx::{PgPool, Row};
use tokio::sync::oneshot;

use crate::runtime::settings;

const UPSERT: &str = "INSERT INTO bench_ledger (global_position, aggregate_id, aggregate_version, event_type) \
     SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[]) \
     ON CONFLICT (global_position) DO UPDATE SET aggregate_version = excluded.aggregate_version";

pub(crate) async fn create_read_model(pool: &PgPool, table: &str) -> Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (global_position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL, \
             aggregate_version BIGINT NOT NULL, event_type TEXT NOT NULL)"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

struct Ledger {
    handled: AtomicU64,
    target: u64,
    first_at: std::sync::Mutex<Option<Instant>>,
    done: std::sync::Mutex<Option<oneshot::Sender<Instant>>>,
}

#[async_trait]
impl Projection<PgTx> for Ledger {
    fn name(&self) -> &str {
        "ledger"
    }

    async fn handle(&self, tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        self.handle_batch(tx, std::slice::from_ref(event)).await.map_err(|e| e.source)
    }

    async fn handle_batch(&self, tx: &mut PgTx, events: &[Event]) -> Result<(), HandlerError> {
        self.first_at.lock().unwrap().get_or_insert_with(Instant::now);
        let positions: Vec<i64> = events.iter().map(|e| e.position.global as i64).collect();
        let aggregates: Vec<&str> = events.iter().map(|e| e.stream.aggregate_id.as_str()).collect();
        let versions: Vec<i64> = events.iter().map(|e| e.aggregate_version as i64).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        sqlx::query(UPSERT)
            .bind(&positions)
            .bind(&aggregates)
            .bind(&versions)
            .bind(&types)
            .execute(&mut **tx)
            .await
            .map_err(|e| HandlerError { index: None, source: Box::new(e) })?;
        let total =
            self.handled.fetch_add(events.len() as u64, Ordering::SeqCst) + events.len() as u64;
        if total >= self.target
            && let Some(done) = self.done.lock().unwrap().take()
        {
            let _ = done.send(Instant::now());
        }
        Ok(())
    }
}

/// Events per second of one worker running the ledger projection, batch 1000.
pub(crate) async fn projection_throughput(schema: &TestSchema, events: u64) -> Result<f64> {
    create_read_model(&schema.pool, "bench_ledger").await?;
    let (done_tx, done_rx) = oneshot::channel();
    let ledger = Arc::new(Ledger {
        handled: AtomicU64::new(0),
        target: events,
        first_at: std::sync::Mutex::new(None),
        done: std::sync::Mutex::new(Some(done_tx)),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = Orchestrator::new(schema.store.clone(), settings("w1", 1000)?)?;
    let projection: Arc<dyn Projection<PgTx>> = ledger.clone();
    let running = tokio::spawn(worker.run(
        async move {
            let _ = stop_rx.await;
        },
        vec![projection],
    ));
    let finished =
        tokio::time::timeout(Duration::from_secs(900), done_rx).await.context("too slow")??;
    let started = ledger.first_at.lock().unwrap().context("no batch")?;
    let _ = stop_tx.send(());
    running.await??;
    Ok(events as f64 / (finished - started).as_secs_f64())
}

/// The reference: read 1000 events by keyset, upsert their rows with the same statement, upsert
/// the checkpoint, commit.
pub(crate) async fn plain_upsert_loop(pool: &PgPool, events: u64) -> Result<f64> {
    plain_upsert_loop_batch(pool, events, 1000).await
}

/// [`plain_upsert_loop`] with batches of `batch`.
pub(crate) async fn plain_upsert_loop_batch(pool: &PgPool, events: u64, batch: i64) -> Result<f64> {
    create_read_model(pool, "plain_ledger").await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS plain_checkpoints (name TEXT PRIMARY KEY, position BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    let upsert = UPSERT.replace("bench_ledger", "plain_ledger");
    let mut after = 0i64;
    let mut seen = 0u64;
    let started = Instant::now();
    while seen < events {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&crate::keyset_read_sql("orch_events", false))
            .bind(after)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = rows.last() else { bail!("plain loop stopped at {seen}") };
        after = last.get(0);
        seen += rows.len() as u64;
        let positions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let aggregates: Vec<String> = rows.iter().map(|r| r.get(3)).collect();
        let versions: Vec<i64> = rows.iter().map(|r| r.get(4)).collect();
        let types: Vec<String> = rows.iter().map(|r| r.get(7)).collect();
        sqlx::query(&upsert)
            .bind(&positions)
            .bind(&aggregates)
            .bind(&versions)
            .bind(&types)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO plain_checkpoints VALUES ('ledger', $1) ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(after)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}
