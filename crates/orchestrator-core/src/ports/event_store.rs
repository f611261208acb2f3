//! The event store port: append with optimistic concurrency, gap-safe read by slot.

use std::time::Duration;

use async_trait::async_trait;

use crate::event::{Event, ExpectedVersion, NewEvent, Position, Scope, StreamId};
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

/// The checks every append makes before writing, shared by the adapters: the stream's `current`
/// version satisfies `expected` (else `VersionConflict`), and no event id appears twice in the batch
/// (else `DuplicateEvent`). Ids already stored are the adapter's to check.
pub fn check_append(
    stream: &StreamId,
    expected: ExpectedVersion,
    current: u64,
    events: &[NewEvent],
) -> StoreResult<()> {
    if !expected.allows(current) {
        return Err(StoreError::VersionConflict {
            stream: stream.clone(),
            expected,
            actual: current,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    match events.iter().find(|e| !seen.insert(e.event_id)) {
        Some(duplicate) => Err(StoreError::DuplicateEvent { event_id: duplicate.event_id }),
        None => Ok(()),
    }
}

/// Events appended and read by global position.
///
/// # Contract
/// - `append` writes all of `events` for one stream or none. Versions continue from the stream's
///   current version (the first event of a new stream is version 1).
///   `ExpectedVersion::NoStream` fails with `VersionConflict` if the stream has events;
///   `Exact(v)` fails unless the stream's last version is `v`; `Any` never conflicts.
///   A duplicate event id fails with `DuplicateEvent`. An empty `events` writes nothing and
///   returns the current version with `first_global > last_global`.
/// - The slot of every event is `slot_count().slot_of(aggregate_id)`, stored at append time.
/// - One append is one transaction that writes nothing before it has checked the stream's version,
///   and appends to one stream only; so commit order and version order agree per stream.
/// - `read` returns, in ascending `Position` order, at most `limit` events whose slot is among the
///   cursors, whose position is greater than that slot's cursor, and that are in scope.
/// - `read` is gap-safe: once it has returned an event at position `p`, no event at a position
///   below `p` can become visible later. Every committed event is eventually returned.
/// - Events of one stream are returned in version order.
/// - So a reader may move all its cursors past a batch's last event ([`ReadRequest::advance_past`]).
/// - `backlog` counts the committed events of the requested slots after their cursors and in
///   scope, up to `limit` (so its cost stays bounded however far behind a reader is), and ages the
///   next event of each slot by the store's own clock, never the caller's.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// The slot count events are bucketed by.
    fn slot_count(&self) -> SlotCount;

    /// Appends events to one stream atomically.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended>;

    /// Reads the next events of some slots.
    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>>;

    /// How far the request's cursors are behind: the lag of whoever holds them.
    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog>;

    /// How long reads have been held back by an open writing transaction, where the store's
    /// gap-safe read waits for them (PostgreSQL); `None` for stores that never wait.
    async fn read_horizon_stall(&self) -> StoreResult<Option<Duration>> {
        Ok(None)
    }
}
