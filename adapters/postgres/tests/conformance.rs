//! The conformance suite against PostgreSQL, each case in a fresh schema.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_conformance::{Harness, SLOTS, conformance_tests};
use orchestrator_core::SlotCount;
use orchestrator_postgres::testing::TestSchema;
use orchestrator_postgres::{PgStore, PgTx};

struct PgHarness(TestSchema);

#[async_trait]
impl Harness for PgHarness {
    type Store = PgStore;

    async fn start() -> Option<Self> {
        let schema = TestSchema::start(SlotCount::new(u64::from(SLOTS)).unwrap()).await?;
        sqlx::query("CREATE TABLE rows (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .execute(&schema.pool)
            .await
            .unwrap();
        Some(Self(schema))
    }

    fn store(&self) -> &PgStore {
        &self.0.store
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    async fn put_row(&self, tx: &mut PgTx, key: &str, value: &str) {
        sqlx::query("INSERT INTO rows (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn get_row(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT value FROM rows WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.0.pool)
            .await
            .unwrap()
    }

    async fn settle(&self) {
        // Wait until the transaction horizon has passed every event appended so far.
        loop {
            let visible: bool = sqlx::query_scalar(
                "SELECT COALESCE(pg_snapshot_xmin(pg_current_snapshot()) > MAX(transaction_id), TRUE) FROM orch_events",
            )
            .fetch_one(&self.0.pool)
            .await
            .unwrap();
            if visible {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) {
        self.0.drop_schema().await;
    }
}

conformance_tests!(PgHarness);
