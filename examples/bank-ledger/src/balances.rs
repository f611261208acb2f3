//! The `account_balances` read model: one transactional projection, written once for PostgreSQL
//! and SQLite. Its upsert runs in the runtime's transaction, which also commits the checkpoints
//! and the ownership check, so every event changes a balance exactly once.

use async_trait::async_trait;
use orchestrator_core::ports::BoxError;
use orchestrator_core::{Event, SchemaMigration, Scope};
use orchestrator_runtime::{Permanent, Projection};
use orchestrator_serde::EventExt;
use sqlx::{Database, Encode, Executor, IntoArguments, Transaction, Type};

use crate::account::AccountEvent;

/// The application's schema, the same SQL on both stores, applied by `migrate_with`.
pub const SCHEMA: &[SchemaMigration] = &[SchemaMigration {
    name: "bank_0001_account_balances",
    sql: "CREATE TABLE account_balances (\
              account_id TEXT PRIMARY KEY, \
              balance BIGINT NOT NULL, \
              version BIGINT NOT NULL)",
}];

/// Keeps each account's balance and the version of the last event applied to it.
#[derive(Debug, Default)]
pub struct Balances;

#[async_trait]
impl<DB> Projection<Transaction<'static, DB>> for Balances
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
{
    fn name(&self) -> &str {
        "account_balances"
    }

    fn scope(&self) -> Scope {
        Scope { aggregate_types: vec!["Account".into()], bounded_contexts: vec!["bank".into()] }
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, DB>,
        event: &Event,
    ) -> Result<(), BoxError> {
        // An event this release cannot decode will not decode on a retry either: permanent, so
        // the failure policy (FAILURE_POLICY) applies at once. The query's errors are left as
        // they are: a lost connection is the store's trouble, retried without counting.
        let change = event.decode::<AccountEvent>().map_err(Permanent::new)?.balance_change();
        // `$n` placeholders work on both: SQLite reads them as numbered parameters.
        sqlx::query(
            "INSERT INTO account_balances (account_id, balance, version) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id) DO UPDATE \
             SET balance = account_balances.balance + excluded.balance, version = excluded.version",
        )
        .bind(event.stream.aggregate_id.clone())
        .bind(change)
        .bind(event.aggregate_version as i64)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, DB>) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM account_balances").execute(&mut **tx).await?;
        Ok(())
    }
}
