//! The ports: what the runtime needs from storage, implemented by the adapter crates.

pub mod change_feed;
pub mod checkpoint;
pub mod coordination;
pub mod dead_letter;
pub mod error;
pub mod event_store;

pub use change_feed::{Change, ChangeFeed};
pub use checkpoint::{CheckpointStore, Fence, ProjectionStop, StoppedProjection};
pub use coordination::{CoordinationStore, GenerationRecord, HeartbeatAck};
pub use dead_letter::{
    DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId, DeadLetterRequest,
    DeadLetterStore, NewDeadLetter,
};
pub use error::{
    BoxError, ErrorKind, StoreError, StoreResult, any_in_chain, has_retryable_store_error,
    is_store_failure_of,
};
pub use event_store::{
    Appended, Backlog, EventStore, ReadRequest, StreamHead, UnitOfWork, UnitOfWorkStore,
    append_in_unit_of_work, check_append, check_declared,
};

#[cfg(feature = "mock")]
pub use checkpoint::MockCheckpointStore;
#[cfg(feature = "mock")]
pub use coordination::MockCoordinationStore;
#[cfg(feature = "mock")]
pub use event_store::MockEventStore;
