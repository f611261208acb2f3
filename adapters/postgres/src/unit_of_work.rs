//! Units of work on PostgreSQL: the application's transaction around its appends.
//!
//! `begin_unit_of_work` runs two statements before anything else: it registers the transaction as
//! an appender (the read horizon waits for it, see `horizon.rs`) and takes a transaction-scoped
//! advisory lock per declared stream, in the order of their keys. Neither assigns a transaction id;
//! the id comes at the first write, after every declared stream is locked and so after the previous
//! append to each committed. So per stream, transaction ids follow versions, which is what reading
//! in `(transaction_id, global_position)` order needs to keep every stream in version order.

use std::collections::BTreeSet;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, StoreResult, StreamHead, UnitOfWork, UnitOfWorkStore, check_append, check_declared,
};
use orchestrator_core::{
    Event, ExpectedVersion, NewEvent, PartitionKey, Position, StreamId, fnv1a_32,
};

use crate::error::classify;
use crate::event_store::{duplicate_or, read_stream_on};
use crate::{PgStore, PgTx, Tables};

/// A unit of work on PostgreSQL: appends to its declared streams and the application's own writes
/// ([`PgUnitOfWork::tx`]) in one transaction.
///
/// Holding it open holds back readers (only those of this events table) from the moment it first
/// writes until it ends; keep units of work short.
#[derive(Debug)]
pub struct PgUnitOfWork {
    tx: PgTx,
    store: PgStore,
    declared: BTreeSet<StreamId>,
    appended: Vec<Appended>,
}

impl PgUnitOfWork {
    /// The transaction: run the application's own statements on `&mut **uow.tx()`; they commit
    /// or roll back with the appends.
    pub fn tx(&mut self) -> &mut PgTx {
        &mut self.tx
    }

    async fn head(&mut self, stream: &StreamId) -> StoreResult<StreamHead> {
        let row: Option<(i64, String)> = sqlx::query_as(&self.store.sql.units_of_work.stream_head)
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
impl UnitOfWorkStore for PgStore {
    type UnitOfWork = PgUnitOfWork;

    async fn begin_unit_of_work(&self, streams: &[StreamId]) -> StoreResult<PgUnitOfWork> {
        let err = |e| classify("begin a unit of work", e);
        let mut tx = crate::begin::begin(&self.pool, None).await.map_err(err)?;
        self.horizon.register(&mut tx).await?;
        let names: Vec<String> = streams.iter().map(ToString::to_string).collect();
        // One global order (by key) for every lock taker, so units of work never deadlock.
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, k) \
             FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest($2::text[]) AS s ORDER BY 1) AS keys",
        )
        // Namespaced by the events table (its OID), so that tables of the same name in other
        // schemas, or under other prefixes, never wait on each other's streams.
        .bind(self.horizon.stream_lock_space())
        .bind(&names)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        Ok(PgUnitOfWork {
            tx,
            store: self.clone(),
            declared: streams.iter().cloned().collect(),
            appended: Vec::new(),
        })
    }
}

#[async_trait]
impl UnitOfWork for PgUnitOfWork {
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
        let slot = self.store.slot_count.slot_of_hash(hash);
        if events.is_empty() {
            let nothing = Appended {
                first_global: 1,
                last_global: 0,
                version: current,
                slot,
                last_position: Position::START,
            };
            self.appended.push(nothing);
            return Ok(current);
        }
        let n = events.len() as u64;
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
        let inserted: Vec<(i64, i64)> = sqlx::query_as(&self.store.sql.units_of_work.insert_events)
            .bind(&stream.bounded_context)
            .bind(&stream.aggregate_type)
            .bind(&stream.aggregate_id)
            .bind(slot.0 as i32)
            .bind(i64::from(hash))
            .bind(&partition_key)
            .bind(&versions)
            .bind(&ids)
            .bind(&types)
            .bind(&type_versions)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&causation)
            .bind(&correlation)
            .bind(&trace)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(|e| duplicate_or(e, &self.store.sql.events, &events))?;
        // Delivered at commit, and only if it commits: wakes idle readers at once.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.store.tables.events_channel)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| classify("append", e))?;
        let first_global = inserted.iter().map(|r| r.0).min().unwrap_or(0) as u64;
        let last_global = inserted.iter().map(|r| r.0).max().unwrap_or(0) as u64;
        let commit = inserted.first().map_or(0, |r| r.1) as u64;
        self.appended.push(Appended {
            first_global,
            last_global,
            version: current + n,
            slot,
            last_position: Position { commit, global: last_global },
        });
        Ok(current + n)
    }

    async fn read_stream(
        &mut self,
        stream: &StreamId,
        from_version: u64,
    ) -> StoreResult<Vec<Event>> {
        read_stream_on(&mut self.tx, &self.store.sql.events.read_stream, stream, from_version).await
    }

    async fn commit(self) -> StoreResult<Vec<Appended>> {
        self.tx.commit().await.map_err(|e| classify("commit a unit of work", e))?;
        Ok(self.appended)
    }
}

/// A unit of work's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct UnitOfWorkSql {
    /// Inserts a stream's new events; their positions and transaction id.
    insert_events: String,
    /// A stream's last version and partition key.
    stream_head: String,
}

impl UnitOfWorkSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            insert_events: format!(
                "INSERT INTO {} (bounded_context, aggregate_type, aggregate_id, aggregate_version, slot, \
                     partition_hash, partition_key, event_id, event_type, event_version, payload, \
                     metadata, causation_id, correlation_id, trace_id) \
                 SELECT $1, $2, $3, v, $4, $5, $6, id::uuid, t, tv, p, m::jsonb, c, r, tr \
                 FROM unnest($7::bigint[], $8::text[], $9::text[], $10::int[], $11::bytea[], $12::text[], \
                 $13::text[], $14::text[], $15::text[]) \
                      AS e(v, id, t, tv, p, m, c, r, tr) \
                 RETURNING global_position, transaction_id::text::bigint",
                t.events
            ),
            stream_head: format!(
                "SELECT aggregate_version, COALESCE(partition_key, aggregate_id) FROM {} \
                 WHERE bounded_context = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
                 ORDER BY aggregate_version DESC LIMIT 1",
                t.events
            ),
        }
    }
}
