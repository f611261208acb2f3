//! Units of work on SQLite: one `BEGIN IMMEDIATE` transaction, which holds SQLite's only write lock
//! from its first statement, so every stream is locked before anything is written.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, StoreError, StoreResult, StreamHead, UnitOfWork, UnitOfWorkStore, check_append,
    check_declared,
};
use orchestrator_core::{
    Event, ExpectedVersion, NewEvent, PartitionKey, Position, SlotCount, StreamId, fnv1a_32,
};

use crate::error::{classify, is_unique_violation_on};
use crate::event_store::read_stream_on;
use crate::{NOW_MS, SqliteStore, SqliteTx, Statements, Tables};

/// The unit of work's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct UnitOfWorkSql {
    /// Reads a stream's last version and partition key.
    head: String,
    /// Appends one event; returns its global position.
    append: String,
}

impl UnitOfWorkSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            head: format!(
                "SELECT aggregate_version, COALESCE(partition_key, aggregate_id) FROM {} \
                 WHERE bounded_context = ? AND aggregate_type = ? AND aggregate_id = ? \
                 ORDER BY aggregate_version DESC LIMIT 1",
                t.events
            ),
            append: format!(
                "INSERT INTO {} (bounded_context, aggregate_type, aggregate_id, aggregate_version, slot, \
                     partition_hash, partition_key, event_id, event_type, event_version, payload, \
                     metadata, causation_id, correlation_id, trace_id, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {NOW_MS}) RETURNING global_position",
                t.events
            ),
        }
    }
}

/// A unit of work on SQLite: appends to its declared streams and the application's own writes
/// ([`SqliteUnitOfWork::tx`]) in one transaction.
#[derive(Debug)]
pub struct SqliteUnitOfWork {
    tx: SqliteTx,
    sql: Arc<Statements>,
    slot_count: SlotCount,
    declared: BTreeSet<StreamId>,
    appended: Vec<Appended>,
}

impl SqliteUnitOfWork {
    /// The transaction: run the application's own statements on `&mut **uow.tx()`; they commit
    /// or roll back with the appends.
    pub fn tx(&mut self) -> &mut SqliteTx {
        &mut self.tx
    }

    async fn head(&mut self, stream: &StreamId) -> StoreResult<StreamHead> {
        let row: Option<(i64, String)> = sqlx::query_as(&self.sql.unit_of_work.head)
            .bind(&stream.bounded_context)
            .bind(&stream.aggregate_type)
            .bind(&stream.aggregate_id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(|e| classify("append", e))?;
        Ok(row.map_or_else(StreamHead::default, |(version, key)| StreamHead {
            version: version as u64,
            partition_key: Some(key),
        }))
    }
}

#[async_trait]
impl UnitOfWorkStore for SqliteStore {
    type UnitOfWork = SqliteUnitOfWork;

    async fn begin_unit_of_work(&self, streams: &[StreamId]) -> StoreResult<SqliteUnitOfWork> {
        Ok(SqliteUnitOfWork {
            tx: self.begin_write("begin a unit of work").await?,
            sql: Arc::clone(&self.sql),
            slot_count: self.slot_count,
            declared: streams.iter().cloned().collect(),
            appended: Vec::new(),
        })
    }
}

#[async_trait]
impl UnitOfWork for SqliteUnitOfWork {
    async fn append_with_key(
        &mut self,
        stream: &StreamId,
        key: Option<&PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<u64> {
        check_declared(&self.declared, stream)?;
        let head = self.head(stream).await?;
        let partition_key = check_append(stream, expected, &head, key, &events)?;
        let current = head.version;
        let hash = fnv1a_32(partition_key.as_bytes());
        let slot = self.slot_count.slot_of_hash(hash);
        let (mut first_global, mut last_global) = (u64::MAX, 0);
        for (i, event) in events.iter().enumerate() {
            let position: i64 = sqlx::query_scalar(&self.sql.unit_of_work.append)
                .bind(&stream.bounded_context)
                .bind(&stream.aggregate_type)
                .bind(&stream.aggregate_id)
                .bind((current + i as u64 + 1) as i64)
                .bind(slot.0 as i64)
                .bind(i64::from(hash))
                .bind(&partition_key)
                .bind(event.event_id.as_bytes().as_slice())
                .bind(&event.event_type)
                .bind(i64::from(event.event_version))
                .bind(event.payload.as_slice())
                .bind(&event.metadata)
                .bind(event.tracing.causation_id.as_deref())
                .bind(event.tracing.correlation_id.as_deref())
                .bind(event.tracing.trace_id.as_deref())
                .fetch_one(&mut *self.tx)
                .await
                .map_err(|e| {
                    if is_unique_violation_on(&e, "event_id") {
                        StoreError::DuplicateEvent { event_id: event.event_id }
                    } else {
                        classify("append", e)
                    }
                })?;
            first_global = first_global.min(position as u64);
            last_global = last_global.max(position as u64);
        }
        let version = current + events.len() as u64;
        self.appended.push(if events.is_empty() {
            Appended {
                first_global: 1,
                last_global: 0,
                version,
                slot,
                last_position: Position::START,
            }
        } else {
            Appended {
                first_global,
                last_global,
                version,
                slot,
                last_position: Position::global(last_global),
            }
        });
        Ok(version)
    }

    async fn read_stream(
        &mut self,
        stream: &StreamId,
        from_version: u64,
    ) -> StoreResult<Vec<Event>> {
        read_stream_on(&mut self.tx, &self.sql.events, stream, from_version).await
    }

    async fn commit(self) -> StoreResult<Vec<Appended>> {
        self.tx.commit().await.map_err(|e| classify("commit a unit of work", e))?;
        Ok(self.appended)
    }
}
