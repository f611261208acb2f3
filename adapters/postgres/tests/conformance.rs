//! The conformance suite against PostgreSQL, each case in a fresh schema.

use std::time::Duration;

use async_trait::async_trait;
use orchestrator_conformance::{Harness, SLOTS, conformance_tests};
use orchestrator_core::SlotCount;
use orchestrator_core::ports::DeadLetterId;
use orchestrator_postgres::testing::TestSchema;
use orchestrator_postgres::{PgStore, PgTx, PgUnitOfWork};

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

    async fn put_row_in_unit(&self, unit: &mut PgUnitOfWork, key: &str, value: &str) {
        self.put_row(unit.tx(), key, value).await;
    }

    async fn hold_foreign_transaction(&self) -> Option<Box<dyn std::any::Any + Send>> {
        // A transaction that has written (so holds a transaction id) to another table.
        let mut tx = self.0.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO rows (key, value) VALUES ('foreign', 'open')")
            .execute(&mut *tx)
            .await
            .unwrap();
        Some(Box::new(tx))
    }

    async fn skipped_letters(&self) -> Option<Vec<DeadLetterId>> {
        Some(
            sqlx::query_scalar("SELECT id FROM orch_skipped_letters")
                .fetch_all(&self.0.pool)
                .await
                .unwrap(),
        )
    }

    async fn get_row(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT value FROM rows WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.0.pool)
            .await
            .unwrap()
    }

    async fn settle(&self) {
        // Wait until the read horizon has passed every event appended so far.
        loop {
            let horizon = self.0.store.read_horizon().await.unwrap();
            let newest: Option<i64> =
                sqlx::query_scalar("SELECT MAX(transaction_id)::text::bigint FROM orch_events")
                    .fetch_one(&self.0.pool)
                    .await
                    .unwrap();
            if newest.is_none_or(|newest| (newest as u64) < horizon) {
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
