//! The one error type of every port, so the runtime can decide what to retry.

use crate::event::{EventId, ExpectedVersion, StreamId};
use crate::ids::{Generation, ReplicaSetName, WorkerId};
use crate::slot::{Slot, SlotCount};

/// Boxed error source from an adapter.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result of a port call.
pub type StoreResult<T> = Result<T, StoreError>;

/// An error from a port.
///
/// `Unavailable` is transient (retry with backoff); every other variant is a definite answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Optimistic concurrency on append failed.
    #[error("version conflict on {stream}: expected {expected}, stream is at {actual}")]
    VersionConflict {
        /// The stream appended to.
        stream: StreamId,
        /// What the appender expected.
        expected: ExpectedVersion,
        /// The stream's version (0 when it does not exist).
        actual: u64,
    },
    /// An event with this id already exists.
    #[error("duplicate event id {event_id}")]
    DuplicateEvent {
        /// The event id.
        event_id: EventId,
    },
    /// An event to append is malformed (its metadata is not a JSON object, its type is empty);
    /// nothing was written.
    #[error("invalid event {event_id}: {reason}")]
    InvalidEvent {
        /// The event.
        event_id: EventId,
        /// What is wrong with it.
        reason: String,
    },
    /// A stream id has an empty part; nothing was written.
    #[error("invalid stream {stream}: {reason}")]
    InvalidStream {
        /// The stream.
        stream: StreamId,
        /// What is wrong with it.
        reason: String,
    },
    /// A partition key is empty or too long.
    #[error("invalid partition key: it {reason}")]
    InvalidPartitionKey {
        /// What is wrong with it.
        reason: String,
    },
    /// An append gave a stream another partition key than the one fixed at its first append;
    /// nothing was written.
    #[error(
        "stream {stream} has partition key {stored:?}; an append cannot change it to {given:?}"
    )]
    PartitionKeyMismatch {
        /// The stream.
        stream: StreamId,
        /// The key fixed at its first append.
        stored: String,
        /// The key this append gave.
        given: String,
    },
    /// A unit of work appended to a stream it did not declare when it began (so did not lock).
    #[error(
        "stream {stream} was not declared when the unit of work began; declare every stream it appends to"
    )]
    UndeclaredStream {
        /// The stream.
        stream: StreamId,
    },
    /// The worker no longer owns a slot at the epoch it committed under; nothing was written.
    #[error("fenced: worker {worker} no longer owns slot {slot} at the epoch it was granted")]
    Fenced {
        /// The worker that tried to commit.
        worker: WorkerId,
        /// The first slot found not owned.
        slot: Slot,
    },
    /// The generation moved on, or the proposer does not hold the leader lease, or a changed slot's
    /// epoch moved: the plan was not applied.
    #[error("generation conflict in {replica_set}: expected generation {expected}, found {actual}")]
    GenerationConflict {
        /// The replica set.
        replica_set: ReplicaSetName,
        /// Generation the plan expected.
        expected: Generation,
        /// Generation found (equal to `expected` when the lease or a slot epoch was the cause).
        actual: Generation,
    },
    /// The worker is not registered under that incarnation (evicted, left, or re-registered).
    #[error("worker {worker} is not registered in {replica_set} under this incarnation")]
    NotRegistered {
        /// The replica set.
        replica_set: ReplicaSetName,
        /// The worker.
        worker: WorkerId,
    },
    /// The replica set does not exist yet.
    #[error("replica set {0} does not exist")]
    UnknownReplicaSet(ReplicaSetName),
    /// The replica set exists with another slot count.
    #[error("replica set {replica_set} has {stored} slots, the configuration says {configured}")]
    SlotCountMismatch {
        /// The replica set.
        replica_set: ReplicaSetName,
        /// Slot count stored with the replica set.
        stored: SlotCount,
        /// Slot count configured.
        configured: SlotCount,
    },
    /// A checkpoint would move backwards.
    #[error("checkpoint of {projection} slot {slot} would move backwards")]
    CheckpointRegression {
        /// The projection.
        projection: String,
        /// The slot.
        slot: Slot,
    },
    /// Transient failure: connection lost, server restarting, serialization failure, deadlock, pool
    /// timeout. Retry with backoff.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The store is not set up as expected: missing tables (run migrations), wrong credentials,
    /// invalid URL. Not retried.
    #[error("store misconfigured: {message}")]
    Misconfigured {
        /// What is wrong and how to fix it.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// Anything else.
    #[error("store error: {message}")]
    Other {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

/// Whether `error` or one of its sources is a retryable [`StoreError`] (the default of
/// [`CheckpointStore::is_store_failure`](crate::ports::CheckpointStore::is_store_failure)).
pub fn has_retryable_store_error(error: &(dyn std::error::Error + 'static)) -> bool {
    any_in_chain(error, |e| e.downcast_ref::<StoreError>().is_some_and(StoreError::is_retryable))
}

/// What an adapter makes of a driver's error, for [`StoreError::classified`] and
/// [`is_store_failure_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retrying may succeed (connection lost, server restarting, serialization failure, busy).
    Transient,
    /// A table or column is missing: the schema was never migrated, or is old.
    MissingSchema,
    /// A setup mistake (credentials, unknown database, unusable file, bad URL).
    Misconfigured,
    /// Anything else: a definite failure.
    Other,
}

impl StoreError {
    /// The port error for a driver error of the given kind, `message` naming the operation.
    pub fn classified(kind: ErrorKind, message: String, source: impl Into<BoxError>) -> Self {
        match kind {
            ErrorKind::Transient => StoreError::unavailable(message, source),
            ErrorKind::MissingSchema => StoreError::Misconfigured {
                message: format!(
                    "{message} (the schema is missing or old: run `orchestrator migrate`)"
                ),
                source: Some(source.into()),
            },
            ErrorKind::Misconfigured => {
                StoreError::Misconfigured { message, source: Some(source.into()) }
            }
            ErrorKind::Other => StoreError::other(message, source),
        }
    }
}

/// Whether `error` or one of its sources is a store failure: a retryable [`StoreError`], or a
/// driver error `E` that `kind` calls transient. What SQL adapters answer for
/// [`CheckpointStore::is_store_failure`](crate::ports::CheckpointStore::is_store_failure).
pub fn is_store_failure_of<E: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
    kind: impl Fn(&E) -> ErrorKind,
) -> bool {
    has_retryable_store_error(error)
        || any_in_chain(error, |e| {
            e.downcast_ref::<E>().is_some_and(|e| kind(e) == ErrorKind::Transient)
        })
}

/// Whether `error` or one of its sources satisfies `test`.
pub fn any_in_chain(
    error: &(dyn std::error::Error + 'static),
    test: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if test(error) {
            return true;
        }
        current = error.source();
    }
    false
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Whether the error means this worker lost a slot or the leader lost its plan: a definite "no".
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Fenced { .. }
                | StoreError::GenerationConflict { .. }
                | StoreError::VersionConflict { .. }
        )
    }

    /// A transient failure with a message.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable { message: message.into(), source: Some(source.into()) }
    }

    /// The orchestrator's tables are missing under `prefix`.
    pub fn missing_schema(prefix: &str) -> Self {
        StoreError::Misconfigured {
            message: format!(
                "no orchestrator schema under prefix {prefix:?}: run `orchestrator migrate`"
            ),
            source: None,
        }
    }

    /// The event store's slot count, stored as `value` under `prefix`, is unreadable or differs
    /// from `configured` (when given).
    pub fn check_stored_slot_count(
        prefix: &str,
        value: Option<String>,
        configured: Option<SlotCount>,
    ) -> StoreResult<SlotCount> {
        let value = value.ok_or_else(|| Self::missing_schema(prefix))?;
        let stored =
            value.parse::<u64>().ok().and_then(|n| SlotCount::new(n).ok()).ok_or_else(|| {
                StoreError::Misconfigured {
                    message: format!("corrupt slot count {value:?} in {prefix}meta"),
                    source: None,
                }
            })?;
        match configured {
            Some(configured) if configured != stored => Err(StoreError::Misconfigured {
                message: format!(
                    "the event store under prefix {prefix:?} buckets events into {stored} slots; \
                     the configuration says {configured}"
                ),
                source: None,
            }),
            _ => Ok(stored),
        }
    }

    /// The worker's incarnation is not registered (it was deregistered, evicted, or superseded).
    pub fn not_registered(replica_set: &ReplicaSetName, worker: &WorkerId) -> Self {
        StoreError::NotRegistered { replica_set: replica_set.clone(), worker: worker.clone() }
    }

    /// A worker id as a store read it back: one that is no longer valid means a corrupt row.
    pub fn stored_worker_id(text: String) -> StoreResult<WorkerId> {
        WorkerId::new(text).map_err(|e| StoreError::Other {
            message: format!("corrupt worker id: {e}"),
            source: None,
        })
    }

    /// Refuses a worker configured with another slot count than the replica set's `stored` one.
    pub fn check_slot_count(
        replica_set: &ReplicaSetName,
        stored: u64,
        configured: SlotCount,
    ) -> StoreResult<()> {
        if stored == u64::from(configured.get()) {
            return Ok(());
        }
        Err(StoreError::SlotCountMismatch {
            replica_set: replica_set.clone(),
            stored: SlotCount::new(stored).unwrap_or_default(),
            configured,
        })
    }

    /// An unclassified failure with a message.
    pub fn other(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Other { message: message.into(), source: Some(source.into()) }
    }
}
