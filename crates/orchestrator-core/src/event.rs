//! Events as the event store holds them, and what readers and appenders pass to it.

use std::fmt;

use crate::slot::Slot;
use crate::time::Timestamp;

/// Where an event stands in the commit-safe order of the store.
///
/// Ordered by `(commit, global)`. `commit` orders transactions as they become visible
/// (PostgreSQL: the appending transaction's id, read only below the oldest running transaction);
/// stores whose appends are serial (SQLite, memory) keep it at 0 and order by `global` alone.
/// A checkpoint is the last position processed; reading resumes strictly after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Commit order key (transaction id where the store needs one, else 0).
    pub commit: u64,
    /// The event's global position (unique, assigned at append).
    pub global: u64,
}

impl Position {
    /// Before every event.
    pub const START: Position = Position { commit: 0, global: 0 };

    /// A position in a store without a commit key.
    pub fn global(global: u64) -> Self {
        Self { commit: 0, global }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.commit == 0 {
            write!(f, "{}", self.global)
        } else {
            write!(f, "{}@{}", self.global, self.commit)
        }
    }
}

/// Unique id of an event: a UUID, as 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub [u8; 16]);

impl fmt::Display for EventId {
    /// The hyphenated lowercase form, `67e55044-10b1-426f-9247-bb680e5fe0c8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// The stream an event belongs to: one aggregate instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// Bounded context (`billing`).
    pub bounded_context: String,
    /// Aggregate type (`Invoice`).
    pub aggregate_type: String,
    /// Aggregate id; also the partition key that picks the slot.
    pub aggregate_id: String,
}

impl StreamId {
    /// Builds a stream id.
    pub fn new(
        bounded_context: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
    ) -> Self {
        Self {
            bounded_context: bounded_context.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.bounded_context, self.aggregate_type, self.aggregate_id)
    }
}

/// The version an appender expects the stream to be at (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at version `current` (0: no events) satisfies this expectation.
    pub fn allows(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(version) => current == version,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Correlation fields carried through from the command that produced an event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tracing {
    /// Id of the message that caused this event.
    pub causation_id: Option<String>,
    /// Id shared by every message of one business transaction.
    pub correlation_id: Option<String>,
    /// Distributed-tracing id.
    pub trace_id: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique id; the store refuses a duplicate.
    pub event_id: EventId,
    /// Event type (`InvoiceIssued`).
    pub event_type: String,
    /// Schema version of the payload.
    pub event_version: u32,
    /// Serialized payload.
    pub payload: Vec<u8>,
    /// Metadata as JSON text.
    pub metadata: String,
    /// Causation, correlation and trace ids.
    pub tracing: Tracing,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Where it stands in the commit-safe order.
    pub position: Position,
    /// Its aggregate.
    pub stream: StreamId,
    /// Version of the aggregate after this event (1 for the first).
    pub aggregate_version: u64,
    /// Slot computed from the partition key at append time.
    pub slot: Slot,
    /// Unique id.
    pub event_id: EventId,
    /// Event type.
    pub event_type: String,
    /// Schema version of the payload.
    pub event_version: u32,
    /// Serialized payload.
    pub payload: Vec<u8>,
    /// Metadata as JSON text.
    pub metadata: String,
    /// Causation, correlation and trace ids.
    pub tracing: Tracing,
    /// When it was appended, by the store's clock.
    pub created_at: Timestamp,
}

/// Which events a projection cares about; events outside still advance its checkpoints.
///
/// Values within one list are alternatives; the two lists must both match; an empty list matches all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// Aggregate types to include (empty: all).
    pub aggregate_types: Vec<String>,
    /// Bounded contexts to include (empty: all).
    pub bounded_contexts: Vec<String>,
}

impl Scope {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Whether a stream is in scope.
    pub fn includes(&self, stream: &StreamId) -> bool {
        (self.aggregate_types.is_empty() || self.aggregate_types.contains(&stream.aggregate_type))
            && (self.bounded_contexts.is_empty()
                || self.bounded_contexts.contains(&stream.bounded_context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_print_as_uuids() {
        let id = EventId([
            0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f,
            0xe0, 0xc8,
        ]);
        assert_eq!(id.to_string(), "67e55044-10b1-426f-9247-bb680e5fe0c8");
    }

    #[test]
    fn positions_order_by_commit_then_global() {
        let early_commit_high_global = Position { commit: 5, global: 90 };
        let late_commit_low_global = Position { commit: 6, global: 80 };
        assert!(early_commit_high_global < late_commit_low_global);
        assert!(Position::START < Position::global(1));
    }

    #[test]
    fn expected_versions() {
        assert!(ExpectedVersion::Any.allows(7));
        assert!(ExpectedVersion::NoStream.allows(0));
        assert!(!ExpectedVersion::NoStream.allows(1));
        assert!(ExpectedVersion::Exact(3).allows(3));
        assert!(!ExpectedVersion::Exact(3).allows(2));
    }

    #[test]
    fn scope_lists_are_anded_values_ored() {
        let scope = Scope {
            aggregate_types: vec!["Order".into(), "Invoice".into()],
            bounded_contexts: vec!["billing".into()],
        };
        assert!(scope.includes(&StreamId::new("billing", "Invoice", "1")));
        assert!(!scope.includes(&StreamId::new("shipping", "Invoice", "1")));
        assert!(!scope.includes(&StreamId::new("billing", "Customer", "1")));
        assert!(Scope::all().includes(&StreamId::new("x", "y", "z")));
    }
}
