//! In-memory implementation of every port of `orchestrator-core`, plus [`ManualClock`].
//!
//! One [`MemoryStore`] plays the database: the event store, the coordination store and the
//! checkpoint store share its state behind one lock, so every call is atomic, and its clock is
//! whatever [`Clock`](orchestrator_core::Clock) it was given (a [`ManualClock`] in simulations).
//! It passes the same conformance suite as the SQL adapters; use it for property tests, simulation
//! and examples, not for production.
#![deny(missing_docs)]

mod clock;
mod store;
mod unit_of_work;

pub use clock::ManualClock;
pub use store::{MemoryStore, MemoryTx};
pub use unit_of_work::MemoryUnitOfWork;
