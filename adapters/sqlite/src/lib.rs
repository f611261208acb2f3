//! SQLite implementation of every port of `orchestrator-core`, on sqlx: the embedded default.
//!
//! The database file is opened in WAL mode with a busy timeout, so several worker processes can
//! share it. Every writing transaction starts with `BEGIN IMMEDIATE`: it takes SQLite's single
//! write lock up front, so a fenced commit's ownership check and its writes cannot interleave with a
//! change of owner, and a read-then-write transaction never fails to upgrade.
//! With one writer at a time, events become visible in `global_position` order, so reads need no gap
//! protection and positions carry no commit key (it is always 0).
//! Times are integer milliseconds from SQLite's own clock.
#![deny(missing_docs)]

mod checkpoint_store;
mod coordination_store;
mod dead_letters;
mod error;
mod event_store;
mod migrate;
mod unit_of_work;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ports::StoreResult;
use orchestrator_core::{SlotCount, TablePrefix};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use error::classify as classify_error;
pub use migrate::{migrate, migrate_with};
pub use unit_of_work::SqliteUnitOfWork;

use crate::checkpoint_store::CheckpointSql;
use crate::coordination_store::CoordinationSql;
use crate::dead_letters::DeadLetterSql;
use crate::error::classify;
use crate::event_store::EventSql;
use crate::unit_of_work::UnitOfWorkSql;

/// The transaction a transactional projection writes its read model through.
pub type SqliteTx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// SQLite's clock in milliseconds since the Unix epoch.
pub(crate) const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// Every port of the orchestrator on one SQLite database. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Statements>,
    slot_count: SlotCount,
}

/// The store's tables, named under its prefix: what its statements are built from.
#[derive(Debug)]
pub(crate) struct Tables {
    events: String,
    replica_sets: String,
    workers: String,
    slots: String,
    generations: String,
    checkpoints: String,
    stopped_projections: String,
    dead_letters: String,
    skipped_letters: String,
}

/// Every statement of the store, built once when it opens: a call only binds its arguments.
#[derive(Debug)]
pub(crate) struct Statements {
    coordination: CoordinationSql,
    checkpoints: CheckpointSql,
    dead_letters: DeadLetterSql,
    events: EventSql,
    unit_of_work: UnitOfWorkSql,
}

impl Statements {
    fn new(t: &Tables) -> Self {
        Self {
            coordination: CoordinationSql::new(t),
            checkpoints: CheckpointSql::new(t),
            dead_letters: DeadLetterSql::new(t),
            events: EventSql::new(t),
            unit_of_work: UnitOfWorkSql::new(t),
        }
    }
}

impl SqliteStore {
    /// Opens a store on a migrated database (see [`migrate`]).
    pub async fn open(pool: SqlitePool, prefix: TablePrefix) -> StoreResult<Self> {
        let mut conn = pool.acquire().await.map_err(|e| classify("open the database", e))?;
        let slot_count = migrate::stored_slot_count(&mut conn, prefix.as_str(), None).await?;
        drop(conn);
        let p = prefix.as_str();
        let tables = Tables {
            events: format!("{p}events"),
            replica_sets: format!("{p}replica_sets"),
            workers: format!("{p}workers"),
            slots: format!("{p}slots"),
            generations: format!("{p}generations"),
            checkpoints: format!("{p}checkpoints"),
            stopped_projections: format!("{p}stopped_projections"),
            dead_letters: format!("{p}dead_letters"),
            skipped_letters: format!("{p}skipped_letters"),
        };
        Ok(Self { pool, sql: Arc::new(Statements::new(&tables)), slot_count })
    }

    /// Opens (creating if missing) the database at `url` (`sqlite:orchestrator.db`) in WAL mode
    /// with a 5 s busy timeout.
    pub async fn connect_pool(url: &str, max_connections: u32) -> StoreResult<SqlitePool> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| classify("parse the database URL", e))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // Switching a new file to WAL needs a moment of exclusive access; several processes
        // opening it at once can be told "database is locked" without waiting. Try again.
        let mut attempt: u32 = 0;
        loop {
            let opened = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                // A file's connection cannot be dropped by a server: testing it before each
                // acquire is only a trip to its thread in front of every transaction.
                .test_before_acquire(false)
                .connect_with(options.clone())
                .await
                .map_err(|e| classify("open the SQLite database", e));
            match opened {
                Err(err) if err.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                }
                result => return result,
            }
        }
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Begins a writing transaction (`BEGIN IMMEDIATE`).
    pub(crate) async fn begin_write(&self, what: &str) -> StoreResult<SqliteTx> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(|e| classify(what, e))
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
