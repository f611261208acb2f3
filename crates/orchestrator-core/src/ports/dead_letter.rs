//! The dead-letter port: events a projection parked under the `park` failure policy, per
//! partition key, and the requests (`orchestrator dlq retry|skip`) that unpark them.
//!
//! Per-key order is the rule everything here keeps: once one event of a key is parked, every later
//! event of that key is parked behind it until the key is retried or skipped, and a retry or a
//! skip always takes every letter of the key at once.

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::event::{Event, Position, StreamId};
use crate::ids::ReplicaSetName;
use crate::ports::checkpoint::CheckpointStore;
use crate::ports::error::StoreResult;
use crate::slot::Slot;

/// Identifies a dead letter (`orchestrator dlq show ID`).
pub type DeadLetterId = i64;

/// An event to park, written in the transaction whose commit moves the checkpoint past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The event's position.
    pub position: Position,
    /// Its slot.
    pub slot: Slot,
    /// Its partition key.
    pub key: String,
    /// Its stream.
    pub stream: StreamId,
    /// Its type.
    pub event_type: String,
    /// The handler's error; for an event parked behind an earlier letter of its key, that reason.
    pub error: String,
    /// Handler attempts made on it (0 for an event parked behind an earlier letter).
    pub attempts: u32,
}

impl NewDeadLetter {
    /// The letter parking `event` with `error` after `attempts` handler attempts.
    pub fn of(event: &Event, error: impl Into<String>, attempts: u32) -> Self {
        Self {
            position: event.position,
            slot: event.slot,
            key: event.partition_key.clone(),
            stream: event.stream.clone(),
            event_type: event.event_type.clone(),
            error: error.into(),
            attempts,
        }
    }
}

/// What an operator asked for a parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadLetterAction {
    /// Apply the key's parked events again, in order, through the projection.
    Retry,
    /// Drop the key's parked events (recorded) and apply its later events normally.
    Skip,
}

impl DeadLetterAction {
    /// How stores and the JSON output spell it (`retry`, `skip`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterAction::Retry => "retry",
            DeadLetterAction::Skip => "skip",
        }
    }
}

/// A parked event as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id.
    pub id: DeadLetterId,
    /// The projection that parked it.
    pub projection: String,
    /// The event's partition key.
    pub key: String,
    /// The event's slot.
    pub slot: Slot,
    /// The event's stream (its aggregate).
    pub stream: StreamId,
    /// The event's position.
    pub position: Position,
    /// The event's type.
    pub event_type: String,
    /// The last error.
    pub error: String,
    /// Handler attempts made on it in all.
    pub attempts: u32,
    /// When it was first parked, by the store's clock.
    pub first_failed_at: SystemTime,
    /// When it last failed, by the store's clock.
    pub last_failed_at: SystemTime,
    /// A retry or skip asked for and not carried out yet.
    pub requested: Option<DeadLetterAction>,
}

/// Which dead letters an operation concerns; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// One letter.
    pub id: Option<DeadLetterId>,
    /// One projection's.
    pub projection: Option<String>,
    /// One partition key's.
    pub key: Option<String>,
}

/// A pending retry or skip of one key, for the worker that owns the key's slot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadLetterRequest {
    /// The projection.
    pub projection: String,
    /// The key's slot.
    pub slot: Slot,
    /// The key.
    pub key: String,
    /// What to do.
    pub action: DeadLetterAction,
}

/// Dead letters of projections, written and resolved inside the fenced transactions of
/// [`CheckpointStore`].
///
/// # Contract
/// - `park` writes letters in `tx`; they are kept only if `commit` of that transaction succeeds
///   (so a fenced commit parks nothing). Parking an event already parked for the projection (a
///   retry that failed again) keeps its id and first failure, replaces its error, adds its attempts,
///   refreshes its last failure and clears its request.
/// - `parked_keys` lists the distinct keys with letters of a projection in the given slots.
/// - `dead_letters` lists the letters matching a filter, in position order; `dead_letter_counts`
///   the number of letters per projection (projections without any are absent).
/// - `request` marks, for every key that has a letter matching the filter, every letter of that key
///   with the action (so a key is always retried or skipped as a whole), and returns how many
///   letters it marked (0: none matched). `requests` lists the marked keys, one per (projection,
///   key).
/// - `parked_events` returns the events of one key's letters, in position order, with their ids,
///   read from the event store.
/// - `resolve` deletes, in `tx`, every letter of the key (kept only if the commit succeeds) and
///   returns how many it deleted; with `Skip` it also records each dropped letter (id, projection,
///   key, position, event type, error, when) in the store's log of skipped letters, which nothing
///   ever reads back into processing.
/// - `reset` and `remove` of [`CheckpointStore`] delete the projection's letters too (`reset` also
///   those its own transaction parked); `remove` also forgets the projection's log of skipped
///   letters, `reset` keeps it as a record.
/// - Everything is per replica set: no call sees or changes another replica set's letters.
#[async_trait]
pub trait DeadLetterStore: CheckpointStore {
    /// Parks events in `tx`.
    async fn park(
        &self,
        tx: &mut Self::Tx,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()>;

    /// The keys with letters of a projection in some slots.
    async fn parked_keys(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<Vec<(Slot, String)>>;

    /// The letters matching `filter`, in position order.
    async fn dead_letters(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
    ) -> StoreResult<Vec<DeadLetter>>;

    /// Letters per projection.
    async fn dead_letter_counts(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<BTreeMap<String, u64>>;

    /// Marks whole keys for a retry or a skip; the number of letters marked.
    async fn request(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
        action: DeadLetterAction,
    ) -> StoreResult<u64>;

    /// The marked keys.
    async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>>;

    /// The parked events of one key, in position order.
    async fn parked_events(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>>;

    /// Deletes every letter of a key in `tx` (recording a skip); the number deleted.
    async fn resolve(
        &self,
        tx: &mut Self::Tx,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64>;
}
