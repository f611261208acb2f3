//! The event store port on PostgreSQL.

use std::fmt::Write as _;

use async_trait::async_trait;
use orchestrator_core::ports::{Appended, EventStore, ReadRequest, StoreError, StoreResult};
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
        let sql = read_sql(&self.tables.events, request);
        let mut query = sqlx::query(&sql)
            .bind(request.limit as i64)
            .bind(&request.scope.aggregate_types)
            .bind(&request.scope.bounded_contexts);
        for (slot, after) in &request.cursors {
            query = query.bind(slot.0 as i32).bind(after.commit as i64).bind(after.global as i64);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(|e| classify("read events", e))?;
        rows.iter().map(event_from_row).collect()
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
        let conflict = match expected {
            ExpectedVersion::Any => false,
            ExpectedVersion::NoStream => current != 0,
            ExpectedVersion::Exact(version) => current != version,
        };
        if conflict {
            return Err(StoreError::VersionConflict {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = events.iter().find(|e| !seen.insert(e.event_id)) {
            return Err(StoreError::DuplicateEvent { event_id: dup.event_id });
        }
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
        let first_global = inserted.iter().copied().min().unwrap_or(0) as u64;
        let last_global = inserted.iter().copied().max().unwrap_or(0) as u64;
        Ok((tx, Appended { first_global, last_global, version: current + n }))
    }
}

/// One ordered index range per requested slot, each starting after that slot's cursor and
/// stopping below the transaction horizon, merged by position: PostgreSQL runs this as a Merge
/// Append over index scans, reading about as many rows as it returns.
fn read_sql(events: &str, request: &ReadRequest) -> String {
    let mut sql = String::from(
        "WITH horizon AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) \
         SELECT global_position, transaction_id::text::bigint AS commit_position, bounded_context, \
                aggregate_type, aggregate_id, aggregate_version, slot, event_id::text AS event_id, \
                event_type, event_version, payload, metadata::text AS metadata, causation_id, \
                correlation_id, trace_id, \
                (EXTRACT(EPOCH FROM created_at) * 1000)::bigint AS created_ms \
         FROM (",
    );
    for (i, _) in request.cursors.iter().enumerate() {
        let p = 4 + 3 * i;
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        let _ = write!(
            sql,
            "(SELECT * FROM {events} WHERE slot = ${p} \
               AND (transaction_id, global_position) > (${c}::text::xid8, ${g}) \
               AND transaction_id < (SELECT xmin FROM horizon) \
               AND (cardinality($2::text[]) = 0 OR aggregate_type = ANY($2)) \
               AND (cardinality($3::text[]) = 0 OR bounded_context = ANY($3)) \
             ORDER BY transaction_id, global_position LIMIT $1)",
            c = p + 1,
            g = p + 2,
        );
    }
    sql.push_str(") AS e ORDER BY transaction_id, global_position LIMIT $1");
    sql
}

fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    let get_err = |e| classify("decode an event", e);
    let event_id: String = row.try_get("event_id").map_err(get_err)?;
    Ok(Event {
        position: Position {
            commit: row.try_get::<i64, _>("commit_position").map_err(get_err)? as u64,
            global: row.try_get::<i64, _>("global_position").map_err(get_err)? as u64,
        },
        stream: StreamId {
            bounded_context: row.try_get("bounded_context").map_err(get_err)?,
            aggregate_type: row.try_get("aggregate_type").map_err(get_err)?,
            aggregate_id: row.try_get("aggregate_id").map_err(get_err)?,
        },
        aggregate_version: row.try_get::<i64, _>("aggregate_version").map_err(get_err)? as u64,
        slot: Slot(row.try_get::<i32, _>("slot").map_err(get_err)? as u32),
        event_id: parse_uuid(&event_id).ok_or_else(|| StoreError::Other {
            message: format!("event id {event_id:?} is not a UUID"),
            source: None,
        })?,
        event_type: row.try_get("event_type").map_err(get_err)?,
        event_version: row.try_get::<i32, _>("event_version").map_err(get_err)? as u32,
        payload: row.try_get("payload").map_err(get_err)?,
        metadata: row.try_get("metadata").map_err(get_err)?,
        tracing: Tracing {
            causation_id: row.try_get("causation_id").map_err(get_err)?,
            correlation_id: row.try_get("correlation_id").map_err(get_err)?,
            trace_id: row.try_get("trace_id").map_err(get_err)?,
        },
        created_at: Timestamp(row.try_get::<i64, _>("created_ms").map_err(get_err)?.max(0) as u64),
    })
}

/// Parses a hyphenated UUID as PostgreSQL prints it.
fn parse_uuid(text: &str) -> Option<EventId> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(EventId(bytes))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_round_trip() {
        let id = EventId([7; 16]);
        assert_eq!(parse_uuid(&id.to_string()), Some(id));
        assert_eq!(parse_uuid("not-a-uuid"), None);
    }
}
