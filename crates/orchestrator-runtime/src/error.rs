//! Why a worker stopped.

use orchestrator_core::WorkerId;
use orchestrator_core::ports::StoreError;
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
