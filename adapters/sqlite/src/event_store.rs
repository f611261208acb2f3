//! The event store port on SQLite.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, Backlog, EventStore, ReadRequest, StoreError, StoreResult, append_in_unit_of_work,
};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, PartitionKey, Position, Slot, SlotCount, StreamId,
    Timestamp, Tracing,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::error::classify;
use crate::{NOW_MS, SqliteStore};

#[async_trait]
impl EventStore for SqliteStore {
    fn slot_count(&self) -> SlotCount {
        self.slot_count
    }

    async fn append_with_key<'k>(
        &self,
        stream: &StreamId,
        key: Option<&'k PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        append_in_unit_of_work(self, stream, key, expected, events).await
    }

    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>> {
        let mut conn = self.pool.acquire().await.map_err(|e| classify("read a stream", e))?;
        read_stream_on(&mut conn, &self.tables.events, stream, from_version).await
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        if request.cursors.is_empty() || request.limit == 0 {
            return Ok(Vec::new());
        }
        let scope_values =
            request.scope.aggregate_types.iter().chain(&request.scope.bounded_contexts);
        let mut query;
        let sql;
        if let Some(after) = request.uniform_cursor() {
            let every_slot = request.cursors.len() == self.slot_count.get() as usize;
            sql = read_range_sql(&self.tables.events, request, every_slot);
            query = sqlx::query(&sql).bind(after.global as i64);
            if !every_slot {
                for (slot, _) in &request.cursors {
                    query = query.bind(slot.0 as i64);
                }
            }
            for value in scope_values {
                query = query.bind(value);
            }
        } else {
            sql = read_merge_sql(&self.tables.events, request);
            query = sqlx::query(&sql);
            for (slot, after) in &request.cursors {
                query = query.bind(slot.0 as i64).bind(after.global as i64);
                for value in scope_values.clone() {
                    query = query.bind(value);
                }
                query = query.bind(request.limit as i64);
            }
        }
        query = query.bind(request.limit as i64);
        let rows = query.fetch_all(&self.pool).await.map_err(|e| classify("read events", e))?;
        rows.iter().map(event_from_row).collect()
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        if request.cursors.is_empty() {
            return Ok(Backlog::default());
        }
        let cursors: Vec<String> =
            request.cursors.iter().map(|(slot, p)| format!("[{},{}]", slot.0, p.global)).collect();
        // Scope values are numbered from ?3, so the filter can appear twice with one binding.
        let types = request.scope.aggregate_types.len();
        let numbered = |column: &str, first: usize, n: usize| {
            if n == 0 {
                String::new()
            } else {
                let params: Vec<String> = (first..first + n).map(|i| format!("?{i}")).collect();
                format!(" AND e.{column} IN ({})", params.join(", "))
            }
        };
        let scope = numbered("aggregate_type", 3, types)
            + &numbered("bounded_context", 3 + types, request.scope.bounded_contexts.len());
        // The count stops at the limit, so its cost stays bounded however far behind the cursors
        // are; the age comes from each slot's next event.
        let sql = format!(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM json_each(?1) AS c \
                       JOIN {events} AS e ON e.slot = json_extract(c.value, '$[0]') \
                        AND e.global_position > json_extract(c.value, '$[1]'){scope} LIMIT ?2)), \
                    {NOW_MS} - (SELECT min((SELECT e.created_at FROM {events} AS e \
                        WHERE e.slot = json_extract(c.value, '$[0]') \
                          AND e.global_position > json_extract(c.value, '$[1]'){scope} \
                        ORDER BY e.global_position LIMIT 1)) FROM json_each(?1) AS c)",
            events = self.tables.events,
        );
        let mut query = sqlx::query(&sql)
            .bind(format!("[{}]", cursors.join(",")))
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX));
        for value in request.scope.aggregate_types.iter().chain(&request.scope.bounded_contexts) {
            query = query.bind(value);
        }
        let row =
            query.fetch_one(&self.pool).await.map_err(|e| classify("count the backlog", e))?;
        let events: i64 = row.try_get(0).map_err(|e| classify("count the backlog", e))?;
        let age: Option<i64> = row.try_get(1).map_err(|e| classify("count the backlog", e))?;
        Ok(Backlog {
            events: events.max(0) as u64,
            oldest_age: age.map(|ms| Duration::from_millis(ms.max(0) as u64)),
        })
    }

    async fn head(&self) -> StoreResult<Option<u64>> {
        // The primary key's last entry: one index lookup.
        let sql = format!("SELECT max(global_position) FROM {}", self.tables.events);
        let last: Option<i64> = sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify("read the last position", e))?;
        Ok(last.map(|g| g.max(0) as u64))
    }
}

/// ` AND column IN (?, ...)` for `n` values, or nothing when `n` is 0.
fn in_list(column: &str, n: usize) -> String {
    if n == 0 { String::new() } else { format!(" AND {column} IN ({})", vec!["?"; n].join(", ")) }
}

fn scope_sql(request: &ReadRequest) -> String {
    in_list("aggregate_type", request.scope.aggregate_types.len())
        + &in_list("bounded_context", request.scope.bounded_contexts.len())
}

/// Every requested slot after one common cursor: one range of the primary key, filtered by slot.
/// SQLite materializes and sorts a merge of per-slot ranges (77 ms for 256 slots against 1 ms for
/// the range), so this is the read of a worker whose cursors moved together, which is the usual
/// case. With several workers it reads the others' rows too, which an embedded store can afford.
fn read_range_sql(events: &str, request: &ReadRequest, every_slot: bool) -> String {
    let slots = if every_slot { String::new() } else { in_list("slot", request.cursors.len()) };
    format!(
        "SELECT {EVENT_COLUMNS} FROM {events} WHERE global_position > ?{slots}{scope} ORDER BY global_position LIMIT ?",
        scope = scope_sql(request)
    )
}

/// One ordered index range per requested slot, each after that slot's cursor, merged by position:
/// for cursors that differ (just after a slot started from its own checkpoint).
fn read_merge_sql(events: &str, request: &ReadRequest) -> String {
    let scope = scope_sql(request);
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM (");
    for i in 0..request.cursors.len() {
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        let _ = write!(
            sql,
            "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM {events} WHERE slot = ? AND global_position > ?{scope} \
             ORDER BY global_position LIMIT ?)"
        );
    }
    sql.push_str(") ORDER BY global_position LIMIT ?");
    sql
}

/// The events of one stream from `from_version` on, in version order, on `conn` (a unit of work's
/// transaction sees its own appends).
pub(crate) async fn read_stream_on(
    conn: &mut sqlx::SqliteConnection,
    events: &str,
    stream: &StreamId,
    from_version: u64,
) -> StoreResult<Vec<Event>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM {events} WHERE bounded_context = ? AND aggregate_type = ? \
         AND aggregate_id = ? AND aggregate_version >= ? ORDER BY aggregate_version"
    );
    let rows = sqlx::query(&sql)
        .bind(&stream.bounded_context)
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
        .fetch_all(conn)
        .await
        .map_err(|e| classify("read a stream", e))?;
    rows.iter().map(event_from_row).collect()
}

/// The columns [`event_from_row`] reads, named: a `SELECT *` prepared on a connection that has not
/// seen a migration add a column yet would be re-prepared with more columns than sqlx expects.
pub(crate) const EVENT_COLUMNS: &str = "global_position, bounded_context, aggregate_type, aggregate_id, \
     aggregate_version, slot, partition_key, event_id, event_type, event_version, payload, \
     metadata, causation_id, correlation_id, trace_id, created_at";

pub(crate) fn event_from_row(row: &SqliteRow) -> StoreResult<Event> {
    let get_err = |e| classify("decode an event", e);
    let id: Vec<u8> = row.try_get("event_id").map_err(get_err)?;
    let event_id = <[u8; 16]>::try_from(id.as_slice()).map(EventId::from_bytes).map_err(|_| {
        StoreError::Other {
            message: format!("event id of {} bytes, expected 16", id.len()),
            source: None,
        }
    })?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(get_err)?;
    // Streams appended before partition keys existed have none stored: their key is the id.
    let partition_key: Option<String> = row.try_get("partition_key").map_err(get_err)?;
    Ok(Event {
        position: Position::global(
            row.try_get::<i64, _>("global_position").map_err(get_err)? as u64
        ),
        stream: StreamId {
            bounded_context: row.try_get("bounded_context").map_err(get_err)?,
            aggregate_type: row.try_get("aggregate_type").map_err(get_err)?,
            aggregate_id: aggregate_id.clone(),
        },
        aggregate_version: row.try_get::<i64, _>("aggregate_version").map_err(get_err)? as u64,
        partition_key: partition_key.unwrap_or(aggregate_id),
        slot: Slot(row.try_get::<i64, _>("slot").map_err(get_err)? as u32),
        event_id,
        event_type: row.try_get("event_type").map_err(get_err)?,
        event_version: row.try_get::<i64, _>("event_version").map_err(get_err)? as u32,
        payload: row.try_get("payload").map_err(get_err)?,
        metadata: row.try_get("metadata").map_err(get_err)?,
        tracing: Tracing {
            causation_id: row.try_get("causation_id").map_err(get_err)?,
            correlation_id: row.try_get("correlation_id").map_err(get_err)?,
            trace_id: row.try_get("trace_id").map_err(get_err)?,
        },
        created_at: Timestamp(row.try_get::<i64, _>("created_at").map_err(get_err)?.max(0) as u64),
    })
}
