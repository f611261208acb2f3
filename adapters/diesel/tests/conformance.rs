//! The whole conformance suite against the diesel store, each case in a fresh schema. The
//! read-model rows of the checkpoint cases are written with diesel's query builder inside the
//! `DieselTx`, so the fencing cases check that diesel's writes commit and roll back with the
//! checkpoints; the unit-of-work cases go through the PostgreSQL adapter's sqlx unit of work,
//! which the diesel store delegates to.

use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use orchestrator_conformance::{Harness, SLOTS, conformance_tests};
use orchestrator_core::SlotCount;
use orchestrator_core::ports::DeadLetterId;
use orchestrator_diesel::testing::TestSchema;
use orchestrator_diesel::{DieselStore, DieselTx};
use orchestrator_postgres::PgUnitOfWork;

diesel::table! {
    rows (key) {
        key -> Text,
        value -> Text,
    }
}

struct DieselHarness(TestSchema);

#[async_trait]
impl Harness for DieselHarness {
    type Store = DieselStore;

    async fn start() -> Option<Self> {
        let schema = TestSchema::start(SlotCount::new(u64::from(SLOTS)).unwrap()).await?;
        sqlx::query("CREATE TABLE rows (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .execute(&schema.pg.pool)
            .await
            .unwrap();
        Some(Self(schema))
    }

    fn store(&self) -> &DieselStore {
        &self.0.store
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    async fn put_row(&self, tx: &mut DieselTx, key: &str, value: &str) {
        diesel::insert_into(rows::table)
            .values((rows::key.eq(key), rows::value.eq(value)))
            .on_conflict(rows::key)
            .do_update()
            .set(rows::value.eq(excluded(rows::value)))
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn put_row_in_unit(&self, unit: &mut PgUnitOfWork, key: &str, value: &str) {
        sqlx::query("INSERT INTO rows (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&mut **unit.tx())
            .await
            .unwrap();
    }

    async fn hold_foreign_transaction(&self) -> Option<Box<dyn std::any::Any + Send>> {
        // A diesel transaction that has written (so holds a transaction id) to another table.
        let mut tx = orchestrator_core::ports::CheckpointStore::begin(&self.0.store).await.unwrap();
        self.put_row(&mut tx, "foreign", "open").await;
        Some(Box::new(tx))
    }

    async fn skipped_letters(&self) -> Option<Vec<DeadLetterId>> {
        Some(
            sqlx::query_scalar("SELECT id FROM orch_skipped_letters")
                .fetch_all(&self.0.pg.pool)
                .await
                .unwrap(),
        )
    }

    async fn get_row(&self, key: &str) -> Option<String> {
        let mut conn = self.0.diesel.get().await.unwrap();
        rows::table
            .filter(rows::key.eq(key))
            .select(rows::value)
            .first::<String>(&mut *conn)
            .await
            .optional()
            .unwrap()
    }

    async fn settle(&self) {
        // Wait until the read horizon has passed every event appended so far.
        loop {
            let horizon = self.0.pg.store.read_horizon().await.unwrap();
            let newest: Option<i64> =
                sqlx::query_scalar("SELECT MAX(transaction_id)::text::bigint FROM orch_events")
                    .fetch_one(&self.0.pg.pool)
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

conformance_tests!(DieselHarness);
