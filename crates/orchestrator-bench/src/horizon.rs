//! Horizon isolation (docs/benchmarks.md): append-to-projected latency on an idle PostgreSQL worker, with and
//! without a writing transaction held open for 30 s in another database of the same server.
//! Before the read horizon counted only this table's appenders, such a transaction held every
//! event back until it ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, EventStore};
use orchestrator_core::{Event, EventId, ExpectedVersion, StreamId};
use orchestrator_postgres::testing::TestSchema;
use orchestrator_runtime::{Orchestrator, Projection};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::{new_event, runtime};

/// How long each measurement appends, at `RATE` events per second.
const WINDOW: Duration = Duration::from_secs(40);
const RATE: u64 = 50;
/// The foreign transaction opens this long into the window and stays open `HOLD`.
const FOREIGN_AFTER: Duration = Duration::from_secs(5);
const HOLD: Duration = Duration::from_secs(30);

/// Notes when each event reaches the projection.
#[derive(Default)]
struct Seen(Mutex<HashMap<EventId, Instant>>);

#[async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Seen {
    fn name(&self) -> &str {
        "latency"
    }

    async fn handle(&self, _tx: &mut Tx, event: &Event) -> Result<(), BoxError> {
        self.0.lock().unwrap().entry(event.event_id).or_insert_with(Instant::now);
        Ok(())
    }
}

/// Latency percentiles (p50, p99, max) in milliseconds, over one window.
pub(crate) async fn latency(foreign: bool) -> Result<(f64, f64, f64)> {
    let schema = TestSchema::start(orchestrator_core::SlotCount::new(256)?)
        .await
        .context("PostgreSQL is needed")?;
    let store = schema.store.clone();
    let seen = Arc::new(Seen::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let feed = store.change_feed().await?;
    let worker =
        Orchestrator::new(store.clone(), runtime::settings("w1", 100)?)?.with_change_feed(feed);
    let projections: Vec<Arc<dyn Projection<_>>> = vec![seen.clone()];
    let task = tokio::spawn(worker.run(
        async {
            let _ = stopped.await;
        },
        projections,
    ));
    // Let the worker own its slots before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let holder = if foreign { Some(hold_foreign_transaction(&schema).await?) } else { None };
    let mut appended: HashMap<EventId, Instant> = HashMap::new();
    let started = Instant::now();
    let interval = Duration::from_secs(1) / RATE as u32;
    let mut n = 0usize;
    while started.elapsed() < WINDOW {
        let event = new_event(n);
        let id = event.event_id;
        let stream = StreamId::new("bench", "Account", format!("acct-{}", n % 1000));
        store.append(&stream, ExpectedVersion::Any, vec![event]).await?;
        appended.insert(id, Instant::now());
        n += 1;
        tokio::time::sleep(interval).await;
    }
    // Every event is delivered in the end; wait for the last ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = seen.0.lock().unwrap().len();
        if delivered >= appended.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    task.await??;
    if let Some((pool, handle)) = holder {
        handle.await??;
        pool.close().await;
        // Dropped after the window: DROP DATABASE forces a checkpoint, which would show up as
        // commit latency of the appends measured.
        let database = format!("{}_foreign", schema.schema);
        sqlx::query(&format!("DROP DATABASE {database} WITH (FORCE)"))
            .execute(&schema.pool)
            .await?;
    }
    let seen: HashMap<EventId, Instant> = std::mem::take(&mut *seen.0.lock().unwrap());
    let mut millis: Vec<f64> = appended
        .iter()
        .map(|(id, at)| {
            seen.get(id)
                .map_or(f64::INFINITY, |s| s.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    millis.sort_by(f64::total_cmp);
    let pick = |q: f64| millis[((millis.len() - 1) as f64 * q).round() as usize];
    let result = (pick(0.5), pick(0.99), *millis.last().unwrap());
    schema.drop_schema().await;
    Ok(result)
}

/// Opens, `FOREIGN_AFTER` from now, a transaction in another database of the server that writes a
/// row, and commits it `HOLD` later.
async fn hold_foreign_transaction(
    schema: &TestSchema,
) -> Result<(PgPool, tokio::task::JoinHandle<Result<()>>)> {
    let database = format!("{}_foreign", schema.schema);
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&schema.pool).await?;
    let mut url = url_of_test_server();
    let slash = url.rfind('/').context("database URL without a path")?;
    url.replace_range(slash + 1.., &database);
    let pool = PgPool::connect(&url).await?;
    sqlx::query("CREATE TABLE report (n INT)").execute(&pool).await?;
    let handle = {
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FOREIGN_AFTER).await;
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO report VALUES (1)").execute(&mut *tx).await?;
            tokio::time::sleep(HOLD).await;
            tx.commit().await?;
            Ok(())
        })
    };
    Ok((pool, handle))
}

fn url_of_test_server() -> String {
    std::env::var("ORCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| orchestrator_postgres::testing::DEFAULT_TEST_URL.to_owned())
}
