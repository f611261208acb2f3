//! The event store port on PostgreSQL.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, Backlog, EventStore, ReadRequest, StoreError, StoreResult, check_append,
};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, Position, Slot, SlotCount, StreamId, Timestamp,
    Tracing, fnv1a_32,
};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::{classify, unique_violation_detail};
use crate::{PgStore, PgTx};

/// Namespace of the advisory locks appends take per stream (an arbitrary constant: "orch").
const STREAM_LOCK_SPACE: i32 = 0x6f72_6368;

#[async_trait]
impl EventStore for PgStore {
    fn slot_count(&self) -> SlotCount {
        self.slot_count
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        let (tx, appended) = self.append_uncommitted(stream, expected, &events).await?;
        tx.commit().await.map_err(|e| duplicate_or(e, &self.tables.events, &events))?;
        Ok(appended)
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        if request.cursors.is_empty() || request.limit == 0 {
            return Ok(Vec::new());
        }
        let every_slot = request.cursors.len() == self.slot_count.get() as usize
            && request
                .cursors
                .iter()
                .map(|(s, _)| s)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == request.cursors.len();
        let (sql, cursors, planned_each_time) = match request.uniform_cursor() {
            Some(after) if every_slot => {
                (read_all_slots_sql(&self.tables.events), vec![(None, after)], true)
            }
            _ => (
                read_per_slot_sql(&self.tables.events, request.cursors.len()),
                request.cursors.iter().map(|(s, p)| (Some(*s), *p)).collect(),
                false,
            ),
        };
        // The one-range read is planned at every call (0.3 ms): a plan cached while the events
        // table was empty sorts everything after the cursor instead of walking the index, and
        // would be kept until autovacuum analyzed the table. The per-slot read costs too much to
        // plan each time (17 ms for 256 slots) and has no such cheaper-looking alternative.
        let mut query = sqlx::query(&sql)
            .persistent(!planned_each_time)
            .bind(request.limit as i64)
            .bind(&request.scope.aggregate_types)
            .bind(&request.scope.bounded_contexts);
        for (slot, after) in cursors {
            if let Some(slot) = slot {
                query = query.bind(slot.0 as i32);
            }
            query = query.bind(after.commit as i64).bind(after.global as i64);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(|e| classify("read events", e))?;
        rows.iter().map(event_from_row).collect()
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        if request.cursors.is_empty() {
            return Ok(Backlog::default());
        }
        // Every committed event counts, also those above the read horizon: they are lag too.
        // The count stops at the limit ($1): counting a backlog of millions every few seconds
        // would cost more than processing it. The age comes from each slot's next event.
        let sql = format!(
            "WITH c AS (SELECT * FROM unnest($4::int[], $5::bigint[], $6::bigint[]) \
                 AS c(slot, commit_position, global_position)) \
             SELECT (SELECT count(*) FROM (SELECT 1 FROM c JOIN {events} AS e ON e.slot = c.slot \
                       AND (e.transaction_id, e.global_position) > (c.commit_position::text::xid8, c.global_position) \
                       WHERE true {SCOPE} LIMIT $1) AS counted), \
                    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(next.created_at))::float8 \
                     FROM c CROSS JOIN LATERAL (SELECT e.created_at FROM {events} AS e WHERE e.slot = c.slot \
                       AND (e.transaction_id, e.global_position) > (c.commit_position::text::xid8, c.global_position) \
                       {SCOPE} ORDER BY e.transaction_id, e.global_position LIMIT 1) AS next)",
            events = self.tables.events
        );
        let (slots, (commits, globals)): (Vec<i32>, (Vec<i64>, Vec<i64>)) = request
            .cursors
            .iter()
            .map(|(slot, p)| (slot.0 as i32, (p.commit as i64, p.global as i64)))
            .unzip();
        let err = |e| classify("count the backlog", e);
        let row = sqlx::query(&sql)
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .bind(&request.scope.aggregate_types)
            .bind(&request.scope.bounded_contexts)
            .bind(&slots)
            .bind(&commits)
            .bind(&globals)
            .fetch_one(&self.pool)
            .await
            .map_err(err)?;
        let events: i64 = row.try_get(0).map_err(err)?;
        let age: Option<f64> = row.try_get(1).map_err(err)?;
        Ok(Backlog {
            events: events.max(0) as u64,
            oldest_age: age.map(|seconds| Duration::from_secs_f64(seconds.max(0.0))),
        })
    }

    async fn read_horizon_stall(&self) -> StoreResult<Option<Duration>> {
        self.horizon_stall().await.map(Some)
    }
}

impl PgStore {
    /// Appends like [`EventStore::append`] but leaves the transaction open: nothing is visible
    /// until the caller commits it, and dropping it appends nothing.
    ///
    /// The append is the transaction's first write, as the per-stream order requires; the caller
    /// may write more (an outbox row, say) before committing. Holding it open holds back every
    /// reader's horizon, which is what the gap-safety tests and `demo append --hold-open` exercise.
    pub async fn append_uncommitted(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> StoreResult<(PgTx, Appended)> {
        let err = |e| classify("append", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        // Lock the stream before any write: the transaction id is assigned at the first write,
        // after the previous appender to this stream committed, so ids follow versions.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(STREAM_LOCK_SPACE)
            .bind(stream.to_string())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let current: i64 = sqlx::query_scalar(&format!(
            "SELECT COALESCE(MAX(aggregate_version), 0) FROM {} \
             WHERE bounded_context = $1 AND aggregate_type = $2 AND aggregate_id = $3",
            self.tables.events
        ))
        .bind(&stream.bounded_context)
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let current = current as u64;
        check_append(stream, expected, current, events)?;
        if events.is_empty() {
            return Ok((tx, Appended { first_global: 1, last_global: 0, version: current }));
        }

        let n = events.len() as u64;
        let hash = fnv1a_32(stream.aggregate_id.as_bytes());
        let slot = self.slot_count.slot_of_hash(hash);
        let versions: Vec<i64> = (1..=n).map(|i| (current + i) as i64).collect();
        let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let type_versions: Vec<i32> = events.iter().map(|e| e.event_version as i32).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
        let metadata: Vec<&str> = events.iter().map(|e| e.metadata.as_str()).collect();
        let causation: Vec<Option<&str>> =
            events.iter().map(|e| e.tracing.causation_id.as_deref()).collect();
        let correlation: Vec<Option<&str>> =
            events.iter().map(|e| e.tracing.correlation_id.as_deref()).collect();
        let trace: Vec<Option<&str>> =
            events.iter().map(|e| e.tracing.trace_id.as_deref()).collect();
        let inserted: Vec<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO {} (bounded_context, aggregate_type, aggregate_id, aggregate_version, slot, \
                 partition_hash, event_id, event_type, event_version, payload, metadata, \
                 causation_id, correlation_id, trace_id) \
             SELECT $1, $2, $3, v, $4, $5, id::uuid, t, tv, p, m::jsonb, c, r, tr \
             FROM unnest($6::bigint[], $7::text[], $8::text[], $9::int[], $10::bytea[], $11::text[], \
                         $12::text[], $13::text[], $14::text[]) \
                  AS e(v, id, t, tv, p, m, c, r, tr) \
             RETURNING global_position",
            self.tables.events
        ))
        .bind(&stream.bounded_context)
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(slot.0 as i32)
        .bind(i64::from(hash))
        .bind(&versions)
        .bind(&ids)
        .bind(&types)
        .bind(&type_versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(&causation)
        .bind(&correlation)
        .bind(&trace)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| duplicate_or(e, &self.tables.events, events))?;
        // Delivered at commit, and only if it commits: wakes idle readers at once.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.tables.events_channel)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let first_global = inserted.iter().copied().min().unwrap_or(0) as u64;
        let last_global = inserted.iter().copied().max().unwrap_or(0) as u64;
        Ok((tx, Appended { first_global, last_global, version: current + n }))
    }
}

/// The columns of an event as [`event_from_row`] decodes them. The transaction id, event id,
/// metadata and creation time are sent in PostgreSQL's binary form and decoded here, which costs
/// the server nothing (converting them to text in SQL halved read throughput).
const EVENT_COLUMNS: &str = "global_position, transaction_id, bounded_context, aggregate_type, \
     aggregate_id, aggregate_version, slot, event_id, event_type, event_version, payload, metadata, \
     causation_id, correlation_id, trace_id, created_at";

/// The oldest transaction still running: nothing at or above it may be read yet.
const HORIZON: &str =
    "WITH horizon AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) ";

/// Scope filters on `$2` (aggregate types) and `$3` (bounded contexts); empty arrays match all.
const SCOPE: &str = "AND (cardinality($2::text[]) = 0 OR aggregate_type = ANY($2)) \
     AND (cardinality($3::text[]) = 0 OR bounded_context = ANY($3))";

/// Every slot after one common cursor (`$4`, `$5`): one range of the commit-order index.
fn read_all_slots_sql(events: &str) -> String {
    format!(
        "{HORIZON}SELECT {EVENT_COLUMNS} FROM {events} \
         WHERE (transaction_id, global_position) > ($4::text::xid8, $5) \
           AND transaction_id < (SELECT xmin FROM horizon) {SCOPE} \
         ORDER BY transaction_id, global_position LIMIT $1"
    )
}

/// One ordered index range per requested slot (`slot`, `commit`, `global` from `$4` on), each after
/// that slot's cursor and below the horizon, merged by position: PostgreSQL runs this as a Merge
/// Append over index scans, reading about as many rows as it returns whatever share of the slots
/// the reader owns.
fn read_per_slot_sql(events: &str, n_slots: usize) -> String {
    let mut sql = format!("{HORIZON}SELECT {EVENT_COLUMNS} FROM (");
    for i in 0..n_slots {
        let p = 4 + 3 * i;
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        let _ = write!(
            sql,
            "(SELECT * FROM {events} WHERE slot = ${p} \
               AND (transaction_id, global_position) > (${c}::text::xid8, ${g}) \
               AND transaction_id < (SELECT xmin FROM horizon) {SCOPE} \
             ORDER BY transaction_id, global_position LIMIT $1)",
            c = p + 1,
            g = p + 2,
        );
    }
    sql.push_str(") AS e ORDER BY transaction_id, global_position LIMIT $1");
    sql
}

/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The binary wire form of column `index`: `xid8` and `timestamptz` are 8 bytes big-endian, `uuid`
/// 16 bytes, `jsonb` a version byte (1) and the JSON text.
fn raw_column(row: &PgRow, index: usize) -> StoreResult<&[u8]> {
    let corrupt = |message: String| StoreError::Other { message, source: None };
    let value = row.try_get_raw(index).map_err(|e| classify("decode an event", e))?;
    value.as_bytes().map_err(|e| corrupt(format!("column {index} of an event: {e}")))
}

fn raw_i64(row: &PgRow, index: usize) -> StoreResult<i64> {
    let bytes = raw_column(row, index)?;
    <[u8; 8]>::try_from(bytes).map(i64::from_be_bytes).map_err(|_| StoreError::Other {
        message: format!("column {index} of an event has {} bytes, expected 8", bytes.len()),
        source: None,
    })
}

/// Decodes a row selected with [`EVENT_COLUMNS`], by column index (it runs for every event).
fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    let get_err = |e| classify("decode an event", e);
    let event_id = raw_column(row, 7)?;
    let event_id = <[u8; 16]>::try_from(event_id).map(EventId).map_err(|_| StoreError::Other {
        message: format!("event id of {} bytes, expected 16", event_id.len()),
        source: None,
    })?;
    let metadata = match raw_column(row, 11)? {
        [1, json @ ..] => String::from_utf8_lossy(json).into_owned(),
        other => {
            return Err(StoreError::Other {
                message: format!("unknown jsonb format version {:?}", other.first()),
                source: None,
            });
        }
    };
    let created_micros = raw_i64(row, 15)?.saturating_add(PG_EPOCH_MICROS);
    Ok(Event {
        position: Position {
            commit: raw_i64(row, 1)? as u64,
            global: row.try_get::<i64, _>(0).map_err(get_err)? as u64,
        },
        stream: StreamId {
            bounded_context: row.try_get(2).map_err(get_err)?,
            aggregate_type: row.try_get(3).map_err(get_err)?,
            aggregate_id: row.try_get(4).map_err(get_err)?,
        },
        aggregate_version: row.try_get::<i64, _>(5).map_err(get_err)? as u64,
        slot: Slot(row.try_get::<i32, _>(6).map_err(get_err)? as u32),
        event_id,
        event_type: row.try_get(8).map_err(get_err)?,
        event_version: row.try_get::<i32, _>(9).map_err(get_err)? as u32,
        payload: row.try_get(10).map_err(get_err)?,
        metadata,
        tracing: Tracing {
            causation_id: row.try_get(12).map_err(get_err)?,
            correlation_id: row.try_get(13).map_err(get_err)?,
            trace_id: row.try_get(14).map_err(get_err)?,
        },
        created_at: Timestamp((created_micros / 1000).max(0) as u64),
    })
}

/// A unique violation on the event id becomes `DuplicateEvent`, naming the id from the detail.
fn duplicate_or(err: sqlx::Error, events_table: &str, batch: &[NewEvent]) -> StoreError {
    match unique_violation_detail(&err, &format!("{events_table}_event_id_key")) {
        Some(detail) => {
            let event_id = batch
                .iter()
                .map(|e| e.event_id)
                .find(|id| detail.contains(&id.to_string()))
                .unwrap_or(batch[0].event_id);
            StoreError::DuplicateEvent { event_id }
        }
        None => classify("append", err),
    }
}
