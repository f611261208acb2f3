//! Whether the one-range read (a reader of every slot from one cursor) may run on a cached plan.
//!
//! That read walks the commit-order index from the cursor and stops after `limit` rows. Planned
//! while the events table is small, PostgreSQL prefers a bitmap scan and a sort of everything after
//! the cursor (cheaper on a few pages), and a prepared statement's generic plan made then is kept
//! by its connection after the table has grown: a worker started on an empty table read 5.5 to 8
//! rows per event until autovacuum analyzed the table. So while the table is small the read is
//! planned at every call, which costs a round trip and the planning (about a quarter of a
//! 1000-event read); once the table is large enough that only the index walk can be cheapest, the
//! statement is prepared once per connection. A plan made then stays right: a table that shrinks
//! again is still read well by the index walk.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Pages of the events table from which the one-range read's plan is cached: 32 MiB with 8 KiB
/// pages, about 70,000 events of 450 bytes. Measured on tables never analyzed (the planner then
/// goes by their size on disk), the generic plan was the sort at 228 pages and the index walk at
/// 910; a test checks it at this size.
const LARGE_TABLE_PAGES: i64 = 4096;

/// The size on disk of the table whose OID is `$1`, in pages.
const TABLE_PAGES: &str =
    "SELECT pg_relation_size($1::int8::oid) / current_setting('block_size')::int8";

/// How often a small table's size is looked at again.
const RECHECK: Duration = Duration::from_secs(10);

/// What this store knows of its events table's size, for [`ReadPlan::cacheable`].
#[derive(Debug)]
pub(crate) struct ReadPlan {
    table_oid: u32,
    large: AtomicBool,
    checked_at: Mutex<Option<Instant>>,
}

impl ReadPlan {
    /// For the events table whose OID is `table_oid`.
    pub(crate) fn new(table_oid: u32) -> Self {
        Self { table_oid, large: AtomicBool::new(false), checked_at: Mutex::new(None) }
    }

    /// Whether the one-range read may be a prepared statement: the table was seen large. Looks
    /// at its size at most every [`RECHECK`] while it is small; a failed look says no (the read
    /// itself reports the store's trouble).
    pub(crate) async fn cacheable(&self, pool: &PgPool) -> bool {
        if self.large.load(Ordering::Relaxed) {
            return true;
        }
        {
            let mut checked_at = self.checked_at.lock().expect("never poisoned");
            if checked_at.is_some_and(|at| at.elapsed() < RECHECK) {
                return false;
            }
            *checked_at = Some(Instant::now());
        }
        let pages = sqlx::query_scalar::<_, i64>(TABLE_PAGES)
            .bind(i64::from(self.table_oid))
            .fetch_one(pool)
            .await;
        let large = pages.is_ok_and(|pages| pages >= LARGE_TABLE_PAGES);
        if large {
            self.large.store(true, Ordering::Relaxed);
        }
        large
    }
}

#[cfg(test)]
mod tests {
    use orchestrator_core::SlotCount;
    use sqlx::Row;

    use super::{LARGE_TABLE_PAGES, ReadPlan, TABLE_PAGES};
    use crate::testing::TestSchema;

    /// The generic plan of the one-range read, as a prepared statement would keep it.
    async fn generic_plan(pool: &sqlx::PgPool) -> String {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        let sql = crate::event_store::read_all_slots_sql("orch_events");
        sqlx::raw_sql(&format!(
            "PREPARE one_range(bigint, text[], text[], text, text, bigint) AS {sql}"
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
        let rows = sqlx::raw_sql("EXPLAIN EXECUTE one_range(1000, '{}', '{}', '99999999', '0', 0)")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n");
        sqlx::raw_sql("DEALLOCATE one_range").execute(&mut *conn).await.unwrap();
        plan
    }

    /// Small: no cached plan (and the generic plan there is indeed the sort). Once the table
    /// reaches the threshold, never analyzed, the generic plan walks the index and the read may
    /// be cached.
    #[tokio::test]
    async fn the_read_is_cached_only_once_the_table_is_large_enough_for_the_index_walk() {
        let Some(schema) = TestSchema::start(SlotCount::default()).await else { return };
        let oid: i64 = sqlx::query_scalar("SELECT 'orch_events'::regclass::oid::int8")
            .fetch_one(&schema.pool)
            .await
            .unwrap();
        let plan = ReadPlan::new(oid as u32);
        assert!(!plan.cacheable(&schema.pool).await, "an empty table");
        assert!(generic_plan(&schema.pool).await.contains("Sort"), "the hazard is gone?");
        sqlx::query("ALTER TABLE orch_events SET (autovacuum_enabled = false)")
            .execute(&schema.pool)
            .await
            .unwrap();
        for batch in 0.. {
            let pages: i64 =
                sqlx::query_scalar(TABLE_PAGES).bind(oid).fetch_one(&schema.pool).await.unwrap();
            if pages >= LARGE_TABLE_PAGES {
                break;
            }
            sqlx::query(
                "INSERT INTO orch_events (bounded_context, aggregate_type, aggregate_id, \
                     aggregate_version, slot, partition_hash, event_id, event_type, event_version, \
                     payload, metadata) \
                 SELECT 'test', 'Account', 'acct-' || i, 1, i % 256, 0, gen_random_uuid(), \
                     'Deposited', 1, decode(repeat('78', 300), 'hex'), '{}'::jsonb \
                 FROM generate_series($1::int8 * 10000, $1::int8 * 10000 + 9999) AS s(i)",
            )
            .bind(batch as i64)
            .execute(&schema.pool)
            .await
            .unwrap();
        }
        assert!(!plan.cacheable(&schema.pool).await, "looked at again before the recheck interval");
        let fresh = ReadPlan::new(oid as u32);
        assert!(fresh.cacheable(&schema.pool).await, "the table is large");
        let generic = generic_plan(&schema.pool).await;
        assert!(!generic.contains("Sort"), "a generic plan at the threshold sorts:\n{generic}");
        assert!(generic.contains("Index Scan"), "{generic}");
        schema.drop_schema().await;
    }
}
