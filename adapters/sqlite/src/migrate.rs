//! Applies the embedded migrations idempotently inside `BEGIN IMMEDIATE`, so concurrent callers
//! (several workers starting at once) wait for each other.

use orchestrator_core::ports::{StoreError, StoreResult};
use orchestrator_core::{SchemaMigration, SlotCount, TablePrefix};
use sqlx::{Executor, SqlitePool};

use crate::error::classify;

/// The migrations, in order: (version, name, SQL with `{prefix}` placeholders).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/sqlite/0001_init.sql")),
    (2, "partition_keys", include_str!("../../../migrations/sqlite/0002_partition_keys.sql")),
    (3, "worker_protocol", include_str!("../../../migrations/sqlite/0003_worker_protocol.sql")),
    (
        4,
        "stopped_projections",
        include_str!("../../../migrations/sqlite/0004_stopped_projections.sql"),
    ),
    (5, "dead_letters", include_str!("../../../migrations/sqlite/0005_dead_letters.sql")),
];

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
    let create_ledger = format!(
        "CREATE TABLE IF NOT EXISTS {prefix}schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
    );
    tx.execute(create_ledger.as_str()).await.map_err(err)?;
    let list = format!("SELECT version FROM {prefix}schema_migrations");
    let applied: Vec<i32> = sqlx::query_scalar(&list).fetch_all(&mut *tx).await.map_err(err)?;
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let script = sql.replace("{prefix}", prefix.as_str());
        tx.execute(script.as_str()).await.map_err(err)?;
        let record = format!("INSERT INTO {prefix}schema_migrations (version, name) VALUES (?, ?)");
        sqlx::query(&record).bind(version).bind(name).execute(&mut *tx).await.map_err(err)?;
    }
    let record_slots = format!(
        "INSERT INTO {prefix}meta (key, value) VALUES ('slot_count', ?) ON CONFLICT (key) DO NOTHING"
    );
    sqlx::query(&record_slots)
        .bind(slot_count.get().to_string())
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    stored_slot_count(&mut tx, prefix.as_str(), Some(slot_count)).await?;
    let create_app_ledger = format!(
        "CREATE TABLE IF NOT EXISTS {prefix}application_migrations (
             name TEXT PRIMARY KEY,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
    );
    tx.execute(create_app_ledger.as_str()).await.map_err(err)?;
    let applied: Vec<String> =
        sqlx::query_scalar(&format!("SELECT name FROM {prefix}application_migrations"))
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
    for step in schema.iter().filter(|step| !applied.iter().any(|name| name == step.name)) {
        tx.execute(step.sql).await.map_err(|e| classify(&format!("apply {}", step.name), e))?;
        sqlx::query(&format!("INSERT INTO {prefix}application_migrations (name) VALUES (?)"))
            .bind(step.name)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
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
