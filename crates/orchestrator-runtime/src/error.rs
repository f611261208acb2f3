//! Why a worker stopped.

use orchestrator_core::ports::{BoxError, StoreError};
use orchestrator_core::{Position, WorkerId};
use thiserror::Error;

use crate::settings::InvalidSetting;

/// A worker's `run` ended with an error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RunError {
    /// A setting was rejected before starting.
    #[error(transparent)]
    InvalidSetting(#[from] InvalidSetting),
    /// The store refused the worker for good (schema missing, slot count mismatch, bad credentials).
    #[error("cannot join the replica set: {0}")]
    Store(#[source] StoreError),
    /// A projection's handler kept failing on an event; the worker left the replica set.
    #[error(
        "projection {projection} stopped at position {position} (aggregate {aggregate}, event type {event_type}) after {attempts} attempts: {source}"
    )]
    ProjectionFailed {
        /// The projection.
        projection: String,
        /// Position of the failing event (the first of the batch if the handler did not say).
        position: Position,
        /// The failing event's stream.
        aggregate: String,
        /// The failing event's type.
        event_type: String,
        /// Attempts made.
        attempts: u32,
        /// The handler's last error.
        #[source]
        source: BoxError,
    },
    /// Another process registered under this worker id; this one stopped.
    #[error("worker id {0} was registered again by another process; this one stopped")]
    Superseded(WorkerId),
    /// Live workers of the replica set speak another coordination protocol (another release);
    /// this one left without taking part.
    #[error(
        "workers of another release are running in this replica set ({}); this release speaks coordination protocol {}: scale the replica set to zero, run migrate, then start the new release",
        workers.join(", "),
        orchestrator_core::PROTOCOL_VERSION
    )]
    IncompatibleWorkers {
        /// The workers, with the protocol each speaks.
        workers: Vec<String>,
    },
}
