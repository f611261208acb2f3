//! Events as the event store holds them, and what readers and appenders pass to it.

use std::fmt;

use uuid::Uuid;

use crate::ports::StoreError;
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

/// Unique id of an event: a UUID.
///
/// Core only holds ids; generating one (a time-ordered v7 UUID) happens outside it, in
/// `orchestrator-serde`'s `NewEvent` builders or the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub Uuid);

impl EventId {
    /// The id with these 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// The 16 bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl From<Uuid> for EventId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Display for EventId {
    /// The hyphenated lowercase form, `67e55044-10b1-426f-9247-bb680e5fe0c8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// The stream an event belongs to: one aggregate instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// Bounded context (`billing`).
    pub bounded_context: String,
    /// Aggregate type (`Invoice`).
    pub aggregate_type: String,
    /// Aggregate id; also the partition key that picks the slot, unless the stream was given its
    /// own [`PartitionKey`] at its first append.
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

impl StreamId {
    /// Checks that no part is empty: `InvalidStream`, before anything is written.
    pub fn validate(&self) -> Result<(), StoreError> {
        let parts = [
            ("bounded context", &self.bounded_context),
            ("aggregate type", &self.aggregate_type),
            ("aggregate id", &self.aggregate_id),
        ];
        match parts.iter().find(|(_, value)| value.is_empty()) {
            Some((part, _)) => Err(StoreError::InvalidStream {
                stream: self.clone(),
                reason: format!("the {part} is empty"),
            }),
            None => Ok(()),
        }
    }
}

/// The key that orders events and picks their slot: by default a stream's aggregate id; an
/// application may give a stream its own (a customer id, to order all of a customer's aggregates
/// together; a tenant id). It is fixed per stream at the stream's first append.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionKey(String);

impl PartitionKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// A partition key: not empty, at most [`PartitionKey::MAX_LEN`] bytes.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        let reason = if key.is_empty() {
            "is empty".to_owned()
        } else if key.len() > Self::MAX_LEN {
            format!("is {} bytes long, more than {}", key.len(), Self::MAX_LEN)
        } else {
            return Ok(Self(key));
        };
        Err(StoreError::InvalidPartitionKey { reason })
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
///
/// `orchestrator-serde` builds these from serde values with a generated id; [`NewEvent::new`]
/// takes an id the caller made.
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
    /// Metadata: the text of a JSON object (`{}` when there is none). Every store checks it the
    /// same way at append ([`NewEvent::validate`]).
    pub metadata: String,
    /// Causation, correlation and trace ids.
    pub tracing: Tracing,
}

impl NewEvent {
    /// An event of version 1 with empty metadata and no tracing ids.
    pub fn new(
        event_id: EventId,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            event_id,
            event_type: event_type.into(),
            event_version: 1,
            payload: payload.into(),
            metadata: "{}".to_owned(),
            tracing: Tracing::default(),
        }
    }

    /// Checks what every store requires before writing: a non-empty event type, and metadata that
    /// is a JSON object without NUL characters (PostgreSQL's `jsonb` cannot hold them, so no store
    /// accepts them). `InvalidEvent` otherwise.
    pub fn validate(&self) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidEvent { event_id: self.event_id, reason };
        if self.event_type.is_empty() {
            return Err(invalid("the event type is empty".to_owned()));
        }
        match serde_json::from_str::<serde_json::Value>(&self.metadata) {
            Ok(serde_json::Value::Object(map)) => {
                if contains_nul(&serde_json::Value::Object(map)) {
                    Err(invalid("its metadata holds a NUL character (\\u0000)".to_owned()))
                } else {
                    Ok(())
                }
            }
            Ok(other) => Err(invalid(format!(
                "its metadata must be a JSON object, not {}",
                json_kind(&other)
            ))),
            Err(err) => Err(invalid(format!("its metadata is not JSON: {err}"))),
        }
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
        }
        _ => false,
    }
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
    /// The stream's partition key (its aggregate id unless it was given one).
    pub partition_key: String,
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
        let id = EventId::from_bytes([
            0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f,
            0xe0, 0xc8,
        ]);
        assert_eq!(id.to_string(), "67e55044-10b1-426f-9247-bb680e5fe0c8");
    }

    #[test]
    fn metadata_must_be_a_json_object_without_nul() {
        let mut event = NewEvent::new(EventId::default(), "Opened", b"{}".to_vec());
        assert!(event.validate().is_ok());
        for (metadata, expected) in [
            ("", "not JSON"),
            ("[]", "not an array"),
            ("null", "not null"),
            ("{\"a\":", "not JSON"),
            ("{\"a\":\"x\\u0000y\"}", "NUL"),
        ] {
            event.metadata = metadata.to_owned();
            let err = event.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{metadata:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        event.metadata = "{\"user\":\"ann\",\"n\":[1,2]}".to_owned();
        assert!(event.validate().is_ok());
        event.event_type.clear();
        assert!(event.validate().unwrap_err().to_string().contains("event type is empty"));
    }

    #[test]
    fn partition_keys_and_stream_ids_are_checked() {
        assert!(PartitionKey::new("customer-7").is_ok());
        assert!(PartitionKey::new("").unwrap_err().to_string().contains("is empty"));
        let long = PartitionKey::new("k".repeat(5000)).unwrap_err().to_string();
        assert!(long.contains("5000 bytes"), "{long}");
        assert!(long.len() < 200, "quoted briefly: {long}");
        assert!(StreamId::new("bank", "Account", "a-1").validate().is_ok());
        let err = StreamId::new("bank", "", "a-1").validate().unwrap_err().to_string();
        assert!(err.contains("aggregate type is empty"), "{err}");
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
