//! The demo: events appended by `demo append`, and the `demo_audit` projections run by
//! `demo worker`, which record every event they apply (a contract the chaos run, the demo and the docs rely on):
//! `demo_audit(projection, global_position, aggregate_id, aggregate_version, slot, times,
//! handled_seq, worker_id, created_at, handled_at)`, primary key (projection, global_position).
//! `times` counts applications (1 is correct); `handled_seq` increases in handling order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, EventStore, UnitOfWork, UnitOfWorkStore};
use orchestrator_core::{Event, ExpectedVersion, NewEvent, SchemaMigration, StreamId};
use orchestrator_postgres::{PgStore, PgTx};
use orchestrator_runtime::{HandlerError, Permanent, Projection};
use orchestrator_serde::new_event_id;
use orchestrator_sqlite::SqliteTx;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::db::Database;

/// The two demo projections: one handles event by event, the other through the batch handler.
pub(crate) const PROJECTIONS: [&str; 2] = ["demo_audit", "demo_audit_batch"];

const EVENT_TYPES: [&str; 3] = ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn"];

/// The demo's schema on PostgreSQL, applied by `migrate_with` under the migration lock.
pub(crate) const PG_SCHEMA: &[SchemaMigration] = &[SchemaMigration {
    name: "demo_0001_audit",
    sql: "CREATE SEQUENCE IF NOT EXISTS demo_audit_seq; \
          CREATE TABLE IF NOT EXISTS demo_audit ( \
              projection TEXT NOT NULL, global_position BIGINT NOT NULL, aggregate_id TEXT NOT NULL, \
              aggregate_version BIGINT NOT NULL, slot INTEGER NOT NULL, times INTEGER NOT NULL, \
              handled_seq BIGINT NOT NULL, worker_id TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL, \
              handled_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
              PRIMARY KEY (projection, global_position))",
}];

/// The demo's schema on SQLite.
pub(crate) const SQLITE_SCHEMA: &[SchemaMigration] = &[SchemaMigration {
    name: "demo_0001_audit",
    sql: "CREATE TABLE IF NOT EXISTS demo_audit ( \
              projection TEXT NOT NULL, global_position INTEGER NOT NULL, aggregate_id TEXT NOT NULL, \
              aggregate_version INTEGER NOT NULL, slot INTEGER NOT NULL, times INTEGER NOT NULL, \
              handled_seq INTEGER NOT NULL, worker_id TEXT NOT NULL, created_at TEXT NOT NULL, \
              handled_at TEXT NOT NULL, PRIMARY KEY (projection, global_position)); \
          CREATE INDEX IF NOT EXISTS demo_audit_handled_seq ON demo_audit (handled_seq)",
}];

/// The demo aids of `demo worker` (documented as such): ways to try isolation and the failure
/// policies from outside.
#[derive(Debug, Clone, Default)]
pub(crate) struct Aids {
    /// `--handler-delay`: each batch of demo_audit_batch waits this long first.
    pub(crate) delay: Duration,
    /// `--fail-on-aggregate`: every event of this aggregate fails for good.
    pub(crate) fail_on_aggregate: Option<String>,
}

impl Aids {
    /// `--handler-delay`'s wait: only demo_audit_batch is slowed.
    async fn delay_batch(&self, name: &str) {
        if name == PROJECTIONS[1] && !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    /// `--fail-on-aggregate`'s failure, if `event` is of that aggregate.
    fn failure(&self, name: &str, event: &Event) -> Option<Permanent> {
        let id = self.fail_on_aggregate.as_deref()?;
        (event.stream.aggregate_id == id).then(|| {
            Permanent::new(format!(
                "{name} cannot handle {} of {id} (demo aid --fail-on-aggregate {id})",
                event.event_type
            ))
        })
    }

    /// The batch handler's failure: demo_audit_batch, like many batch handlers, does not say
    /// which event failed.
    fn batch_failure(&self, name: &str, events: &[Event]) -> Option<HandlerError> {
        events.iter().find_map(|e| self.failure(name, e)).map(HandlerError::somewhere)
    }
}

/// The demo_audit projection on PostgreSQL.
pub(crate) struct PgAudit {
    pub(crate) name: &'static str,
    pub(crate) worker: String,
    pub(crate) aids: Arc<Aids>,
}

const PG_RECORD: &str = "INSERT INTO demo_audit (projection, global_position, aggregate_id, aggregate_version, slot, \
         times, handled_seq, worker_id, created_at) \
     SELECT $1, g, a, v, s, 1, nextval('demo_audit_seq'), $2, to_timestamp(c / 1000.0) \
     FROM unnest($3::bigint[], $4::text[], $5::bigint[], $6::int[], $7::bigint[]) WITH ORDINALITY AS e(g, a, v, s, c, n) \
     ORDER BY n \
     ON CONFLICT (projection, global_position) DO UPDATE SET times = demo_audit.times + 1, \
         handled_seq = nextval('demo_audit_seq'), worker_id = excluded.worker_id, handled_at = clock_timestamp()";

async fn pg_record(
    tx: &mut PgTx,
    name: &str,
    worker: &str,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    sqlx::query(PG_RECORD)
        .bind(name)
        .bind(worker)
        .bind(events.iter().map(|e| e.position.global as i64).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.stream.aggregate_id.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.aggregate_version as i64).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.slot.0 as i32).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.created_at.as_millis() as i64).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await
        .map(drop)
}

#[async_trait]
impl Projection<PgTx> for PgAudit {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(&self, tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        if let Some(failure) = self.aids.failure(self.name, event) {
            return Err(failure.into());
        }
        Ok(pg_record(tx, self.name, &self.worker, std::slice::from_ref(event)).await?)
    }

    async fn reset(&self, tx: &mut PgTx) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM demo_audit WHERE projection = $1")
            .bind(self.name)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn handle_batch(&self, tx: &mut PgTx, events: &[Event]) -> Result<(), HandlerError> {
        self.aids.delay_batch(self.name).await;
        if self.name == PROJECTIONS[0] {
            // demo_audit goes event by event, like a simple projection would.
            for (index, event) in events.iter().enumerate() {
                self.handle(tx, event).await.map_err(|e| HandlerError::at(index, e))?;
            }
            return Ok(());
        }
        if let Some(failure) = self.aids.batch_failure(self.name, events) {
            return Err(failure);
        }
        pg_record(tx, self.name, &self.worker, events)
            .await
            .map_err(|e| HandlerError { index: None, source: e.into() })
    }
}

/// The demo_audit projection on SQLite (one writer at a time, so `handled_seq` is MAX + 1).
pub(crate) struct SqliteAudit {
    pub(crate) name: &'static str,
    pub(crate) worker: String,
    pub(crate) aids: Arc<Aids>,
}

#[async_trait]
impl Projection<SqliteTx> for SqliteAudit {
    fn name(&self) -> &str {
        self.name
    }

    async fn reset(&self, tx: &mut SqliteTx) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM demo_audit WHERE projection = ?")
            .bind(self.name)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn handle(&self, tx: &mut SqliteTx, event: &Event) -> Result<(), BoxError> {
        if let Some(failure) = self.aids.failure(self.name, event) {
            return Err(failure.into());
        }
        sqlx::query(
            "INSERT INTO demo_audit (projection, global_position, aggregate_id, aggregate_version, slot, times, \
                 handled_seq, worker_id, created_at, handled_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 1, (SELECT COALESCE(MAX(handled_seq), 0) + 1 FROM demo_audit), ?6, \
                 strftime('%Y-%m-%dT%H:%M:%fZ', ?7 / 1000.0, 'unixepoch'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
             ON CONFLICT (projection, global_position) DO UPDATE SET times = times + 1, \
                 handled_seq = (SELECT COALESCE(MAX(handled_seq), 0) + 1 FROM demo_audit), \
                 worker_id = excluded.worker_id, handled_at = excluded.handled_at",
        )
        .bind(self.name)
        .bind(event.position.global as i64)
        .bind(&event.stream.aggregate_id)
        .bind(event.aggregate_version as i64)
        .bind(i64::from(event.slot.0))
        .bind(&self.worker)
        .bind(event.created_at.as_millis() as i64)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn handle_batch(&self, tx: &mut SqliteTx, events: &[Event]) -> Result<(), HandlerError> {
        self.aids.delay_batch(self.name).await;
        if self.name == PROJECTIONS[1]
            && let Some(failure) = self.aids.batch_failure(self.name, events)
        {
            return Err(failure);
        }
        for (index, event) in events.iter().enumerate() {
            self.handle(tx, event).await.map_err(|e| HandlerError::at(index, e))?;
        }
        Ok(())
    }
}

/// The projections a demo worker runs on `db`.
pub(crate) enum DemoProjections {
    Postgres(Vec<Arc<dyn Projection<PgTx>>>),
    Sqlite(Vec<Arc<dyn Projection<SqliteTx>>>),
}

/// The demo projections for `worker`, with the demo aids asked for.
pub(crate) fn projections(db: &Database, worker: &str, aids: Aids) -> DemoProjections {
    let worker = worker.to_owned();
    let aids = Arc::new(aids);
    match db {
        Database::Postgres(_) => DemoProjections::Postgres(
            PROJECTIONS
                .iter()
                .map(|name| {
                    Arc::new(PgAudit { name, worker: worker.clone(), aids: aids.clone() }) as _
                })
                .collect(),
        ),
        Database::Sqlite(_) => DemoProjections::Sqlite(
            PROJECTIONS
                .iter()
                .map(|name| {
                    Arc::new(SqliteAudit { name, worker: worker.clone(), aids: aids.clone() }) as _
                })
                .collect(),
        ),
    }
}

/// What `demo append` was asked to do.
pub(crate) struct AppendPlan {
    pub(crate) events: u64,
    pub(crate) aggregates: u64,
    pub(crate) rate: Option<u64>,
    pub(crate) concurrency: u64,
    pub(crate) hold_open_ms: u64,
}

fn demo_event(seq: u64, kind: usize) -> NewEvent {
    let mut event = NewEvent::new(
        new_event_id(),
        EVENT_TYPES[kind % EVENT_TYPES.len()],
        serde_json::json!({ "seq": seq }).to_string(),
    );
    event.metadata = "{\"source\":\"orchestrator demo\"}".to_owned();
    event
}

/// Appends exactly `plan.events` events, one per append, aggregates taken round-robin by each of
/// `plan.concurrency` appenders (aggregate `i` belongs to appender `i % concurrency`, so versions
/// stay in order). Returns how many were appended.
pub(crate) async fn append(db: &Database, plan: &AppendPlan) -> Result<u64> {
    if plan.hold_open_ms > 0 && matches!(db, Database::Sqlite(_)) {
        bail!(
            "--hold-open needs PostgreSQL: an open SQLite write transaction blocks every other writer"
        );
    }
    let mut tasks = Vec::new();
    for appender in 0..plan.concurrency {
        let share =
            plan.events / plan.concurrency + u64::from(appender < plan.events % plan.concurrency);
        let aggregates: Vec<u64> =
            (0..plan.aggregates).filter(|a| a % plan.concurrency == appender).collect();
        if share == 0 {
            continue;
        }
        let aggregates = if aggregates.is_empty() { vec![appender] } else { aggregates };
        let interval =
            plan.rate.map(|r| Duration::from_secs_f64(plan.concurrency as f64 / r.max(1) as f64));
        let db = match db {
            Database::Postgres(s) => Database::Postgres(s.clone()),
            Database::Sqlite(s) => Database::Sqlite(s.clone()),
        };
        let hold = plan.hold_open_ms;
        tasks.push(tokio::spawn(async move {
            let mut random = StdRng::from_rng(&mut rand::rng());
            for i in 0..share {
                let aggregate = aggregates[(i as usize) % aggregates.len()];
                let stream = StreamId::new("demo", "Account", format!("account-{aggregate}"));
                let event = demo_event(appender << 40 | i, i as usize);
                match &db {
                    Database::Postgres(store) if hold > 0 => {
                        append_held(store, &stream, event, random.random_range(0..=hold)).await?
                    }
                    Database::Postgres(store) => append_one(store, &stream, event).await?,
                    Database::Sqlite(store) => append_one(store, &stream, event).await?,
                }
                if let Some(interval) = interval {
                    tokio::time::sleep(interval).await;
                }
            }
            anyhow::Ok(share)
        }));
    }
    let mut appended = 0;
    for task in tasks {
        appended += task.await??;
    }
    Ok(appended)
}

async fn append_one(store: &impl EventStore, stream: &StreamId, event: NewEvent) -> Result<()> {
    retrying(|| async {
        store.append(stream, ExpectedVersion::Any, vec![event.clone()]).await.map(drop)
    })
    .await
}

async fn append_held(
    store: &PgStore,
    stream: &StreamId,
    event: NewEvent,
    hold_ms: u64,
) -> Result<()> {
    retrying(|| async {
        let mut unit = store.begin_unit_of_work(std::slice::from_ref(stream)).await?;
        unit.append(stream, ExpectedVersion::Any, vec![event.clone()]).await?;
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        unit.commit().await.map(drop)
    })
    .await
}

/// Runs one append, retrying transient failures (a busy SQLite file, a restarting server, a
/// killed connection): the demo must append exactly the number of events asked for. An append
/// whose commit was cut off may have landed: its event id then comes back as a duplicate.
async fn retrying<F, Fut>(mut append: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), orchestrator_core::ports::StoreError>>,
{
    let mut attempt = 0;
    loop {
        match append().await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_retryable() && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(orchestrator_core::ports::StoreError::DuplicateEvent { .. }) if attempt > 0 => {
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        }
    }
}
