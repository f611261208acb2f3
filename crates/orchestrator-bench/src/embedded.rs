//! Single-worker throughput on the embedded stores: in memory (bar: 1M events/s) and SQLite,
//! the latter against a plain sqlx read+checkpoint loop on the same file in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrator_core::ports::EventStore;
use orchestrator_core::{ExpectedVersion, NewEvent, SlotCount, StreamId};
use orchestrator_memory::MemoryStore;
use orchestrator_runtime::{Orchestrator, Projection, SystemClock};
use orchestrator_sqlite::SqliteStore;
use sqlx::{Row, SqlitePool};
use tokio::sync::oneshot;

use crate::new_event;
use crate::runtime::{Noop, settings};

/// Appends `events` in 1000-event batches over 1000 aggregates' streams.
async fn fill(store: &impl EventStore, events: usize) -> Result<()> {
    let per_batch = 1000;
    for batch in 0..events / per_batch {
        let stream = StreamId::new("bench", "Account", format!("acct-{}", batch % 1000));
        let batch_events: Vec<NewEvent> =
            (0..per_batch).map(|i| new_event(batch * per_batch + i)).collect();
        store.append(&stream, ExpectedVersion::Any, batch_events).await?;
    }
    Ok(())
}

/// Runs one worker with a no-op projection over a store already holding `events` events.
async fn drain<S>(store: S, events: u64, batch: usize) -> Result<f64>
where
    S: orchestrator_runtime::Store,
    Noop: Projection<<S as orchestrator_core::ports::CheckpointStore>::Tx>,
{
    let (done_tx, done_rx) = oneshot::channel();
    let first_at = Arc::new(std::sync::Mutex::new(None));
    let projection = Noop::counting(events, done_tx, first_at.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = Orchestrator::new(store, settings("w1", batch)?)?;
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

/// One worker over the in-memory store.
pub(crate) async fn memory_throughput(events: usize, batch: usize) -> Result<f64> {
    let store = MemoryStore::new(SlotCount::DEFAULT, Arc::new(SystemClock::new()));
    fill(&store, events).await?;
    drain(store, events as u64, batch).await
}

/// One worker over a SQLite file, and the plain loop over the same file.
pub(crate) async fn sqlite_throughput(events: usize, batch: usize) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("orch-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite:{}", dir.join("bench.db").display());
    let pool = SqliteStore::connect_pool(&url, 4).await?;
    let prefix = orchestrator_core::TablePrefix::default();
    orchestrator_sqlite::migrate(&pool, &prefix, SlotCount::DEFAULT).await?;
    let store = SqliteStore::open(pool.clone(), prefix).await?;
    fill(&store, events).await?;
    let ours = drain(store, events as u64, batch).await?;
    let reference = plain_sqlite(&pool, events as u64, batch).await?;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((ours, reference))
}

/// The reference: read a batch by keyset and upsert one checkpoint row per transaction.
async fn plain_sqlite(pool: &SqlitePool, events: u64, batch: usize) -> Result<f64> {
    sqlx::query("CREATE TABLE IF NOT EXISTS plain_checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    let mut after = 0i64;
    let mut seen = 0u64;
    let started = Instant::now();
    while seen < events {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&crate::keyset_read_sql("orch_events", true))
            .bind(after)
            .bind(batch as i64)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = rows.last() else { bail!("plain loop stopped at {seen}") };
        after = last.get(0);
        seen += rows.len() as u64;
        sqlx::query(
            "INSERT INTO plain_checkpoints VALUES ('noop', ?) ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(after)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}
