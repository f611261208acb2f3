//! `orchestrator-bench diesel`: the upsert projection of the `upsert` suite (one read-model row
//! per event through the batch handler, batch 1000) written with diesel-async on a `DieselStore`,
//! against the same plain sqlx UNNEST loop, with the sqlx projection measured in the same run.
//!
//! Two diesel handlers, as a team would write them:
//! - `insert_into(..).values(&rows).on_conflict(..).do_update()`: diesel's query builder, one
//!   multi-row `VALUES` statement per batch (4 bind parameters per event);
//! - `sql_query` with the `UNNEST` statement of the reference and four array parameters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use orchestrator_core::Event;
use orchestrator_core::ports::BoxError;
use orchestrator_diesel::{DieselStore, DieselTx};
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema};
use orchestrator_runtime::{HandlerError, Orchestrator, Projection};
use tokio::sync::oneshot;

use crate::{Args, median, runtime, upsert};

diesel::table! {
    diesel_ledger (global_position) {
        global_position -> BigInt,
        aggregate_id -> Text,
        aggregate_version -> BigInt,
        event_type -> Text,
    }
}

#[derive(Insertable)]
#[diesel(table_name = diesel_ledger)]
struct LedgerRow<'a> {
    global_position: i64,
    aggregate_id: &'a str,
    aggregate_version: i64,
    event_type: &'a str,
}

const UNNEST: &str = "INSERT INTO diesel_ledger (global_position, aggregate_id, aggregate_version, event_type) \
     SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[]) \
     ON CONFLICT (global_position) DO UPDATE SET aggregate_version = excluded.aggregate_version";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    QueryBuilder,
    SqlQueryUnnest,
}

struct DieselLedger {
    handler: Handler,
    handled: AtomicU64,
    target: u64,
    first_at: std::sync::Mutex<Option<Instant>>,
    done: std::sync::Mutex<Option<oneshot::Sender<Instant>>>,
}

#[async_trait]
impl Projection<DieselTx> for DieselLedger {
    fn name(&self) -> &str {
        match self.handler {
            Handler::QueryBuilder => "diesel_ledger_dsl",
            Handler::SqlQueryUnnest => "diesel_ledger_unnest",
        }
    }

    async fn handle(&self, tx: &mut DieselTx, event: &Event) -> Result<(), BoxError> {
        self.handle_batch(tx, std::slice::from_ref(event)).await.map_err(|e| e.source)
    }

    async fn handle_batch(&self, tx: &mut DieselTx, events: &[Event]) -> Result<(), HandlerError> {
        self.first_at.lock().unwrap().get_or_insert_with(Instant::now);
        let written = match self.handler {
            Handler::QueryBuilder => {
                let rows: Vec<LedgerRow<'_>> = events
                    .iter()
                    .map(|e| LedgerRow {
                        global_position: e.position.global as i64,
                        aggregate_id: &e.stream.aggregate_id,
                        aggregate_version: e.aggregate_version as i64,
                        event_type: &e.event_type,
                    })
                    .collect();
                diesel::insert_into(diesel_ledger::table)
                    .values(&rows)
                    .on_conflict(diesel_ledger::global_position)
                    .do_update()
                    .set(
                        diesel_ledger::aggregate_version
                            .eq(excluded(diesel_ledger::aggregate_version)),
                    )
                    .execute(&mut **tx)
                    .await
            }
            Handler::SqlQueryUnnest => {
                let positions: Vec<i64> = events.iter().map(|e| e.position.global as i64).collect();
                let aggregates: Vec<&str> =
                    events.iter().map(|e| e.stream.aggregate_id.as_str()).collect();
                let versions: Vec<i64> =
                    events.iter().map(|e| e.aggregate_version as i64).collect();
                let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
                diesel::sql_query(UNNEST)
                    .bind::<Array<BigInt>, _>(&positions)
                    .bind::<Array<Text>, _>(&aggregates)
                    .bind::<Array<BigInt>, _>(&versions)
                    .bind::<Array<Text>, _>(&types)
                    .execute(&mut **tx)
                    .await
            }
        };
        written.map_err(|e| HandlerError { index: None, source: Box::new(e) })?;
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

/// A diesel store on the benchmark's schema.
async fn diesel_store(schema: &TestSchema) -> Result<DieselStore> {
    let url =
        std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned());
    let pool =
        DieselStore::connect_pool_with(&url, 4, &[("search_path", schema.schema.as_str())]).await?;
    Ok(DieselStore::open(schema.store.clone(), pool).await?)
}

/// Events per second of one worker on the diesel store running the diesel ledger, batch 1000,
/// from its first batch to the batch that completes the count.
async fn throughput(store: &DieselStore, handler: Handler, events: u64) -> Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS diesel_ledger (global_position BIGINT PRIMARY KEY, \
             aggregate_id TEXT NOT NULL, aggregate_version BIGINT NOT NULL, event_type TEXT NOT NULL)",
    )
    .execute(store.pg().pool())
    .await?;
    sqlx::query("TRUNCATE diesel_ledger").execute(store.pg().pool()).await?;
    let (done_tx, done_rx) = oneshot::channel();
    let ledger = Arc::new(DieselLedger {
        handler,
        handled: AtomicU64::new(0),
        target: events,
        first_at: std::sync::Mutex::new(None),
        done: std::sync::Mutex::new(Some(done_tx)),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = Orchestrator::new(store.clone(), runtime::settings("w1", 1000)?)?;
    let projection: Arc<dyn Projection<DieselTx>> = ledger.clone();
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

/// The suite: per run, a seeded schema, the two diesel handlers, the sqlx handler and the
/// reference, in an order that rotates from run to run.
pub(crate) async fn suite(args: &Args) -> Result<()> {
    let mut runs: Vec<[f64; 4]> = Vec::new();
    for run in 1..=args.runs {
        eprintln!("diesel upsert projection: run {run}/{}", args.runs);
        let events = args.events as u64;
        let schema = runtime::seeded_schema(events).await?;
        let store = diesel_store(&schema).await?;
        // Each run starts with another of the four, so none always gets the freshest table.
        let mut rates = [0.0; 4];
        for k in 0..4 {
            let i = (k + run as usize - 1) % 4;
            rates[i] = match i {
                0 => throughput(&store, Handler::QueryBuilder, events).await?,
                1 => throughput(&store, Handler::SqlQueryUnnest, events).await?,
                2 => upsert::projection_throughput(&schema, events).await?,
                _ => upsert::plain_upsert_loop(&schema.pool, events).await?,
            };
        }
        runs.push(rates);
        drop(store);
        schema.drop_schema().await;
    }
    let column = |i: usize| median(&runs.iter().map(|r| r[i]).collect::<Vec<_>>());
    let reference = column(3);
    for (i, what) in [
        "diesel-async, insert_into(..).values(&rows).on_conflict(..) per batch",
        "diesel-async, sql_query with the UNNEST statement per batch",
        "sqlx (PgTx), the UNNEST statement per batch, for comparison",
    ]
    .iter()
    .enumerate()
    {
        // The ratio is taken within each run (same load, same table sizes), then the median.
        let ratios: Vec<f64> = runs.iter().map(|r| r[i] / r[3]).collect();
        println!(
            "| single worker, upsert projection through handle_batch, batch 1000: {what} | {:.0} events/s | plain read+UNNEST upsert+checkpoint {reference:.0} events/s | {:.2}x of reference (median of the runs' ratios {:?}) |",
            column(i),
            median(&ratios),
            ratios.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>()
        );
    }
    Ok(())
}
