//! PostgreSQL implementation of every port of `orchestrator-core`, on sqlx.
//!
//! - Events are read gap-safe: each event records its transaction's id (`xid8`), and readers only
//!   read below the oldest *appending* transaction still running, in
//!   `(transaction_id, global_position)` order, so an event whose transaction commits after a later
//!   one was read is still delivered. Appenders register before their first write (a shared
//!   advisory lock); transactions that do not append to this events table never hold readers back.
//!   [`PgStore::horizon_stall`] tells how long the oldest running appender holds readers back.
//! - Appends, and units of work ([`PgUnitOfWork`]), lock their streams before anything else, so a
//!   stream's events get increasing transaction ids in version order.
//! - Commits are fenced: one statement in the committing transaction locks the replica set's row
//!   `FOR SHARE` and checks the slot rows against the worker's epochs, so a concurrent change of
//!   owner either waits for the commit or makes it fail with `Fenced`, rolling back the
//!   projection's writes.
//! - All coordination times use the database's `clock_timestamp()`.
#![deny(missing_docs)]

mod begin;
mod change_feed;
mod checkpoint_store;
mod coordination_store;
mod dead_letters;
mod error;
mod event_store;
mod fencing;
mod horizon;
mod migrate;
mod read_plan;
pub mod testing;
mod unit_of_work;

use std::time::Duration;

use orchestrator_core::ports::StoreResult;
use orchestrator_core::{SlotCount, TablePrefix};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The idle-in-transaction limit [`PgStore::tune`] sets: a worker's handler timeout must be
/// shorter, or the server would end a slow batch's session before the worker abandons it.
pub const IDLE_IN_TRANSACTION_LIMIT: Duration = Duration::from_secs(60);

pub use change_feed::PgChangeFeed;
pub use error::classify as classify_error;
pub use fencing::{Claim, Fencing, FencingTx};
pub use migrate::{migrate, migrate_with};
pub use unit_of_work::PgUnitOfWork;

use crate::checkpoint_store::CheckpointSql;
use crate::coordination_store::CoordinationSql;
use crate::dead_letters::DeadLetterSql;
use crate::error::classify;
use crate::event_store::EventSql;
use crate::horizon::Horizon;
use crate::read_plan::ReadPlan;
use crate::unit_of_work::UnitOfWorkSql;

/// The transaction a transactional projection writes its read model through.
pub type PgTx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Every port of the orchestrator on one PostgreSQL database. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    tables: std::sync::Arc<Tables>,
    sql: std::sync::Arc<Statements>,
    slot_count: SlotCount,
    horizon: std::sync::Arc<Horizon>,
    read_plan: std::sync::Arc<ReadPlan>,
    fencing: Fencing,
}

/// Table names under the configured prefix.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) events: String,
    replica_sets: String,
    leases: String,
    workers: String,
    slots: String,
    generations: String,
    checkpoints: String,
    progress: String,
    pub(crate) stopped_projections: String,
    pub(crate) dead_letters: String,
    pub(crate) skipped_letters: String,
    /// NOTIFY channel of appends.
    pub(crate) events_channel: String,
    /// NOTIFY channel of coordination changes (payload: the replica set).
    coordination_channel: String,
}

/// Every statement whose text does not depend on the call, built once when the store opens
/// (the fenced commit's are in [`Fencing`]).
#[derive(Debug)]
struct Statements {
    coordination: CoordinationSql,
    checkpoints: CheckpointSql,
    dead_letters: DeadLetterSql,
    events: EventSql,
    units_of_work: UnitOfWorkSql,
}

impl Statements {
    fn new(tables: &Tables, slot_count: SlotCount) -> Self {
        Self {
            coordination: CoordinationSql::new(tables),
            checkpoints: CheckpointSql::new(tables),
            dead_letters: DeadLetterSql::new(tables),
            events: EventSql::new(tables, slot_count),
            units_of_work: UnitOfWorkSql::new(tables),
        }
    }
}

impl PgStore {
    /// Opens a store on a migrated database (see [`migrate`]).
    ///
    /// The store's own transactions are opened so that a cancelled caller never returns a
    /// connection to the pool inside a transaction (sqlx's `Pool::begin` can, on PostgreSQL).
    /// If the application shares `pool` and cancels its own `pool.begin()` futures (a
    /// `select!` or a timeout around them), the same can happen to its connections, and the
    /// store's next statement on one runs in that leaked transaction: give the store a pool of
    /// its own, or begin the application's transactions through [`PgUnitOfWork`] or
    /// [`CheckpointStore::begin`](orchestrator_core::ports::CheckpointStore::begin).
    pub async fn open(pool: PgPool, prefix: TablePrefix) -> StoreResult<Self> {
        let mut conn = pool.acquire().await.map_err(|e| classify("connect", e))?;
        let slot_count = migrate::stored_slot_count(&mut conn, prefix.as_str(), None).await?;
        let events_oid =
            Horizon::table_oid(&mut conn, &format!("{}events", prefix.as_str())).await?;
        drop(conn);
        let p = prefix.as_str();
        let tables = Tables {
            events: format!("{p}events"),
            replica_sets: format!("{p}replica_sets"),
            leases: format!("{p}leases"),
            workers: format!("{p}workers"),
            slots: format!("{p}slots"),
            generations: format!("{p}generations"),
            checkpoints: format!("{p}checkpoints"),
            progress: format!("{p}progress"),
            stopped_projections: format!("{p}stopped_projections"),
            dead_letters: format!("{p}dead_letters"),
            skipped_letters: format!("{p}skipped_letters"),
            events_channel: format!("{p}events"),
            coordination_channel: format!("{p}coordination"),
        };
        let horizon = std::sync::Arc::new(Horizon::new(events_oid));
        let read_plan = std::sync::Arc::new(ReadPlan::new(events_oid));
        let sql = std::sync::Arc::new(Statements::new(&tables, slot_count));
        let tables = std::sync::Arc::new(tables);
        let fencing = Fencing::new(&tables);
        Ok(Self { pool, tables, sql, slot_count, horizon, read_plan, fencing })
    }

    /// Connects a pool to `url` with [`PgStore::pool_options`] and [`PgStore::tune`]'s session
    /// settings.
    pub async fn connect_pool(url: &str, max_connections: u32) -> StoreResult<PgPool> {
        let options: PgConnectOptions =
            url.parse().map_err(|e| classify("parse the database URL", e))?;
        let options = Self::tune(options);
        Self::pool_options(max_connections)
            .connect_with(options)
            .await
            .map_err(|e| classify("connect to PostgreSQL", e))
    }

    /// The pool options the store is built for: `max_connections` connections; a 5 s acquire
    /// timeout, so that an unreachable database is reported promptly; and no test of a connection
    /// before each acquire. The test is a round trip to the server in front of every batch's
    /// transaction and every read; a connection the server has dropped fails its first statement
    /// instead, with an error the workers retry (`Unavailable`), and is not returned to the pool.
    pub fn pool_options(max_connections: u32) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
    }

    /// Session settings the store relies on; apply them to a pool you build yourself.
    ///
    /// - `plan_cache_mode = force_generic_plan`: a reader owning many slots sends one query with a
    ///   branch per slot; planning it takes longer than running it, and its plan does not depend on
    ///   the values, so each connection plans it once.
    /// - `idle_in_transaction_session_timeout = 60s`: readers cannot pass the oldest open
    ///   transaction that wrote anything, so a worker frozen in the middle of a batch (SIGSTOP, a
    ///   long GC pause) would hold every projection in the cluster back. The server ends such a
    ///   session after this long; the frozen worker's commit then fails and it is fenced.
    pub fn tune(options: PgConnectOptions) -> PgConnectOptions {
        Self::tune_with(options, IDLE_IN_TRANSACTION_LIMIT)
    }

    /// [`PgStore::tune`] with another idle-in-transaction limit.
    pub fn tune_with(options: PgConnectOptions, idle_in_transaction: Duration) -> PgConnectOptions {
        let idle = format!("{}ms", idle_in_transaction.as_millis().max(1));
        options.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("idle_in_transaction_session_timeout", idle.as_str()),
        ])
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How long the oldest transaction appending to this events table that has written anything
    /// has been running: readers cannot read past it, so this is how long event delivery may be
    /// held back. Zero when none runs. Other transactions (other tables, other databases) never
    /// hold readers back.
    pub async fn horizon_stall(&self) -> StoreResult<Duration> {
        self.horizon.stall(&self.pool).await
    }

    /// The read horizon now: the transaction id below which every appender has ended, so every
    /// event below it is visible and none can appear there later. Readers return only events below
    /// it; tests wait on it.
    pub async fn read_horizon(&self) -> StoreResult<u64> {
        self.horizon.refresh(&self.pool).await
    }
}

/// Milliseconds as a `u64`, for SQL interval arithmetic.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A non-negative millisecond count from SQL as a `Duration`.
fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
