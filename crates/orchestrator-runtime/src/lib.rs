//! The tokio runtime of the projection orchestrator.
//!
//! An [`Orchestrator`] is one worker of a replica set: it registers through the coordination store,
//! heartbeats, takes part in leader election and generations (all decided by the pure engine of
//! `orchestrator-core`), processes the events of the slots it owns with the user's
//! [`Projection`]s, commits each batch under the slot fence, and leaves gracefully on shutdown.
//!
//! ```no_run
//! # async fn example(store: orchestrator_memory::MemoryStore) -> Result<(), Box<dyn std::error::Error>> {
//! use orchestrator_runtime::{Orchestrator, Settings};
//! let settings = Settings::from_env()?; // REPLICA_SET, HEARTBEAT_INTERVAL, BATCH_SIZE, ...
//! let worker = Orchestrator::new(store, settings)?;
//! // Send on `stop` (from a SIGTERM handler, say) to leave gracefully.
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! worker.run(async { let _ = stopped.await; }, vec![]).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod clock;
mod error;
mod health;
mod lifecycle;
mod metrics;
mod processor;
mod projection;
mod settings;
mod signal;
pub mod status;
mod telemetry;
mod worker;

use orchestrator_core::ports::{CheckpointStore, CoordinationStore, DeadLetterStore, EventStore};

pub use clock::SystemClock;
pub use error::RunError;
pub use lifecycle::{ResetError, WaitError, reset_projection, wait_for_projection};
pub use projection::{HandlerError, Permanent, Projection};
pub use settings::{
    FailurePolicy, InvalidSetting, RetryPolicy, Settings, parse_duration, parse_failure_policy,
    parse_strategy,
};
pub use signal::shutdown_signal;
pub use telemetry::{Server, Telemetry, TelemetryError};
pub use worker::Orchestrator;

/// A store the runtime can run on: every port, cheap to clone (a pool handle).
pub trait Store:
    EventStore + CoordinationStore + CheckpointStore + DeadLetterStore + Clone + Send + Sync + 'static
{
}

impl<T> Store for T where
    T: EventStore
        + CoordinationStore
        + CheckpointStore
        + DeadLetterStore
        + Clone
        + Send
        + Sync
        + 'static
{
}
