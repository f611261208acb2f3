//! `cargo xtask bench`: each measurement next to a reference done with plain sqlx in the same run,
//! on the same server, so the ratio is meaningful whatever the machine.
//!
//! Usage: `orchestrator-bench [SUITE] [--events N] [--runs R]`, SUITE one of `store`, `runtime`,
//! `embedded`, `upsert`, `scaling`, `horizon`, `diesel`, `processing`, `projections` (the first part
//! of `processing` alone) or `all` (defaults: 1,000,000 events, 3 runs, median reported).
//! PostgreSQL from `ORCH_TEST_POSTGRES_URL` or the local default.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use orchestrator_core::ports::{EventStore, ReadRequest};
use orchestrator_core::{
    EventId, ExpectedVersion, NewEvent, Position, Scope, SlotCount, StreamId, Tracing,
};
use orchestrator_postgres::PgStore;
use orchestrator_postgres::testing::TestSchema;
use sqlx::{PgPool, Row};

const BATCH: usize = 1000;
const PAYLOAD: usize = 200;

mod diesel_upsert;
mod embedded;
mod horizon;
mod processing;
mod runtime;
mod scaling;
mod upsert;

/// Each measurement next to a plain sqlx reference from the same run.
#[derive(Debug, Parser)]
#[command(name = "orchestrator-bench")]
struct Args {
    /// Which suite to run.
    #[arg(default_value = "all", value_parser = SUITES)]
    suite: String,
    /// Events per measurement (at least one batch of 1000).
    #[arg(long, default_value_t = 1_000_000, value_parser = at_least_a_batch)]
    events: usize,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    runs: u16,
}

fn at_least_a_batch(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(events) if events >= BATCH => Ok(events),
        Ok(_) => Err(format!("must be at least {BATCH}")),
        Err(err) => Err(format!("{err}")),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "machine: {} cores; events: {}; runs: {} (median)",
        std::thread::available_parallelism()?,
        args.events,
        args.runs
    );
    let run = |suite: &str| args.suite == "all" || args.suite == suite;
    if run("store") {
        store_suite(&args).await?;
    }
    if run("runtime") {
        runtime_suite(&args).await?;
    }
    if run("embedded") {
        embedded_suite(&args).await?;
    }
    if run("upsert") {
        upsert_suite(&args).await?;
    }
    if run("scaling") {
        scaling_suite(&args).await?;
    }
    if run("diesel") {
        diesel_upsert::suite(&args).await?;
    }
    if run("horizon") {
        horizon_suite(&args).await?;
    }
    if args.suite == "projections" {
        projections_suite(&args).await?;
    }
    if run("processing") {
        processing_suite(&args).await?;
    }
    Ok(())
}

const SUITES: [&str; 10] = [
    "store",
    "runtime",
    "embedded",
    "upsert",
    "scaling",
    "horizon",
    "diesel",
    "processing",
    "projections",
    "all",
];

/// Ten projections in one worker against one alone: rows read per event and the rate at which
/// all of them commit.
async fn projections_suite(args: &Args) -> Result<()> {
    let events = args.events as u64;
    let runs = args.runs;

    let (mut ten, mut one, mut ten_rows, mut one_rows) = (vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        eprintln!("10 projections against 1, {events} events: run {run}/{runs}");
        let (rate, rows) = processing::many_projections(events, 10).await?;
        ten.push(rate);
        ten_rows.push(rows);
        let (rate, rows) = processing::many_projections(events, 1).await?;
        one.push(rate);
        one_rows.push(rows);
    }
    println!(
        "| one worker, 10 no-op transactional projections, batch 1000, {events} events from empty checkpoints, heartbeat 1s: rows read per event (all 10, lag included) | {:.3} | one projection alone {:.3} | runs {:?} |",
        median(&ten_rows),
        median(&one_rows),
        rounded(&ten_rows)
    );
    println!(
        "| same: events/s committed by all 10 | {:.0} events/s | one projection alone {:.0} events/s | {:.2}x of one alone | runs {:?} against {:?} |",
        median(&ten),
        median(&one),
        median(&ten) / median(&one),
        ten.iter().map(|r| r.round()).collect::<Vec<_>>(),
        one.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    Ok(())
}

/// The second-round bars (docs/benchmarks.md): many projections in one worker, the demo
/// on four processes, isolation, concurrency, scale-out, the per-event handler.
async fn processing_suite(args: &Args) -> Result<()> {
    let events = args.events as u64;
    let runs = args.runs;

    projections_suite(args).await?;

    let mut demo = vec![];
    for run in 1..=runs {
        eprintln!("4 demo worker processes, {events} events: run {run}/{runs}");
        demo.push(processing::demo_workers_rows(events, 4).await?);
    }
    println!(
        "| 4 `orchestrator demo worker` processes (demo_audit and demo_audit_batch), {events}-event backlog from scratch, batch 1000, heartbeat 1s: rows read per event | {:.3} | runs {:?} |",
        median(&demo),
        rounded(&demo)
    );

    let iso_events = events.min(200_000);
    let (mut with, mut without) = (vec![], vec![]);
    for run in 1..=runs {
        eprintln!("isolation, {iso_events} events: run {run}/{runs}");
        with.push(processing::isolation(iso_events, true).await?);
        without.push(processing::isolation(iso_events, false).await?);
    }
    println!(
        "| isolation: 9 no-op projections beside one taking 50 ms per batch, batch 100, {iso_events} events: the slowest of the nine | {:.0} events/s | the nine alone {:.0} events/s | {:.2}x |",
        median(&with),
        median(&without),
        median(&with) / median(&without)
    );

    let io_events = 200_000;
    let (warm, window) = (Duration::from_secs(3), Duration::from_secs(10));
    let (mut c8, mut c1, mut w4, mut w1) = (vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        eprintln!("I/O-bound handler (1 ms per event), concurrency and workers: run {run}/{runs}");
        c8.push(processing::io_bound(io_events, 1, 8, warm, window).await?);
        c1.push(processing::io_bound(io_events, 1, 1, warm, window).await?);
        w4.push(processing::io_bound(io_events, 4, 1, warm, window).await?);
        w1.push(processing::io_bound(io_events, 1, 1, warm, window).await?);
    }
    println!(
        "| handler awaiting 1 ms per event, batch 100: PROCESSING_CONCURRENCY=8 against 1 | {:.0} events/s | concurrency 1: {:.0} events/s | {:.2}x |",
        median(&c8),
        median(&c1),
        median(&c8) / median(&c1)
    );
    println!(
        "| same handler: 4 workers against 1 (concurrency 1 each) | {:.0} events/s | 1 worker: {:.0} events/s | {:.2}x |",
        median(&w4),
        median(&w1),
        median(&w4) / median(&w1)
    );

    let upsert_events = events.min(200_000);
    for batch in [100usize, 1000] {
        let (mut ours, mut reference) = (vec![], vec![]);
        for run in 1..=runs {
            eprintln!("per-event upsert, batch {batch}: run {run}/{runs}");
            let schema = runtime::seeded_schema(upsert_events).await?;
            ours.push(processing::per_event_upsert(&schema, upsert_events, batch).await?);
            reference.push(
                upsert::plain_upsert_loop_batch(&schema.pool, upsert_events, batch as i64).await?,
            );
            schema.drop_schema().await;
        }
        println!(
            "| projection upserting one row per event through `handle` (one statement per event), batch {batch}, {upsert_events} events | {:.0} events/s | plain read+UNNEST upsert+checkpoint, batch {batch}: {:.0} events/s | {:.2}x of reference |",
            median(&ours),
            median(&reference),
            median(&ours) / median(&reference)
        );
    }
    Ok(())
}

/// The median of the runs' figures (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Each run's figure to three decimals, for the printed list of runs.
fn rounded(values: &[f64]) -> Vec<f64> {
    values.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

async fn embedded_suite(args: &Args) -> Result<()> {
    for batch in [1000, 100] {
        let mut rates = Vec::new();
        for run in 1..=args.runs {
            eprintln!("memory worker, batch {batch}: run {run}/{}", args.runs);
            rates.push(embedded::memory_throughput(args.events, batch).await?);
        }
        println!(
            "| single worker, in-memory store, no-op projection, batch {batch} | {:.0} events/s | runs {:?} |",
            median(&rates),
            rates.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
    for batch in [1000, 100] {
        let mut pairs = Vec::new();
        for run in 1..=args.runs {
            eprintln!("SQLite worker, batch {batch}: run {run}/{}", args.runs);
            pairs.push(embedded::sqlite_throughput(args.events, batch).await?);
        }
        report_rates(
            &format!("single worker, SQLite file, no-op transactional projection, batch {batch}"),
            &pairs,
        );
    }
    Ok(())
}

async fn upsert_suite(args: &Args) -> Result<()> {
    let mut pairs = Vec::new();
    for run in 1..=args.runs {
        eprintln!("upsert projection: run {run}/{}", args.runs);
        let schema = runtime::seeded_schema(args.events as u64).await?;
        let ours = upsert::projection_throughput(&schema, args.events as u64).await?;
        let reference = upsert::plain_upsert_loop(&schema.pool, args.events as u64).await?;
        pairs.push((ours, reference));
        schema.drop_schema().await;
    }
    report_runs("upsert projection, batch 1000", &pairs);
    let ours = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let reference = median(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    println!(
        "| single worker, projection upserting one row per event through handle_batch (UNNEST), batch 1000 | {ours:.0} events/s | plain read+UNNEST upsert+checkpoint {reference:.0} events/s | {:.2}x of reference |",
        ours / reference
    );
    Ok(())
}

/// Append-to-projected latency at 50 events/s over 40 s, without and with a writing transaction
/// held open for 30 s in another database of the server ("horizon isolation" in docs/benchmarks.md).
async fn horizon_suite(args: &Args) -> Result<()> {
    for foreign in [false, true] {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            eprintln!(
                "horizon isolation (foreign transaction: {foreign}): run {run}/{}",
                args.runs
            );
            runs.push(horizon::latency(foreign).await?);
        }
        let p50 = median(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
        let p99 = median(&runs.iter().map(|r| r.1).collect::<Vec<_>>());
        let max = median(&runs.iter().map(|r| r.2).collect::<Vec<_>>());
        let label = if foreign {
            "with a writing transaction open 30 s in another database"
        } else {
            "no other transaction"
        };
        println!(
            "| append-to-projected latency, idle PostgreSQL worker, 50 events/s, {label} | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms | runs (p99) {:?} |",
            runs.iter().map(|r| (r.1 * 10.0).round() / 10.0).collect::<Vec<_>>()
        );
    }
    Ok(())
}

async fn scaling_suite(args: &Args) -> Result<()> {
    for workers in [1, 2, 4] {
        let mut ratios = Vec::new();
        for run in 1..=args.runs {
            eprintln!("rows scanned, {workers} workers: run {run}/{}", args.runs);
            ratios.push(scaling::rows_scanned_per_event(workers, args.events as u64).await?);
        }
        println!(
            "| rows read from the events table per event processed, {workers} worker(s) | {:.3} | runs {:?} |",
            median(&ratios),
            ratios.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
    }
    for strategy in
        [orchestrator_core::Strategy::Incremental, orchestrator_core::Strategy::Recreate]
    {
        for run in 1..=args.runs {
            eprintln!("pauses on join, {strategy:?}: run {run}/{}", args.runs);
            let pauses = scaling::pauses_on_join(strategy).await?;
            println!(
                "| longest processing gap of a slot, {strategy:?}, run {run} | steady (one worker) {:?} | unmoved slots during the join {:?} | moved slots {:?} |",
                pauses.steady, pauses.unmoved, pauses.moved
            );
        }
    }
    Ok(())
}

async fn store_suite(args: &Args) -> Result<()> {
    let mut append = Vec::new();
    let mut read = Vec::new();
    for run in 1..=args.runs {
        eprintln!("store: run {run}/{}", args.runs);
        let schema = TestSchema::start(SlotCount::DEFAULT)
            .await
            .context("PostgreSQL is required for the benchmarks")?;
        create_plain_table(&schema.pool).await?;
        let port_append = append_through_port(&schema.store, args.events).await?;
        let plain_append = append_plain(&schema.pool, args.events).await?;
        sqlx::query("VACUUM ANALYZE orch_events").execute(&schema.pool).await?;
        sqlx::query("VACUUM ANALYZE plain_events").execute(&schema.pool).await?;
        let port_read = read_through_port(&schema.store, args.events).await?;
        let plain_read = read_plain(&schema.pool, args.events).await?;
        append.push((port_append, plain_append));
        read.push((port_read, plain_read));
        schema.drop_schema().await;
    }
    report("PostgreSQL append, 1000-event batches", &append, args.events);
    report("PostgreSQL read, batches of 1000", &read, args.events);
    Ok(())
}

async fn runtime_suite(args: &Args) -> Result<()> {
    for batch in [1000, 100] {
        let mut pairs = Vec::new();
        for run in 1..=args.runs {
            eprintln!("worker throughput, batch {batch}: run {run}/{}", args.runs);
            let schema = runtime::seeded_schema(args.events as u64).await?;
            let ours = runtime::worker_throughput(&schema, args.events as u64, batch).await?;
            let reference =
                runtime::plain_read_checkpoint(&schema.pool, args.events as u64, batch).await?;
            pairs.push((ours, reference));
            schema.drop_schema().await;
        }
        report_rates(
            &format!("single worker, no-op transactional projection, batch {batch}"),
            &pairs,
        );
    }
    eprintln!("worker RSS over {} events", args.events);
    let schema = runtime::seeded_schema(args.events as u64).await?;
    let samples = runtime::worker_rss(&schema, args.events as u64).await?;
    schema.drop_schema().await;
    let at = |fraction: f64| {
        let target = (args.events as f64 * fraction) as u64;
        samples.iter().find(|(handled, _)| *handled >= target).map_or(0, |s| s.1)
    };
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "| worker process RSS over a {}-event run, batch 1000 | at 10%: {} MiB, 50%: {} MiB, 100%: {} MiB, max {} MiB | {} samples |",
        args.events,
        at(0.1) / 1024,
        at(0.5) / 1024,
        at(1.0) / 1024,
        max / 1024,
        samples.len()
    );
    let mut joins = Vec::new();
    for run in 1..=args.runs {
        eprintln!("join to processing: run {run}/{}", args.runs);
        let schema =
            TestSchema::start(SlotCount::DEFAULT).await.context("PostgreSQL is required")?;
        joins.push(runtime::join_to_processing(&schema).await?);
        schema.drop_schema().await;
    }
    joins.sort();
    println!(
        "| join to all members processing (default settings, LISTEN/NOTIFY) | median {:?} | runs {:?} |",
        joins[joins.len() / 2],
        joins
    );
    eprintln!("append-to-projected latency");
    let schema = TestSchema::start(SlotCount::DEFAULT).await.context("PostgreSQL is required")?;
    let latencies = runtime::append_to_projected(&schema, 200).await?;
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "| append-to-projected latency, idle worker, LISTEN/NOTIFY | p50 {:?} | p99 {:?} | n={} |",
        pct(0.5),
        pct(0.99),
        latencies.len()
    );
    schema.drop_schema().await;
    Ok(())
}

fn report_rates(what: &str, pairs: &[(f64, f64)]) {
    report_runs(what, pairs);
    let ours = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let reference = median(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    println!(
        "| {what} | {ours:.0} events/s | plain sqlx read+checkpoint {reference:.0} events/s | {:.2}x of reference |",
        ours / reference
    );
}

/// Each run's pair and ratio on stderr, next to the medians the table shows.
fn report_runs(what: &str, pairs: &[(f64, f64)]) {
    for (run, (ours, reference)) in pairs.iter().enumerate() {
        eprintln!(
            "    {what}, run {}: {ours:.0} against {reference:.0} events/s, {:.2}x",
            run + 1,
            ours / reference
        );
    }
}

fn report(what: &str, runs: &[(Duration, Duration)], events: usize) {
    let ours =
        median(&runs.iter().map(|(o, _)| events as f64 / o.as_secs_f64()).collect::<Vec<_>>());
    let reference =
        median(&runs.iter().map(|(_, r)| events as f64 / r.as_secs_f64()).collect::<Vec<_>>());
    println!(
        "| {what} | {:.0} events/s | plain sqlx {:.0} events/s | {:.2}x of reference |",
        ours,
        reference,
        ours / reference
    );
}

/// The references' read: keyset pagination on `table`'s primary key, fetching the columns the port
/// decodes (PostgreSQL placeholders, or SQLite's when `sqlite`).
pub(crate) fn keyset_read_sql(table: &str, sqlite: bool) -> String {
    let (after, limit) = if sqlite { ("?", "?") } else { ("$1", "$2") };
    format!(
        "SELECT global_position, bounded_context, aggregate_type, aggregate_id, aggregate_version, \
             slot, event_id, event_type, event_version, payload, metadata, causation_id, \
             correlation_id, trace_id, created_at \
         FROM {table} WHERE global_position > {after} ORDER BY global_position LIMIT {limit}"
    )
}

pub(crate) fn new_event(n: usize) -> NewEvent {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&(n as u64).to_be_bytes());
    id[6] = 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    NewEvent {
        event_id: EventId::from_bytes(id),
        event_type: "Deposited".into(),
        event_version: 1,
        payload: vec![b'x'; PAYLOAD],
        metadata: "{}".into(),
        tracing: Tracing::default(),
    }
}

async fn append_through_port(store: &PgStore, events: usize) -> Result<Duration> {
    let started = Instant::now();
    for batch in 0..events / BATCH {
        let stream = StreamId::new("bench", "Account", format!("acct-{batch}"));
        let events: Vec<NewEvent> = (0..BATCH).map(|i| new_event(batch * BATCH + i)).collect();
        store.append(&stream, ExpectedVersion::NoStream, events).await?;
    }
    Ok(started.elapsed())
}

/// The reference table has the events table's shape: same columns, constraints and indexes.
async fn create_plain_table(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql("CREATE TABLE plain_events (LIKE orch_events INCLUDING ALL)")
        .execute(pool)
        .await?;
    Ok(())
}

/// The reference: one multi-row INSERT ... SELECT FROM unnest per 1000-event transaction, with
/// the values the port computes (slot, hash) passed in, and no version check or stream lock.
async fn append_plain(pool: &PgPool, events: usize) -> Result<Duration> {
    let payload = vec![b'x'; PAYLOAD];
    let started = Instant::now();
    for batch in 0..events / BATCH {
        let aggregate = format!("acct-{batch}");
        let hash = orchestrator_core::fnv1a_32(aggregate.as_bytes());
        let versions: Vec<i64> = (1..=BATCH as i64).collect();
        let ids: Vec<String> = (0..BATCH)
            .map(|i| new_event(events + batch * BATCH + i).event_id.to_string())
            .collect();
        let payloads: Vec<&[u8]> = vec![payload.as_slice(); BATCH];
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO plain_events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 slot, partition_hash, event_id, event_type, event_version, payload, metadata) \
             SELECT 'bench', 'Account', $1, v, $2, $3, id::uuid, 'Deposited', 1, p, '{}'::jsonb \
             FROM unnest($4::bigint[], $5::text[], $6::bytea[]) AS e(v, id, p)",
        )
        .bind(&aggregate)
        .bind(SlotCount::DEFAULT.slot_of_hash(hash).0 as i32)
        .bind(i64::from(hash))
        .bind(&versions)
        .bind(&ids)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

async fn read_through_port(store: &PgStore, events: usize) -> Result<Duration> {
    let cursors = store.slot_count().all().map(|s| (s, Position::START)).collect();
    let mut request = ReadRequest { cursors, scope: Scope::all(), limit: BATCH };
    let mut seen = 0;
    let started = Instant::now();
    while seen < events {
        let batch = store.read(&request).await?;
        if batch.is_empty() {
            bail!("read stopped at {seen} of {events} events");
        }
        request.advance_past(&batch);
        seen += batch.len();
    }
    Ok(started.elapsed())
}

/// The reference: keyset pagination on the primary key of the same-shaped table, decoding the
/// same columns the port decodes.
async fn read_plain(pool: &PgPool, events: usize) -> Result<Duration> {
    let mut after = 0i64;
    let mut seen = 0;
    let started = Instant::now();
    while seen < events {
        let rows = sqlx::query(&crate::keyset_read_sql("plain_events", false))
            .bind(after)
            .bind(BATCH as i64)
            .fetch_all(pool)
            .await?;
        let Some(last) = rows.last() else { bail!("plain read stopped at {seen}") };
        after = last.get(0);
        seen += rows.len();
    }
    Ok(started.elapsed())
}
