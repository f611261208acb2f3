//! The harness on each adapter: memory, a SQLite file, a PostgreSQL schema.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use orchestrator_core::ports::BoxError;
use orchestrator_core::{Event, SlotCount, TablePrefix};
use orchestrator_memory::{MemoryStore, MemoryTx};
use orchestrator_postgres::testing::TestSchema;
use orchestrator_postgres::{PgStore, PgTx};
use orchestrator_runtime::Projection;
use orchestrator_sqlite::{SqliteStore, SqliteTx};

use super::{AuditRow, Harness, SLOTS};

fn failure(event: &Event) -> BoxError {
    format!("projection configured to fail at {}", event.position.global).into()
}

// ---- memory ----

pub struct Memory {
    store: MemoryStore,
    seq: Arc<AtomicI64>,
}

struct MemAudit {
    name: String,
    worker: String,
    fail_on: Option<u64>,
    seq: Arc<AtomicI64>,
}

#[async_trait]
impl Projection<MemoryTx> for MemAudit {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), BoxError> {
        if self.fail_on == Some(event.position.global) {
            return Err(failure(event));
        }
        // One row per application, never a read-modify-write: a zombie's stale transaction that
        // slipped through would add a second row rather than overwrite the first.
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let key = format!("{}#{seq}", event.position.global);
        let value = format!(
            "{}|{}|{seq}|{}",
            event.stream.aggregate_id, event.aggregate_version, self.worker
        );
        tx.put(&self.name, &key, value.into_bytes());
        Ok(())
    }
}

#[async_trait]
impl Harness for Memory {
    type S = MemoryStore;

    async fn start() -> Option<Self> {
        // The store's clock must be real time here: workers run on tokio time.
        let clock: Arc<dyn orchestrator_core::Clock> =
            Arc::new(orchestrator_runtime::SystemClock::new());
        Some(Self {
            store: MemoryStore::new(SlotCount::new(SLOTS).unwrap(), clock),
            seq: Arc::default(),
        })
    }

    fn store(&self) -> MemoryStore {
        self.store.clone()
    }

    fn audit(
        &self,
        name: &str,
        worker: &str,
        fail_on: Option<u64>,
    ) -> Arc<dyn Projection<MemoryTx>> {
        Arc::new(MemAudit {
            name: name.into(),
            worker: worker.into(),
            fail_on,
            seq: self.seq.clone(),
        })
    }

    async fn audit_rows(&self, name: &str) -> Vec<AuditRow> {
        let mut rows: std::collections::BTreeMap<u64, AuditRow> = std::collections::BTreeMap::new();
        for (key, value) in self.store.read_model_table(name) {
            let global: u64 = key.split('#').next().unwrap().parse().unwrap();
            let value = String::from_utf8(value).unwrap();
            let parts: Vec<&str> = value.split('|').collect();
            let row = rows.entry(global).or_insert_with(|| AuditRow {
                global,
                times: 0,
                aggregate: parts[0].into(),
                version: parts[1].parse().unwrap(),
                handled_seq: parts[2].parse().unwrap(),
                worker: parts[3].into(),
            });
            row.times += 1;
        }
        rows.into_values().collect()
    }
}

// ---- SQL audit table, shared shape ----

const AUDIT_COLUMNS: &str =
    "global_position, times, aggregate_id, aggregate_version, handled_seq, worker_id";

fn audit_row(row: (i64, i64, String, i64, i64, String)) -> AuditRow {
    AuditRow {
        global: row.0 as u64,
        times: row.1,
        aggregate: row.2,
        version: row.3,
        handled_seq: row.4,
        worker: row.5,
    }
}

// ---- SQLite ----

pub struct Sqlite {
    store: SqliteStore,
    dir: std::path::PathBuf,
}

struct SqliteAudit {
    name: String,
    worker: String,
    fail_on: Option<u64>,
}

#[async_trait]
impl Projection<SqliteTx> for SqliteAudit {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, tx: &mut SqliteTx, event: &Event) -> Result<(), BoxError> {
        if self.fail_on == Some(event.position.global) {
            return Err(failure(event));
        }
        sqlx::query(
            "INSERT INTO audit (projection, global_position, times, aggregate_id, aggregate_version, handled_seq, worker_id) \
             VALUES (?1, ?2, 1, ?3, ?4, (SELECT COALESCE(MAX(handled_seq), 0) + 1 FROM audit), ?5) \
             ON CONFLICT (projection, global_position) DO UPDATE SET times = times + 1, \
                 handled_seq = (SELECT COALESCE(MAX(handled_seq), 0) + 1 FROM audit)",
        )
        .bind(&self.name)
        .bind(event.position.global as i64)
        .bind(&event.stream.aggregate_id)
        .bind(event.aggregate_version as i64)
        .bind(&self.worker)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Harness for Sqlite {
    type S = SqliteStore;
    const SINGLE_WRITER: bool = true;

    async fn start() -> Option<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("orch-runtime-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite:{}", dir.join("o.db").display());
        let pool = SqliteStore::connect_pool(&url, 8).await.unwrap();
        orchestrator_sqlite::migrate(
            &pool,
            &TablePrefix::default(),
            SlotCount::new(SLOTS).unwrap(),
        )
        .await
        .unwrap();
        sqlx::query(
            "CREATE TABLE audit (projection TEXT NOT NULL, global_position INTEGER NOT NULL, times INTEGER NOT NULL, \
             aggregate_id TEXT NOT NULL, aggregate_version INTEGER NOT NULL, handled_seq INTEGER NOT NULL, \
             worker_id TEXT NOT NULL, PRIMARY KEY (projection, global_position))",
        )
        .execute(&pool)
        .await
        .unwrap();
        let store = SqliteStore::open(pool, TablePrefix::default()).await.unwrap();
        Some(Self { store, dir })
    }

    fn store(&self) -> SqliteStore {
        self.store.clone()
    }

    fn audit(
        &self,
        name: &str,
        worker: &str,
        fail_on: Option<u64>,
    ) -> Arc<dyn Projection<SqliteTx>> {
        Arc::new(SqliteAudit { name: name.into(), worker: worker.into(), fail_on })
    }

    async fn audit_rows(&self, name: &str) -> Vec<AuditRow> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE projection = ?");
        let rows: Vec<(i64, i64, String, i64, i64, String)> =
            sqlx::query_as(&sql).bind(name).fetch_all(self.store.pool()).await.unwrap();
        rows.into_iter().map(audit_row).collect()
    }

    async fn finish(self) {
        self.store.pool().close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- PostgreSQL ----

pub struct Postgres {
    schema: TestSchema,
}

impl Postgres {
    pub fn schema(&self) -> &TestSchema {
        &self.schema
    }
}

struct PgAudit {
    name: String,
    worker: String,
    fail_on: Option<u64>,
}

#[async_trait]
impl Projection<PgTx> for PgAudit {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, tx: &mut PgTx, event: &Event) -> Result<(), BoxError> {
        if self.fail_on == Some(event.position.global) {
            return Err(failure(event));
        }
        sqlx::query(
            "INSERT INTO audit (projection, global_position, times, aggregate_id, aggregate_version, handled_seq, worker_id) \
             VALUES ($1, $2, 1, $3, $4, nextval('audit_seq'), $5) \
             ON CONFLICT (projection, global_position) DO UPDATE SET times = audit.times + 1, handled_seq = nextval('audit_seq')",
        )
        .bind(&self.name)
        .bind(event.position.global as i64)
        .bind(&event.stream.aggregate_id)
        .bind(event.aggregate_version as i64)
        .bind(&self.worker)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Harness for Postgres {
    type S = PgStore;

    async fn start() -> Option<Self> {
        let schema = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await?;
        sqlx::raw_sql(
            "CREATE SEQUENCE audit_seq; \
             CREATE TABLE audit (projection TEXT NOT NULL, global_position BIGINT NOT NULL, times BIGINT NOT NULL, \
             aggregate_id TEXT NOT NULL, aggregate_version BIGINT NOT NULL, handled_seq BIGINT NOT NULL, \
             worker_id TEXT NOT NULL, PRIMARY KEY (projection, global_position))",
        )
        .execute(&schema.pool)
        .await
        .unwrap();
        Some(Self { schema })
    }

    fn store(&self) -> PgStore {
        self.schema.store.clone()
    }

    fn audit(&self, name: &str, worker: &str, fail_on: Option<u64>) -> Arc<dyn Projection<PgTx>> {
        Arc::new(PgAudit { name: name.into(), worker: worker.into(), fail_on })
    }

    async fn audit_rows(&self, name: &str) -> Vec<AuditRow> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE projection = $1");
        let rows: Vec<(i64, i64, String, i64, i64, String)> =
            sqlx::query_as(&sql).bind(name).fetch_all(&self.schema.pool).await.unwrap();
        rows.into_iter().map(audit_row).collect()
    }

    async fn change_feed(&self) -> Option<Box<dyn orchestrator_core::ports::ChangeFeed>> {
        Some(Box::new(self.schema.store.change_feed().await.unwrap()))
    }

    async fn finish(self) {
        self.schema.drop_schema().await;
    }
}
