//! Applies the embedded migrations idempotently inside `BEGIN IMMEDIATE`, so concurrent callers
//! (several workers starting at once) wait for each other.

use orchestrator_core::ports::{StoreError, StoreResult};
use orchestrator_core::{
    LedgerDialect, Migration, MigrationLedger, SchemaMigration, SlotCount, TablePrefix,
};
use sqlx::{Executor, SqlitePool};

use crate::error::classify;

/// The migrations, in order (SQL with `{prefix}` placeholders).
const MIGRATIONS: &[Migration] = &[
    Migration::new(1, "init", include_str!("../../../migrations/sqlite/0001_init.sql")),
    Migration::new(
        2,
        "partition_keys",
        include_str!("../../../migrations/sqlite/0002_partition_keys.sql"),
    ),
    Migration::new(
        3,
        "worker_protocol",
        include_str!("../../../migrations/sqlite/0003_worker_protocol.sql"),
    ),
    Migration::new(
        4,
        "stopped_projections",
        include_str!("../../../migrations/sqlite/0004_stopped_projections.sql"),
    ),
    Migration::new(
        5,
        "dead_letters",
        include_str!("../../../migrations/sqlite/0005_dead_letters.sql"),
    ),
];

const DIALECT: LedgerDialect = LedgerDialect {
    parameter: "?1",
    applied_at: "TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
};

/// Creates or upgrades every table under `prefix`, and records the event store's slot count
/// (`slot_count` on a new store; an existing store keeps its own and a different one is refused).
pub async fn migrate(
    pool: &SqlitePool,
    prefix: &TablePrefix,
    slot_count: SlotCount,
) -> StoreResult<()> {
    migrate_with(pool, prefix, slot_count, &[]).await
}

/// [`migrate`], then the application's own `schema` steps not applied yet (recorded by name in
/// `{prefix}application_migrations`), in the same transaction and under the same lock: workers
/// that start together never race on the application's DDL, and a failing step rolls back
/// everything.
pub async fn migrate_with(
    pool: &SqlitePool,
    prefix: &TablePrefix,
    slot_count: SlotCount,
    schema: &[SchemaMigration],
) -> StoreResult<()> {
    let err = |e| classify("migrate", e);
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(err)?;
    let ledger = MigrationLedger::new(prefix, DIALECT);
    tx.execute(ledger.create_sql().as_str()).await.map_err(err)?;
    let versions: Vec<i32> = sqlx::query_scalar(&ledger.applied_versions_sql())
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
    let names: Vec<String> =
        sqlx::query_scalar(&ledger.applied_names_sql()).fetch_all(&mut *tx).await.map_err(err)?;
    for script in ledger.pending(MIGRATIONS, &versions, slot_count) {
        tx.execute(script.as_str()).await.map_err(err)?;
    }
    stored_slot_count(&mut tx, prefix.as_str(), Some(slot_count)).await?;
    let record = ledger.record_name_sql();
    for step in ledger.pending_application(schema, &names) {
        tx.execute(step.sql).await.map_err(|e| classify(&format!("apply {}", step.name), e))?;
        sqlx::query(&record).bind(step.name).execute(&mut *tx).await.map_err(err)?;
    }
    tx.commit().await.map_err(err)
}

/// Reads the event store's slot count recorded by [`migrate`], refusing a different `configured`.
pub(crate) async fn stored_slot_count(
    conn: &mut sqlx::SqliteConnection,
    prefix: &str,
    configured: Option<SlotCount>,
) -> StoreResult<SlotCount> {
    let sql = format!("SELECT value FROM {prefix}meta WHERE key = 'slot_count'");
    let value: Option<String> = sqlx::query_scalar(&sql)
        .fetch_optional(conn)
        .await
        .map_err(|e| classify("read the event store's slot count", e))?;
    StoreError::check_stored_slot_count(prefix, value, configured)
}
