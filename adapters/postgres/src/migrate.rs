//! Applies the embedded migrations idempotently; safe when many workers start at once.

use orchestrator_core::ports::{StoreError, StoreResult};
use orchestrator_core::{
    LedgerDialect, Migration, MigrationLedger, SchemaMigration, SlotCount, TablePrefix,
};
use sqlx::{Executor, PgPool};

use crate::error::classify;

/// The migrations, in order (SQL with `{prefix}` placeholders).
const MIGRATIONS: &[Migration] = &[
    Migration::new(1, "init", include_str!("../../../migrations/postgres/0001_init.sql")),
    Migration::new(2, "leases", include_str!("../../../migrations/postgres/0002_leases.sql")),
    Migration::new(
        3,
        "partition_keys",
        include_str!("../../../migrations/postgres/0003_partition_keys.sql"),
    ),
    Migration::new(
        4,
        "worker_protocol",
        include_str!("../../../migrations/postgres/0004_worker_protocol.sql"),
    ),
    Migration::new(
        5,
        "stopped_projections",
        include_str!("../../../migrations/postgres/0005_stopped_projections.sql"),
    ),
    Migration::new(
        6,
        "dead_letters",
        include_str!("../../../migrations/postgres/0006_dead_letters.sql"),
    ),
];

const DIALECT: LedgerDialect =
    LedgerDialect { parameter: "$1", applied_at: "TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()" };

/// Creates or upgrades every table under `prefix`, and records the event store's slot count
/// (`slot_count` on a new store; an existing store keeps its own and a different one is refused).
///
/// Runs in one transaction holding an advisory lock, so concurrent callers wait for each other and
/// the second finds nothing left to do.
pub async fn migrate(
    pool: &PgPool,
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
    pool: &PgPool,
    prefix: &TablePrefix,
    slot_count: SlotCount,
    schema: &[SchemaMigration],
) -> StoreResult<()> {
    let err = |e| classify("migrate", e);
    let mut tx = crate::begin::begin(pool, None).await.map_err(err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{prefix}orchestrator_migrations"))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let ledger = MigrationLedger::new(prefix, DIALECT);
    // A plain string runs as a simple query, which may hold several statements.
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
    conn: &mut sqlx::PgConnection,
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
