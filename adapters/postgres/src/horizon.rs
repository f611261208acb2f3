//! The read horizon: the transaction id below which every appending transaction has ended, so a
//! reader may read everything below it without ever missing an event that commits later.
//!
//! Only transactions that append to this events table count. Each one *registers* before its
//! first write by taking a shared, transaction-scoped advisory lock on a key made of a constant
//! and the events table's OID (unique in its database, so tables of the same name in other
//! schemas, other prefixes and other databases have other keys); its transaction id is assigned later, at its first write, and PostgreSQL
//! holds an exclusive lock on that id until the transaction ends. A reader computes the horizon in
//! one statement:
//!
//! `H = min(xmax(S), ids of the registered transactions that hold one)`
//!
//! where `xmax(S)` is the first unassigned transaction id of the statement's snapshot `S`, taken
//! before it reads `pg_locks`. Why nothing below `H` can become visible after a later read:
//! - an appender whose id is at or above `xmax(S)` is above `H`;
//! - an appender with an id below `xmax(S)` took its id after registering, so it was registered
//!   before `S`; if it still runs when `pg_locks` is read, its id is in the minimum; if it ended
//!   before, it ended before every later statement's snapshot, which sees its events (or it
//!   rolled back).
//!
//! The events are then read by a *later* statement, whose snapshot is taken after `pg_locks` was
//! read. A long transaction that does not append (another service's report, a projection's slow
//! read-model transaction, another database of the server) holds nobody back.
//!
//! Costs: `pg_locks` is read once per horizon refresh, and readers keep the greatest horizon seen
//! (a horizon, once safe, stays safe) so a reader working through a backlog refreshes it only when
//! it reaches it. Transactions that append must not `PREPARE TRANSACTION` (a prepared transaction's
//! locks have no backend to match against its transaction id).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrator_core::ports::StoreResult;

use crate::error::classify;

/// High 32 bits of the appender registration lock's key (an arbitrary constant: "orca"); the low
/// 32 bits are the events table's OID. `pg_locks` shows such a lock (a single 64-bit key) with
/// `classid` = the high half, `objid` = the low half and `objsubid` = 1.
const APPENDER_SPACE: i64 = 0x6f72_6361;

/// The horizon of one events table: the registration key and the greatest horizon seen.
#[derive(Debug)]
pub(crate) struct Horizon {
    /// The events table's OID: the low half of the registration lock's key.
    table_oid: u32,
    greatest: AtomicU64,
}

/// The conditions on a `pg_locks` row `a` of a transaction registered as an appender to this
/// table (`$1`, `$2`), in this database.
const REGISTERED: &str = "a.locktype = 'advisory' AND a.granted AND a.objsubid = 1 \
     AND a.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND a.classid = $1::int8::oid AND a.objid = $2::int8::oid";

/// The horizon now (see `Horizon::refresh`), on `$1`, `$2` as in `REGISTERED`.
static REFRESH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH s AS MATERIALIZED (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax), \
              l AS MATERIALIZED (SELECT locktype, granted, objsubid, database, classid, objid, \
                                        pid, transactionid, mode FROM pg_locks), \
              ids AS (SELECT (SELECT xmax FROM s) AS xmax, x.transactionid::text::bigint AS id \
                      FROM l AS a JOIN l AS x ON x.pid = a.pid \
                      WHERE {REGISTERED} AND x.locktype = 'transactionid' AND x.granted \
                        AND x.mode = 'ExclusiveLock') \
         SELECT LEAST((SELECT xmax FROM s), \
                      (SELECT min(xmax - ((xmax - id) & 4294967295)) FROM ids \
                       WHERE ((xmax - id) & 4294967295) < 2147483648))"
    )
});

/// How long the oldest registered appender has run, in seconds (see `Horizon::stall`).
static STALL_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - MIN(act.xact_start)), 0)::float8 \
         FROM pg_locks AS a JOIN pg_stat_activity AS act ON act.pid = a.pid \
         WHERE {REGISTERED} AND act.backend_xid IS NOT NULL"
    )
});

impl Horizon {
    /// The horizon of the events table whose OID is `table_oid`.
    pub(crate) fn new(table_oid: u32) -> Self {
        Self { table_oid, greatest: AtomicU64::new(0) }
    }

    /// The events table's OID, as the search path resolves `events_table` on `conn`.
    pub(crate) async fn table_oid(
        conn: &mut sqlx::PgConnection,
        events_table: &str,
    ) -> StoreResult<u32> {
        let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::int8")
            .bind(events_table)
            .fetch_one(conn)
            .await
            .map_err(|e| classify("find the events table", e))?;
        Ok(oid as u32)
    }

    /// The first key of this table's per-stream locks (two 32-bit keys: this, and a hash of the
    /// stream): the table's OID, bit for bit.
    pub(crate) fn stream_lock_space(&self) -> i32 {
        self.table_oid as i32
    }

    fn key(&self) -> i64 {
        (APPENDER_SPACE << 32) | i64::from(self.table_oid)
    }

    /// The greatest horizon computed so far (0 before the first refresh).
    pub(crate) fn cached(&self) -> u64 {
        self.greatest.load(Ordering::Acquire)
    }

    /// Registers the transaction on `conn` as an appender to this table. Must run before the
    /// transaction's first write.
    pub(crate) async fn register(&self, conn: &mut sqlx::PgConnection) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1::int8)")
            .bind(self.key())
            .execute(conn)
            .await
            .map_err(|e| classify("register an appender", e))?;
        Ok(())
    }

    /// Computes the horizon now (one statement, which must not run inside the reader's
    /// transaction) and remembers it if it is the greatest so far.
    pub(crate) async fn refresh(&self, pool: &sqlx::PgPool) -> StoreResult<u64> {
        // Transaction ids in pg_locks are 32 bits; each is widened against xmax(S), which is less
        // than 2^31 ids ahead of any running transaction. A registered transaction whose id was
        // assigned after S (it would wrap around here) is at or above xmax(S) and left out.
        // pg_locks is read once (materialized), as one consistent view of the lock table.
        let horizon: i64 = sqlx::query_scalar(&REFRESH_SQL)
            .bind(APPENDER_SPACE)
            .bind(i64::from(self.table_oid))
            .fetch_one(pool)
            .await
            .map_err(|e| classify("read the read horizon", e))?;
        let horizon = horizon.max(0) as u64;
        Ok(self.greatest.fetch_max(horizon, Ordering::AcqRel).max(horizon))
    }

    /// How long the oldest registered appender that has written anything has been running: how
    /// long readers may have been held back. Zero when none runs.
    pub(crate) async fn stall(&self, pool: &sqlx::PgPool) -> StoreResult<Duration> {
        let seconds: f64 = sqlx::query_scalar(&STALL_SQL)
            .bind(APPENDER_SPACE)
            .bind(i64::from(self.table_oid))
            .fetch_one(pool)
            .await
            .map_err(|e| classify("read the transaction horizon", e))?;
        Ok(Duration::from_secs_f64(seconds.max(0.0)))
    }
}
