//! The database behind `--database-url`: PostgreSQL or SQLite, chosen by the URL's scheme.

use anyhow::{Context, Result, bail};
use orchestrator_core::{SlotCount, TablePrefix, quote};
use orchestrator_postgres::PgStore;
use orchestrator_sqlite::SqliteStore;

/// The embedded default when neither `--database-url` nor `DATABASE_URL` is given.
pub(crate) const DEFAULT_URL: &str = "sqlite:orchestrator.db";

/// A connected store of either kind.
pub(crate) enum Database {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Which store a URL names, refusing anything else with a one-line reason.
pub(crate) fn kind_of(url: &str) -> Result<&'static str> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok("postgres")
    } else if url.starts_with("sqlite:") {
        Ok("sqlite")
    } else {
        let scheme = url.split(':').next().unwrap_or(url);
        bail!(
            "unknown database URL scheme {}: use postgres://, postgresql:// or sqlite:",
            quote(scheme)
        )
    }
}

/// Connections of a command's pool when it says nothing else (a worker sizes its own).
const PG_POOL: u32 = 10;
const SQLITE_POOL: u32 = 4;

/// Connects, creates or upgrades the schema (idempotent; the demo's audit table with it, under the
/// same lock), and opens the store.
pub(crate) async fn open(url: &str, prefix: &TablePrefix, slots: SlotCount) -> Result<Database> {
    open_with_pool(url, prefix, slots, None).await
}

/// [`open`] with `pool_size` connections (default: 10 on PostgreSQL, 4 on SQLite).
pub(crate) async fn open_with_pool(
    url: &str,
    prefix: &TablePrefix,
    slots: SlotCount,
    pool_size: Option<u32>,
) -> Result<Database> {
    match kind_of(url)? {
        "postgres" => {
            let pool = PgStore::connect_pool(url, pool_size.unwrap_or(PG_POOL))
                .await
                .context("cannot connect to PostgreSQL")?;
            orchestrator_postgres::migrate_with(&pool, prefix, slots, crate::demo::PG_SCHEMA)
                .await
                .context("migration failed")?;
            Ok(Database::Postgres(PgStore::open(pool, prefix.clone()).await?))
        }
        _ => {
            let pool = SqliteStore::connect_pool(url, pool_size.unwrap_or(SQLITE_POOL))
                .await
                .context("cannot open the SQLite database")?;
            orchestrator_sqlite::migrate_with(&pool, prefix, slots, crate::demo::SQLITE_SCHEMA)
                .await
                .context("migration failed")?;
            Ok(Database::Sqlite(SqliteStore::open(pool, prefix.clone()).await?))
        }
    }
}
