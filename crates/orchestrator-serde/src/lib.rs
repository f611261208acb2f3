//! Typed events: the application's side of serialization, kept out of the pure core.
//!
//! An application's events are a serde type implementing [`DomainEvent`] (usually an enum with
//! `#[serde(tag = "type")]`, one variant per event type). [`NewEventExt::typed`] turns a value into a
//! [`NewEvent`] with a generated, time-ordered id (UUID v7) and its JSON payload;
//! [`EventExt::decode`] turns a stored [`Event`] back into the type, upcasting payloads written by
//! older versions first.
//!
//! ```
//! use orchestrator_core::NewEvent;
//! use orchestrator_serde::{DomainEvent, EventExt, NewEventExt};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! #[serde(tag = "type")]
//! enum Account {
//!     Opened { owner: String },
//!     Deposited { amount: i64 },
//! }
//!
//! impl DomainEvent for Account {
//!     fn event_type(&self) -> &'static str {
//!         match self {
//!             Account::Opened { .. } => "Opened",
//!             Account::Deposited { .. } => "Deposited",
//!         }
//!     }
//! }
//!
//! let new = NewEvent::typed(&Account::Deposited { amount: 5 })?
//!     .with_metadata(serde_json::json!({ "user": "ann" }))?;
//! assert_eq!(new.event_type, "Deposited");
//! # let stored = orchestrator_core::Event {
//! #     position: Default::default(), stream: orchestrator_core::StreamId::new("bank", "Account", "a"),
//! #     aggregate_version: 1, partition_key: "a".into(), slot: orchestrator_core::Slot(0),
//! #     event_id: new.event_id, event_type: new.event_type.clone(), event_version: new.event_version,
//! #     payload: new.payload.clone(), metadata: new.metadata.clone(), tracing: Default::default(),
//! #     created_at: orchestrator_core::Timestamp(0) };
//! // ... appended, then read back as `stored`:
//! assert_eq!(stored.decode::<Account>()?, Account::Deposited { amount: 5 });
//! assert_eq!(stored.metadata_json()?["user"], "ann");
//! # Ok::<(), orchestrator_serde::EventError>(())
//! ```
#![deny(missing_docs)]

use orchestrator_core::{Event, EventId, NewEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// An application's event type, stored as JSON.
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// The schema version this build writes (and decodes to); raise it when the payload's shape
    /// changes, and teach [`DomainEvent::upcast`] the older ones.
    const VERSION: u32 = 1;

    /// The stored event type of this value (for an enum, its variant's name).
    fn event_type(&self) -> &'static str;

    /// Turns the JSON payload of an event written at an older `version` into the current shape.
    /// The default knows no older version.
    fn upcast(event_type: &str, version: u32, payload: Value) -> Result<Value, EventError> {
        let _ = payload;
        Err(EventError::NoUpcast { event_type: event_type.to_owned(), version })
    }
}

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The value or its metadata could not be serialized.
    #[error("cannot serialize the event: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Metadata must be a JSON object.
    #[error("event metadata must be a JSON object")]
    MetadataNotAnObject,
    /// A stored payload or its metadata is not what the type expects.
    #[error("cannot decode event {event_id} ({event_type} v{version}): {source}")]
    Decode {
        /// The event.
        event_id: EventId,
        /// Its stored type.
        event_type: String,
        /// Its stored schema version.
        version: u32,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The event was written by a newer build than this one.
    #[error("event type {event_type} v{version} is newer than this build's v{known}")]
    NewerVersion {
        /// Its stored type.
        event_type: String,
        /// Its stored schema version.
        version: u32,
        /// The version this build knows.
        known: u32,
    },
    /// No upcast is known from an older version.
    #[error("no upcast from {event_type} v{version}")]
    NoUpcast {
        /// Its stored type.
        event_type: String,
        /// Its stored schema version.
        version: u32,
    },
}

/// A new, time-ordered event id (UUID v7): ids sort by creation time, which keeps the unique index
/// on event ids append-friendly.
pub fn new_event_id() -> EventId {
    EventId(uuid::Uuid::now_v7())
}

/// Builds [`NewEvent`]s from typed values.
pub trait NewEventExt: Sized {
    /// The event for `value`: a new id, its type and version, its JSON payload, no metadata.
    fn typed<E: DomainEvent>(value: &E) -> Result<Self, EventError>;

    /// Replaces the metadata with `metadata`, which must serialize to a JSON object.
    fn with_metadata(self, metadata: impl Serialize) -> Result<Self, EventError>;
}

impl NewEventExt for NewEvent {
    fn typed<E: DomainEvent>(value: &E) -> Result<Self, EventError> {
        let payload = serde_json::to_vec(value).map_err(EventError::Serialize)?;
        let mut event = NewEvent::new(new_event_id(), value.event_type(), payload);
        event.event_version = E::VERSION;
        Ok(event)
    }

    fn with_metadata(mut self, metadata: impl Serialize) -> Result<Self, EventError> {
        match serde_json::to_value(metadata).map_err(EventError::Serialize)? {
            Value::Object(map) => {
                self.metadata = Value::Object(map).to_string();
                Ok(self)
            }
            _ => Err(EventError::MetadataNotAnObject),
        }
    }
}

/// Reads typed values out of stored [`Event`]s.
pub trait EventExt {
    /// The payload as `E`, upcast first when it was written at an older version.
    fn decode<E: DomainEvent>(&self) -> Result<E, EventError>;

    /// The metadata as a JSON object.
    fn metadata_json(&self) -> Result<Map<String, Value>, EventError>;
}

impl EventExt for Event {
    fn decode<E: DomainEvent>(&self) -> Result<E, EventError> {
        let decode_err = |source| EventError::Decode {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            version: self.event_version,
            source,
        };
        if self.event_version > E::VERSION {
            return Err(EventError::NewerVersion {
                event_type: self.event_type.clone(),
                version: self.event_version,
                known: E::VERSION,
            });
        }
        if self.event_version == E::VERSION {
            return serde_json::from_slice(&self.payload).map_err(decode_err);
        }
        let payload: Value = serde_json::from_slice(&self.payload).map_err(decode_err)?;
        let current = E::upcast(&self.event_type, self.event_version, payload)?;
        serde_json::from_value(current).map_err(decode_err)
    }

    fn metadata_json(&self) -> Result<Map<String, Value>, EventError> {
        match serde_json::from_str(&self.metadata) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(EventError::MetadataNotAnObject),
            Err(source) => Err(EventError::Decode {
                event_id: self.event_id,
                event_type: self.event_type.clone(),
                version: self.event_version,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::{Position, Slot, StreamId, Timestamp};
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type")]
    enum Account {
        Opened { owner: String },
        Deposited { amount_cents: i64 },
    }

    impl DomainEvent for Account {
        const VERSION: u32 = 2;

        fn event_type(&self) -> &'static str {
            match self {
                Account::Opened { .. } => "Opened",
                Account::Deposited { .. } => "Deposited",
            }
        }

        // Version 1 stored whole units as `amount`.
        fn upcast(event_type: &str, version: u32, mut payload: Value) -> Result<Value, EventError> {
            if version == 1 && event_type == "Deposited" {
                let amount = payload["amount"].as_i64().unwrap_or(0);
                payload["amount_cents"] = Value::from(amount * 100);
            }
            Ok(payload)
        }
    }

    fn stored(new: &NewEvent) -> Event {
        Event {
            position: Position::global(1),
            stream: StreamId::new("bank", "Account", "a"),
            aggregate_version: 1,
            partition_key: "a".into(),
            slot: Slot(0),
            event_id: new.event_id,
            event_type: new.event_type.clone(),
            event_version: new.event_version,
            payload: new.payload.clone(),
            metadata: new.metadata.clone(),
            tracing: Default::default(),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn round_trips_with_a_time_ordered_id() {
        let first = NewEvent::typed(&Account::Opened { owner: "ann".into() }).unwrap();
        let second = NewEvent::typed(&Account::Deposited { amount_cents: 5 }).unwrap();
        assert_eq!(first.event_id.0.get_version_num(), 7);
        assert!(first.event_id < second.event_id, "v7 ids sort by creation");
        assert_eq!((second.event_type.as_str(), second.event_version), ("Deposited", 2));
        assert!(second.validate().is_ok());
        assert_eq!(
            stored(&second).decode::<Account>().unwrap(),
            Account::Deposited { amount_cents: 5 }
        );
    }

    #[test]
    fn older_versions_are_upcast_and_newer_refused() {
        let mut old = NewEvent::new(
            new_event_id(),
            "Deposited",
            br#"{"type":"Deposited","amount":3}"#.to_vec(),
        );
        old.event_version = 1;
        assert_eq!(
            stored(&old).decode::<Account>().unwrap(),
            Account::Deposited { amount_cents: 300 }
        );
        old.event_version = 3;
        let err = stored(&old).decode::<Account>().unwrap_err();
        assert!(matches!(err, EventError::NewerVersion { version: 3, known: 2, .. }), "{err}");
        old.event_version = 2;
        old.payload = b"not json".to_vec();
        assert!(
            stored(&old).decode::<Account>().unwrap_err().to_string().contains("cannot decode")
        );
    }

    #[test]
    fn metadata_must_be_an_object() {
        let event = NewEvent::typed(&Account::Opened { owner: "ann".into() }).unwrap();
        let with = event.clone().with_metadata(serde_json::json!({"user": "ann"})).unwrap();
        assert_eq!(stored(&with).metadata_json().unwrap()["user"], "ann");
        assert!(matches!(event.with_metadata(vec![1, 2]), Err(EventError::MetadataNotAnObject)));
    }
}
