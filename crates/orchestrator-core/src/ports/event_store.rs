//! The event store port: append with optimistic concurrency, read one stream, gap-safe read by
//! slot; and units of work, the application's own transaction around its appends.

use std::time::Duration;

use async_trait::async_trait;

use crate::event::{Event, ExpectedVersion, NewEvent, PartitionKey, Position, Scope, StreamId};
use crate::ports::error::{StoreError, StoreResult};
use crate::slot::{Slot, SlotCount};

/// What an append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Global position of the first event written.
    pub first_global: u64,
    /// Global position of the last event written.
    pub last_global: u64,
    /// The stream's version after the append.
    pub version: u64,
    /// The slot of the stream's partition key (every event of the append is in it).
    pub slot: Slot,
    /// Where the last event written stands in the read order (commit key included): a projection
    /// whose checkpoint of `slot` is at or past it has processed every event of the append.
    /// `Position::START` when nothing was written.
    pub last_position: Position,
}

/// A read of the events of some slots, each after its own cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The slots to read, each with the position after which to read (its checkpoint).
    pub cursors: Vec<(Slot, Position)>,
    /// Only events in this scope are returned.
    pub scope: Scope,
    /// At most this many events.
    pub limit: usize,
}

impl ReadRequest {
    /// Moves every cursor past the last event of a batch this request returned.
    ///
    /// Valid for every requested slot, not only those with events in the batch: the batch is the
    /// first `limit` events after the cursors in position order, so no event of any requested slot
    /// between its cursor and the batch's last position was left out. Cursors that move together
    /// let stores read one index range instead of one per slot.
    pub fn advance_past(&mut self, batch: &[Event]) {
        if let Some(last) = batch.last() {
            for (_, cursor) in &mut self.cursors {
                *cursor = (*cursor).max(last.position);
            }
        }
    }

    /// The common cursor, when every slot's cursor is the same.
    pub fn uniform_cursor(&self) -> Option<Position> {
        let first = self.cursors.first()?.1;
        self.cursors.iter().all(|(_, c)| *c == first).then_some(first)
    }
}

/// How far some cursors are behind the events: what [`EventStore::backlog`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Committed events after the cursors, in scope (including any a gap-safe read does not
    /// return yet because an older transaction is still open), counted up to the request's limit.
    pub events: u64,
    /// Age, by the store's clock, of the oldest of the next event of each slot (the one its
    /// reader would take next); `None` when no slot has one.
    pub oldest_age: Option<Duration>,
}

/// What an append finds of its stream before writing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHead {
    /// The stream's last version (0: no events).
    pub version: u64,
    /// The partition key fixed at its first append (`None` when the stream has no events).
    pub partition_key: Option<String>,
}

/// The checks every append makes before writing, shared by the adapters so that every store
/// refuses the same input with the same error:
/// - the stream id has no empty part (`InvalidStream`) and every event is well formed
///   (`InvalidEvent`: [`NewEvent::validate`]);
/// - the stream's version satisfies `expected` (`VersionConflict`);
/// - a given partition key equals the one fixed at the stream's first append
///   (`PartitionKeyMismatch`);
/// - no event id appears twice in the batch (`DuplicateEvent`). Ids already stored are the
///   adapter's to check.
///
/// Returns the partition key the events get: the stored one, else the given one, else the
/// aggregate id.
pub fn check_append(
    stream: &StreamId,
    expected: ExpectedVersion,
    head: &StreamHead,
    key: Option<&PartitionKey>,
    events: &[NewEvent],
) -> StoreResult<String> {
    stream.validate()?;
    events.iter().try_for_each(NewEvent::validate)?;
    if !expected.allows(head.version) {
        return Err(StoreError::VersionConflict {
            stream: stream.clone(),
            expected,
            actual: head.version,
        });
    }
    let effective = match (&head.partition_key, key) {
        (Some(stored), Some(given)) if stored != given.as_str() => {
            return Err(StoreError::PartitionKeyMismatch {
                stream: stream.clone(),
                stored: stored.clone(),
                given: given.as_str().to_owned(),
            });
        }
        (Some(stored), _) => stored.clone(),
        (None, Some(given)) => given.as_str().to_owned(),
        (None, None) => stream.aggregate_id.clone(),
    };
    let mut seen = std::collections::BTreeSet::new();
    match events.iter().find(|e| !seen.insert(e.event_id)) {
        Some(duplicate) => Err(StoreError::DuplicateEvent { event_id: duplicate.event_id }),
        None => Ok(effective),
    }
}

/// Events appended, read per stream, and read by global position.
///
/// # Contract
/// - `append_with_key` writes all of `events` for one stream or none. Versions continue from the
///   stream's current version (the first event of a new stream is version 1).
///   `ExpectedVersion::NoStream` fails with `VersionConflict` if the stream has events;
///   `Exact(v)` fails unless the stream's last version is `v`; `Any` never conflicts.
///   A duplicate event id fails with `DuplicateEvent`. An empty `events` writes nothing and
///   returns the current version with `first_global > last_global`. Malformed input fails as
///   [`check_append`] says, with nothing written.
/// - The partition key is fixed at a stream's first append: the given key, else the aggregate id.
///   A later append may omit it; giving another one fails with `PartitionKeyMismatch`.
/// - The slot of every event is `slot_count().slot_of(partition_key)`, stored at append time.
/// - One append is one transaction that writes nothing before it has locked the stream and checked
///   its version, and appends to one stream only; so commit order and version order agree per
///   stream. (A [`UnitOfWork`] may append to several streams, all locked before its first write.)
/// - `read_stream` returns the stream's events from version `from_version` on (0 or 1: all), in
///   version order, with read-your-writes: every event whose append has returned is included,
///   whatever other transactions are open.
/// - `read` returns, in ascending `Position` order, at most `limit` events whose slot is among the
///   cursors, whose position is greater than that slot's cursor, and that are in scope.
/// - `read` is gap-safe: once it has returned an event at position `p`, no event at a position
///   below `p` can become visible later. Every committed event is eventually returned.
/// - Events of one stream are returned in version order.
/// - So a reader may move all its cursors past a batch's last event ([`ReadRequest::advance_past`]).
/// - `backlog` counts the committed events of the requested slots after their cursors and in
///   scope, up to `limit` (so its cost stays bounded however far behind a reader is), and ages the
///   next event of each slot by the store's own clock, never the caller's.
/// - `head`, where a store implements it, is the greatest global position of a committed event
///   (`None` while there are none): at least that of every event a read has returned.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait EventStore: Send + Sync {
    /// The slot count events are bucketed by.
    fn slot_count(&self) -> SlotCount;

    /// Appends events to one stream atomically; the stream keeps the partition key of its first
    /// append (the aggregate id for a new stream).
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        self.append_with_key(stream, None, expected, events).await
    }

    /// Appends events to one stream atomically, giving a new stream `key` as its partition key
    /// (an existing stream must already have it).
    async fn append_with_key<'k>(
        &self,
        stream: &StreamId,
        key: Option<&'k PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended>;

    /// The events of one stream from `from_version` on, in version order (rehydration).
    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>>;

    /// Reads the next events of some slots.
    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>>;

    /// How far the request's cursors are behind: the lag of whoever holds them.
    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog>;

    /// How long reads have been held back by an open writing transaction, where the store's
    /// gap-safe read waits for them (PostgreSQL); `None` for stores that never wait.
    async fn read_horizon_stall(&self) -> StoreResult<Option<Duration>> {
        Ok(None)
    }

    /// The global position of the last committed event, where the store can tell at the cost of
    /// one index lookup; `None` where it cannot (the default). Workers estimate their lag beyond
    /// the count limit from it ([`crate::processing::estimate_lag`]); without it the lag metric
    /// stops at the limit.
    async fn head(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }
}

/// The application's own transaction around its appends: it declares the streams it will append
/// to when it begins (the store locks them then, before anything is written), may read them, appends
/// to them and writes its own rows (through the adapter's transaction), and commits or rolls back
/// everything together. Dropping it without `commit` keeps nothing.
///
/// Locking the streams first is what keeps per-stream order under PostgreSQL's commit-order reading:
/// a transaction must not take its transaction id (at its first write) before it holds the stream
/// and has read its version. The API therefore offers no way to write before the streams are locked.
///
/// # Contract
/// - `begin_unit_of_work` locks every declared stream (waiting for units of work and appends that
///   hold one of them) and registers the transaction as an appender; streams are locked in one
///   global order, so two units of work never deadlock on each other's streams.
/// - `append_with_key` follows [`EventStore::append_with_key`]'s rules and returns the stream's
///   new version; a stream that was not declared fails with `UndeclaredStream`. Appends are
///   visible to others only after `commit`.
/// - `read_stream` sees the committed events plus this unit of work's own appends.
/// - `commit` makes every append and every write of the transaction visible at once and returns
///   what each append wrote, in order; on failure (or drop) nothing is kept.
#[async_trait]
pub trait UnitOfWork: Send {
    /// Appends to a declared stream, keeping its partition key; returns its new version.
    async fn append(
        &mut self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<u64> {
        self.append_with_key(stream, None, expected, events).await
    }

    /// Appends to a declared stream, giving a new stream `key` as its partition key; returns its
    /// new version.
    async fn append_with_key(
        &mut self,
        stream: &StreamId,
        key: Option<&PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<u64>;

    /// The stream's events from `from_version` on, this unit of work's appends included.
    async fn read_stream(
        &mut self,
        stream: &StreamId,
        from_version: u64,
    ) -> StoreResult<Vec<Event>>;

    /// Commits the appends and the application's writes together; what each append wrote.
    async fn commit(self) -> StoreResult<Vec<Appended>>
    where
        Self: Sized;
}

/// An append as a unit of work of one stream: how every adapter implements
/// [`EventStore::append_with_key`], so there is one append path per store.
pub async fn append_in_unit_of_work<S: UnitOfWorkStore + ?Sized>(
    store: &S,
    stream: &StreamId,
    key: Option<&PartitionKey>,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> StoreResult<Appended> {
    let mut unit = store.begin_unit_of_work(std::slice::from_ref(stream)).await?;
    unit.append_with_key(stream, key, expected, events).await?;
    let mut appended = unit.commit().await?;
    Ok(appended.pop().expect("a unit of work reports each of its appends"))
}

/// Refuses an append to a stream a unit of work did not declare (and so did not lock).
pub fn check_declared(
    declared: &std::collections::BTreeSet<StreamId>,
    stream: &StreamId,
) -> StoreResult<()> {
    if declared.contains(stream) {
        Ok(())
    } else {
        Err(StoreError::UndeclaredStream { stream: stream.clone() })
    }
}

/// An event store whose appends can share a transaction with the application's own writes.
#[async_trait]
pub trait UnitOfWorkStore: EventStore {
    /// The unit of work (it holds the adapter's transaction).
    type UnitOfWork: UnitOfWork;

    /// Begins a unit of work that may append to `streams`, locking them.
    async fn begin_unit_of_work(&self, streams: &[StreamId]) -> StoreResult<Self::UnitOfWork>;
}
