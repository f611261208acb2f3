//! The event store port on SQLite.

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
use crate::{NOW_MS, SqliteStore, Tables};

/// The event store's statements, built once when the store opens. Slot lists, cursors and scopes
/// are bound as JSON arrays (`json_each`), so each read is one fixed statement.
#[derive(Debug)]
pub(crate) struct EventSql {
    /// Reads one stream from a version on.
    read_stream: String,
    /// Reads every slot after one common cursor.
    read_after: String,
    /// Reads the slots of a JSON array after one common cursor.
    read_slots_after: String,
    /// Reads each slot of a JSON array of `[slot, cursor]` after its own cursor.
    read_merge: String,
    /// Counts the events after a JSON array of cursors, and the age of the oldest next one.
    backlog: String,
    /// Reads the last position.
    head: String,
}

impl EventSql {
    pub(crate) fn new(t: &Tables) -> Self {
        let events = &t.events;
        // The scope on the columns of `alias`: `?n` aggregate types and `?n+1` bounded contexts,
        // each a JSON array, or null for all. (Unlike an `IN (?, ...)` list, which made the planner
        // pick the stream index and read every event of the scope from the first.)
        let scope = |alias: &str, n: usize| {
            format!(
                " AND (?{n} IS NULL OR {alias}aggregate_type IN (SELECT value FROM json_each(?{n}))) \
                 AND (?{m} IS NULL OR {alias}bounded_context IN (SELECT value FROM json_each(?{m})))",
                m = n + 1
            )
        };
        Self {
            read_stream: format!(
                "SELECT {EVENT_COLUMNS} FROM {events} WHERE bounded_context = ? AND aggregate_type = ? \
                 AND aggregate_id = ? AND aggregate_version >= ? ORDER BY aggregate_version"
            ),
            // Every requested slot after one common cursor: one range of the primary key, filtered
            // by slot. SQLite materializes and sorts a merge of per-slot ranges (77 ms for 256 slots
            // against 1 ms for the range), so this is the read of a worker whose cursors moved
            // together, which is the usual case. With several workers it reads the others' rows
            // too, which an embedded store can afford.
            // ?1 cursor, ?2 limit, ?3 and ?4 scope.
            read_after: format!(
                "SELECT {EVENT_COLUMNS} FROM {events} WHERE global_position > ?1{} \
                 ORDER BY global_position LIMIT ?2",
                scope("", 3)
            ),
            // ?1 cursor, ?2 slots, ?3 limit, ?4 and ?5 scope.
            read_slots_after: format!(
                "SELECT {EVENT_COLUMNS} FROM {events} WHERE global_position > ?1 \
                 AND slot IN (SELECT value FROM json_each(?2)){} ORDER BY global_position LIMIT ?3",
                scope("", 4)
            ),
            // One ordered index range per requested slot, each after that slot's cursor, merged by
            // position: for cursors that differ (just after a slot started from its own
            // checkpoint). Each range ends at the slot's `limit`-th event in scope (found in the
            // same index), so at most `limit` rows per slot are sorted.
            // ?1 cursors, ?2 limit, ?3 and ?4 scope.
            read_merge: format!(
                "SELECT {EVENT_COLUMNS} FROM json_each(?1) AS c JOIN {events} AS e \
                   ON e.slot = json_extract(c.value, '$[0]') \
                  AND e.global_position > json_extract(c.value, '$[1]'){e_scope} \
                  AND e.global_position <= COALESCE((SELECT x.global_position FROM {events} AS x \
                        WHERE x.slot = json_extract(c.value, '$[0]') \
                          AND x.global_position > json_extract(c.value, '$[1]'){x_scope} \
                        ORDER BY x.global_position LIMIT 1 OFFSET ?2 - 1), {max}) \
                 ORDER BY e.global_position LIMIT ?2",
                e_scope = scope("e.", 3),
                x_scope = scope("x.", 3),
                max = i64::MAX
            ),
            // The count stops at the limit, so its cost stays bounded however far behind the
            // cursors are; the age comes from each slot's next event.
            // ?1 cursors, ?2 limit, ?3 and ?4 scope.
            backlog: format!(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM json_each(?1) AS c \
                           JOIN {events} AS e ON e.slot = json_extract(c.value, '$[0]') \
                            AND e.global_position > json_extract(c.value, '$[1]'){scope} LIMIT ?2)), \
                        {NOW_MS} - (SELECT min((SELECT e.created_at FROM {events} AS e \
                            WHERE e.slot = json_extract(c.value, '$[0]') \
                              AND e.global_position > json_extract(c.value, '$[1]'){scope} \
                            ORDER BY e.global_position LIMIT 1)) FROM json_each(?1) AS c)",
                scope = scope("e.", 3)
            ),
            // The primary key's last entry: one index lookup.
            head: format!("SELECT max(global_position) FROM {events}"),
        }
    }
}

/// Slots and positions as a JSON array of `[slot, global position]`, for `json_each`.
pub(crate) fn positions_json<'a>(
    positions: impl IntoIterator<Item = (&'a Slot, &'a Position)>,
) -> String {
    let pairs: Vec<(u32, u64)> =
        positions.into_iter().map(|(slot, p)| (slot.0, p.global)).collect();
    serde_json::to_string(&pairs).expect("numbers serialize")
}

/// Scope values as a JSON array, or null (every value) when there are none.
fn scope_json(values: &[String]) -> Option<String> {
    (!values.is_empty()).then(|| serde_json::Value::from(values).to_string())
}

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
        read_stream_on(&mut conn, &self.sql.events, stream, from_version).await
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        if request.cursors.is_empty() || request.limit == 0 {
            return Ok(Vec::new());
        }
        let sql = &self.sql.events;
        let every_slot = request.cursors.len() == self.slot_count.get() as usize;
        let query = match request.uniform_cursor() {
            Some(after) if every_slot => sqlx::query(&sql.read_after).bind(after.global as i64),
            Some(after) => {
                let slots: Vec<u32> = request.cursors.iter().map(|(slot, _)| slot.0).collect();
                sqlx::query(&sql.read_slots_after)
                    .bind(after.global as i64)
                    .bind(serde_json::Value::from(slots).to_string())
            }
            None => sqlx::query(&sql.read_merge)
                .bind(positions_json(request.cursors.iter().map(|(s, p)| (s, p)))),
        };
        let query = query
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .bind(scope_json(&request.scope.aggregate_types))
            .bind(scope_json(&request.scope.bounded_contexts));
        let rows = query.fetch_all(&self.pool).await.map_err(|e| classify("read events", e))?;
        rows.iter().map(event_from_row).collect()
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        if request.cursors.is_empty() {
            return Ok(Backlog::default());
        }
        let query = sqlx::query(&self.sql.events.backlog)
            .bind(positions_json(request.cursors.iter().map(|(s, p)| (s, p))))
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .bind(scope_json(&request.scope.aggregate_types))
            .bind(scope_json(&request.scope.bounded_contexts));
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
        let last: Option<i64> = sqlx::query_scalar(&self.sql.events.head)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify("read the last position", e))?;
        Ok(last.map(|g| g.max(0) as u64))
    }
}

/// The events of one stream from `from_version` on, in version order, on `conn` (a unit of work's
/// transaction sees its own appends).
pub(crate) async fn read_stream_on(
    conn: &mut sqlx::SqliteConnection,
    sql: &EventSql,
    stream: &StreamId,
    from_version: u64,
) -> StoreResult<Vec<Event>> {
    let rows = sqlx::query(&sql.read_stream)
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
