//! In-memory implementation of every port of `orchestrator-core`, plus [`ManualClock`].
//!
//! One [`MemoryStore`] plays the database: the event store, the coordination store and the
//! checkpoint store share its state behind one lock, so every call is atomic, and its clock is
//! whatever [`Clock`](orchestrator_core::Clock) it was given (a [`ManualClock`] in simulations).
//! It passes the same conformance suite as the SQL adapters; use it for property tests, simulation
//! and examples, not for production.
//!
//! Appending, reading a stream back, and a unit of work (the calls are the same on every store):
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::ports::{EventStore, StoreError, UnitOfWork, UnitOfWorkStore};
//! use orchestrator_core::{EventId, ExpectedVersion, NewEvent, SlotCount, StreamId};
//! use orchestrator_memory::{ManualClock, MemoryStore};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryStore::new(SlotCount::new(256)?, Arc::new(ManualClock::default()));
//! let account = StreamId::new("bank", "Account", "acct-1");
//! let opened = NewEvent::new(EventId::from_bytes([1; 16]), "AccountOpened", br#"{"owner":"ann"}"#.to_vec());
//! let appended = store.append(&account, ExpectedVersion::NoStream, vec![opened]).await?;
//! assert_eq!(appended.version, 1);
//!
//! // Rehydrate: the stream's events in version order, including the append that just returned.
//! let events = store.read_stream(&account, 0).await?;
//! assert_eq!(events[0].event_type, "AccountOpened");
//!
//! // Appending at a version someone else already moved past is a typed conflict.
//! let late = NewEvent::new(EventId::from_bytes([2; 16]), "MoneyDeposited", b"{}".to_vec());
//! let err = store.append(&account, ExpectedVersion::NoStream, vec![late]).await.unwrap_err();
//! assert!(matches!(err, StoreError::VersionConflict { actual: 1, .. }));
//!
//! // A unit of work: the append and the application's own row commit together.
//! let mut unit = store.begin_unit_of_work(std::slice::from_ref(&account)).await?;
//! let deposit = NewEvent::new(EventId::from_bytes([3; 16]), "MoneyDeposited", b"{}".to_vec());
//! unit.append(&account, ExpectedVersion::Exact(1), vec![deposit]).await?;
//! unit.tx().put("command_log", "cmd-7", b"done".to_vec());
//! unit.commit().await?;
//! assert_eq!(store.read_stream(&account, 0).await?.len(), 2);
//! assert_eq!(store.read_model_row("command_log", "cmd-7"), Some(b"done".to_vec()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]

mod clock;
mod dead_letters;
mod store;
mod unit_of_work;

pub use clock::ManualClock;
pub use store::{MemoryStore, MemoryTx};
pub use unit_of_work::MemoryUnitOfWork;
