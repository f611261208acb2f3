//! The event store port on PostgreSQL.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use orchestrator_core::ports::{
    Appended, Backlog, EventStore, ReadRequest, StoreError, StoreResult, append_in_unit_of_work,
};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, PartitionKey, Position, Slot, SlotCount, StreamId,
    Timestamp, Tracing,
};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::{classify, unique_violation_detail};
use crate::{PgStore, Tables};

#[async_trait]
impl EventStore for PgStore {
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
        read_stream_on(&mut conn, &self.sql.events.read_stream, stream, from_version).await
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        if request.cursors.is_empty() || request.limit == 0 {
            return Ok(Vec::new());
        }
        // Read below the greatest horizon known; only a reader that reached it (a short batch)
        // pays for computing a new one, and reads on if it moved.
        let cached = self.horizon.cached();
        let mut events = self.read_below(request, cached).await?;
        if events.len() >= request.limit {
            return Ok(events);
        }
        let fresh = self.horizon.refresh(&self.pool).await?;
        if fresh <= cached {
            return Ok(events);
        }
        // The short read holds every event after the cursors below the cached horizon (no
        // appender below a horizon is still running), and in commit order all of them come
        // before anything the fresh horizon adds: read on after its last event, not again from
        // the cursors (that fetched the short batch twice, 1.2 rows read per event with 4
        // workers keeping up with appends).
        let mut rest = request.clone();
        rest.advance_past(&events);
        rest.limit = request.limit - events.len();
        events.extend(self.read_below(&rest, fresh).await?);
        Ok(events)
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        if request.cursors.is_empty() {
            return Ok(Backlog::default());
        }
        // Every committed event counts, also those above the read horizon: they are lag too.
        // The count stops at the limit ($1): counting a backlog of millions every few seconds
        // would cost more than processing it. The age comes from each slot's next event.
        let (slots, (commits, globals)): (Vec<i32>, (Vec<i64>, Vec<i64>)) = request
            .cursors
            .iter()
            .map(|(slot, p)| (slot.0 as i32, (p.commit as i64, p.global as i64)))
            .unzip();
        let err = |e| classify("count the backlog", e);
        let row = sqlx::query(&self.sql.events.backlog)
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
        self.horizon.stall(&self.pool).await.map(Some)
    }

    async fn head(&self) -> StoreResult<Option<u64>> {
        // The primary key's last entry: one index lookup (committed events only).
        let last: Option<i64> = sqlx::query_scalar(&self.sql.events.head)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify("read the last position", e))?;
        Ok(last.map(|g| g.max(0) as u64))
    }
}

impl PgStore {
    /// Reads the next events below `horizon`.
    async fn read_below(&self, request: &ReadRequest, horizon: u64) -> StoreResult<Vec<Event>> {
        let every_slot = request.cursors.len() == self.slot_count.get() as usize
            && request
                .cursors
                .iter()
                .map(|(s, _)| s)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == request.cursors.len();
        // The per-slot read costs too much to plan each time (17 ms for 256 slots) and has no
        // cheaper-looking alternative on a small table; the one-range read has one (`read_plan.rs`).
        let (sql, cursors, cached) = match request.uniform_cursor() {
            Some(after) if every_slot => (
                Cow::Borrowed(self.sql.events.read_all_slots.as_str()),
                vec![(None, after)],
                self.read_plan.cacheable(&self.pool).await,
            ),
            _ => (
                self.sql.events.read_per_slot(request.cursors.len()),
                request.cursors.iter().map(|(s, p)| (Some(*s), *p)).collect(),
                true,
            ),
        };
        let mut query = sqlx::query(&sql)
            .persistent(cached)
            .bind(request.limit as i64)
            .bind(&request.scope.aggregate_types)
            .bind(&request.scope.bounded_contexts)
            .bind(i64::try_from(horizon).unwrap_or(i64::MAX));
        for (slot, after) in cursors {
            if let Some(slot) = slot {
                query = query.bind(slot.0 as i32);
            }
            query = query.bind(after.commit as i64).bind(after.global as i64);
        }
        // Decoded as the rows arrive, so decoding overlaps the server sending the rest (decoding
        // after `fetch_all` made a read of 1000 events about a millisecond longer).
        let mut rows = query.fetch(&self.pool);
        // Room for a usual batch up front; `limit` is the caller's, and may be huge.
        let mut events = Vec::with_capacity(request.limit.min(PREALLOCATED_EVENTS));
        while let Some(row) = rows.try_next().await.map_err(|e| classify("read events", e))? {
            events.push(event_from_row(&row)?);
        }
        Ok(events)
    }
}

/// The events of one stream from `from_version` on, in version order, on `conn`. No horizon: a
/// stream's committed events are a prefix of its versions (appends to it are serialized by its
/// lock), so this reads everything whose append has returned.
pub(crate) async fn read_stream_on(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    stream: &StreamId,
    from_version: u64,
) -> StoreResult<Vec<Event>> {
    let rows = sqlx::query(sql)
        .bind(&stream.bounded_context)
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
        .fetch_all(conn)
        .await
        .map_err(|e| classify("read a stream", e))?;
    rows.iter().map(event_from_row).collect()
}

/// The columns of an event as [`event_from_row`] decodes them. The transaction id, event id,
/// metadata and creation time are sent in PostgreSQL's binary form and decoded here, which costs
/// the server nothing (converting them to text in SQL halved read throughput).
pub(crate) const EVENT_COLUMNS: &str = "global_position, transaction_id, bounded_context, aggregate_type, \
     aggregate_id, aggregate_version, slot, event_id, event_type, event_version, payload, metadata, \
     causation_id, correlation_id, trace_id, created_at, partition_key";

/// Events a read makes room for before the first row arrives, at most.
const PREALLOCATED_EVENTS: usize = 1000;

/// Scope filters on `$2` (aggregate types) and `$3` (bounded contexts); empty arrays match all.
const SCOPE: &str = "AND (cardinality($2::text[]) = 0 OR aggregate_type = ANY($2)) \
     AND (cardinality($3::text[]) = 0 OR bounded_context = ANY($3))";

/// Every slot after one common cursor (`$5`, `$6`) and below the horizon (`$4`): one range of
/// the commit-order index.
pub(crate) fn read_all_slots_sql(events: &str) -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM {events} \
         WHERE (transaction_id, global_position) > ($5::text::xid8, $6) \
           AND transaction_id < $4::text::xid8 {SCOPE} \
         ORDER BY transaction_id, global_position LIMIT $1"
    )
}

/// One ordered index range per requested slot (`slot`, `commit`, `global` from `$5` on), each after
/// that slot's cursor and below the horizon (`$4`), merged by position: PostgreSQL runs this as a
/// Merge Append over index scans, reading about as many rows as it returns whatever share of the
/// slots the reader owns.
fn read_per_slot_sql(events: &str, n_slots: usize) -> String {
    let mut sql = format!("SELECT {EVENT_COLUMNS} FROM (");
    for i in 0..n_slots {
        let p = 5 + 3 * i;
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        let _ = write!(
            sql,
            "(SELECT * FROM {events} WHERE slot = ${p} \
               AND (transaction_id, global_position) > (${c}::text::xid8, ${g}) \
               AND transaction_id < $4::text::xid8 {SCOPE} \
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
    raw_number(row, index).map(i64::from_be_bytes)
}

fn raw_i32(row: &PgRow, index: usize) -> StoreResult<i32> {
    raw_number(row, index).map(i32::from_be_bytes)
}

/// A column's `N` bytes, as PostgreSQL's binary format sends an integer of that width.
fn raw_number<const N: usize>(row: &PgRow, index: usize) -> StoreResult<[u8; N]> {
    let bytes = raw_column(row, index)?;
    <[u8; N]>::try_from(bytes).map_err(|_| StoreError::Other {
        message: format!("column {index} of an event has {} bytes, expected {N}", bytes.len()),
        source: None,
    })
}

/// Decodes a row selected with [`EVENT_COLUMNS`], by column index (it runs for every event).
pub(crate) fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    // The columns' types are the migrations' own, so each is decoded without sqlx's per-value
    // type check (a tenth of a worker's time on a no-op projection); numbers go through
    // `raw_i64`/`raw_i32`, which check the width instead of trusting it.
    let get_err = |e| classify("decode an event", e);
    let event_id = raw_column(row, 7)?;
    let event_id =
        <[u8; 16]>::try_from(event_id).map(EventId::from_bytes).map_err(|_| StoreError::Other {
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
    let aggregate_id: String = row.try_get_unchecked(4).map_err(get_err)?;
    // Streams appended before partition keys existed have none stored: their key is the id.
    let partition_key: Option<String> = row.try_get_unchecked(16).map_err(get_err)?;
    Ok(Event {
        position: Position { commit: raw_i64(row, 1)? as u64, global: raw_i64(row, 0)? as u64 },
        stream: StreamId {
            bounded_context: row.try_get_unchecked(2).map_err(get_err)?,
            aggregate_type: row.try_get_unchecked(3).map_err(get_err)?,
            aggregate_id: aggregate_id.clone(),
        },
        aggregate_version: raw_i64(row, 5)? as u64,
        partition_key: partition_key.unwrap_or(aggregate_id),
        slot: Slot(raw_i32(row, 6)? as u32),
        event_id,
        event_type: row.try_get_unchecked(8).map_err(get_err)?,
        event_version: raw_i32(row, 9)? as u32,
        payload: row.try_get_unchecked(10).map_err(get_err)?,
        metadata,
        tracing: Tracing {
            causation_id: row.try_get_unchecked(12).map_err(get_err)?,
            correlation_id: row.try_get_unchecked(13).map_err(get_err)?,
            trace_id: row.try_get_unchecked(14).map_err(get_err)?,
        },
        created_at: Timestamp((created_micros / 1000).max(0) as u64),
    })
}

/// A unique violation on the event id becomes `DuplicateEvent`, naming the id from the detail.
pub(crate) fn duplicate_or(err: sqlx::Error, events: &EventSql, batch: &[NewEvent]) -> StoreError {
    match unique_violation_detail(&err, &events.event_id_key) {
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

/// The event store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct EventSql {
    /// One stream's events from a version on (`read_stream_on`).
    pub(crate) read_stream: String,
    /// Events after the cursors, up to a limit, and the oldest one's age.
    backlog: String,
    /// The last committed position.
    head: String,
    /// Every slot after one common cursor (`read_all_slots_sql`).
    pub(crate) read_all_slots: String,
    /// The per-slot read for each number of slots, built the first time a reader owns that many.
    read_per_slot: Box<[OnceLock<String>]>,
    /// The unique constraint on event ids, which tells a duplicate event from other conflicts.
    event_id_key: String,
    events: String,
}

impl EventSql {
    pub(crate) fn new(t: &Tables, slot_count: SlotCount) -> Self {
        let events = &t.events;
        Self {
            read_stream: format!(
                "SELECT {EVENT_COLUMNS} FROM {events} WHERE bounded_context = $1 AND aggregate_type = $2 \
                 AND aggregate_id = $3 AND aggregate_version >= $4 ORDER BY aggregate_version"
            ),
            backlog: format!(
                "WITH c AS (SELECT * FROM unnest($4::int[], $5::bigint[], $6::bigint[]) \
                     AS c(slot, commit_position, global_position)) \
                 SELECT (SELECT count(*) FROM (SELECT 1 FROM c JOIN {events} AS e ON e.slot = c.slot \
                           AND (e.transaction_id, e.global_position) > (c.commit_position::text::xid8, c.global_position) \
                           WHERE true {SCOPE} LIMIT $1) AS counted), \
                        (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(next.created_at))::float8 \
                         FROM c CROSS JOIN LATERAL (SELECT e.created_at FROM {events} AS e WHERE e.slot = c.slot \
                           AND (e.transaction_id, e.global_position) > (c.commit_position::text::xid8, c.global_position) \
                           {SCOPE} ORDER BY e.transaction_id, e.global_position LIMIT 1) AS next)",
            ),
            head: format!("SELECT max(global_position) FROM {events}"),
            read_all_slots: read_all_slots_sql(events),
            read_per_slot: (0..=slot_count.get()).map(|_| OnceLock::new()).collect(),
            event_id_key: format!("{events}_event_id_key"),
            events: events.clone(),
        }
    }

    /// The per-slot read of `n_slots` slots.
    fn read_per_slot(&self, n_slots: usize) -> Cow<'_, str> {
        match self.read_per_slot.get(n_slots) {
            Some(built) => {
                Cow::Borrowed(built.get_or_init(|| read_per_slot_sql(&self.events, n_slots)))
            }
            // More cursors than the store has slots: a request naming a slot twice.
            None => Cow::Owned(read_per_slot_sql(&self.events, n_slots)),
        }
    }
}
