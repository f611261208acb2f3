//! The pure heart of the projection orchestrator: domain types, the sticky slot assignment, the
//! per-worker coordination state machine ([`engine::Engine`]) and the port traits the adapters
//! implement.
//!
//! Nothing here does IO or reads a clock: time arrives as a [`Timestamp`] argument, storage through
//! the [`ports`] traits, and the runtime executes the [`engine::Command`]s the engine emits.
#![deny(missing_docs)]

pub mod assignment;
pub mod duration;
pub mod engine;
pub mod event;
pub mod ids;
pub mod plan;
pub mod ports;
pub mod processing;
pub mod quote;
pub mod schema;
pub mod slot;
pub mod snapshot;
pub mod time;
pub mod timing;

pub use duration::{InvalidDuration, parse_duration};
pub use engine::{Call, Command, Engine, EngineConfig, Exit, Input, Notice, Strategy};
pub use event::{
    Event, EventId, ExpectedVersion, NewEvent, PartitionKey, Position, Scope, StreamId, Tracing,
};
pub use ids::{Epoch, Generation, Incarnation, InvalidName, ReplicaSetName, TablePrefix, WorkerId};
pub use plan::{GenerationPlan, SlotAction, SlotChange};
pub use quote::{Quoted, quote};
pub use schema::{LedgerDialect, Migration, MigrationLedger, SchemaMigration};
pub use slot::{Slot, SlotCount, fnv1a_32};
pub use snapshot::{Lease, PROTOCOL_VERSION, Partition, SlotRecord, Snapshot, WorkerRecord};
#[cfg(feature = "mock")]
pub use time::MockClock;
pub use time::{Clock, Timestamp};
pub use timing::{InvalidTiming, Timing};
pub use uuid::Uuid;
