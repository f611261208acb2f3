//! A small bank ledger on the orchestrator: the pieces an application writes.
//!
//! - [`account`]: the domain (events, state, decisions), pure;
//! - [`commands`]: the command side (rehydrate from the stream, decide, append with a retry on
//!   version conflicts);
//! - [`balances`]: the `account_balances` read model, one transactional projection for
//!   PostgreSQL and SQLite alike, and its schema.
//! - `diesel_balances` (feature `diesel`): the same read model written with diesel-async, for
//!   PostgreSQL; its workers and the sqlx ones share the projection's checkpoints.
//!
//! The binary (`src/main.rs`) wires them to a store, a worker and a simulation.
#![deny(missing_docs)]

pub mod account;
pub mod balances;
pub mod commands;
#[cfg(feature = "diesel")]
pub mod diesel_balances;
