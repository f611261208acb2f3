//! The conformance suite against SQLite: a real database file per case, WAL mode, a pool of
//! several connections.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_conformance::{Harness, SLOTS, conformance_tests};
use orchestrator_core::ports::DeadLetterId;
use orchestrator_core::{SlotCount, TablePrefix};
use orchestrator_sqlite::{SqliteStore, SqliteTx, SqliteUnitOfWork, migrate};

struct SqliteHarness {
    store: SqliteStore,
    dir: std::path::PathBuf,
}

#[async_trait]
impl Harness for SqliteHarness {
    type Store = SqliteStore;

    async fn start() -> Option<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("orch-sqlite-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite:{}", dir.join("test.db").display());
        let pool = SqliteStore::connect_pool(&url, 4).await.unwrap();
        migrate(&pool, &TablePrefix::default(), SlotCount::new(u64::from(SLOTS)).unwrap())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE rows (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let store = SqliteStore::open(pool, TablePrefix::default()).await.unwrap();
        Some(Self { store, dir })
    }

    fn store(&self) -> &SqliteStore {
        &self.store
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    async fn put_row(&self, tx: &mut SqliteTx, key: &str, value: &str) {
        sqlx::query("INSERT INTO rows (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn put_row_in_unit(&self, unit: &mut SqliteUnitOfWork, key: &str, value: &str) {
        self.put_row(unit.tx(), key, value).await;
    }

    const CONCURRENT_WRITERS: bool = false;

    async fn hold_foreign_transaction(&self) -> Option<Box<dyn std::any::Any + Send>> {
        let mut tx = self.store.pool().begin().await.unwrap();
        sqlx::query("SELECT count(*) FROM orch_events").execute(&mut *tx).await.unwrap();
        Some(Box::new(tx))
    }

    async fn skipped_letters(&self) -> Option<Vec<DeadLetterId>> {
        Some(
            sqlx::query_scalar("SELECT id FROM orch_skipped_letters")
                .fetch_all(self.store.pool())
                .await
                .unwrap(),
        )
    }

    async fn get_row(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT value FROM rows WHERE key = ?")
            .bind(key)
            .fetch_optional(self.store.pool())
            .await
            .unwrap()
    }

    async fn finish(self) {
        self.store.pool().close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

conformance_tests!(SqliteHarness);
