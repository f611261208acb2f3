//! What users implement: projections, handed batches of events and the store's transaction.

use async_trait::async_trait;
use orchestrator_core::ports::BoxError;
use orchestrator_core::{Event, Scope};

/// A handler failed on one event of a batch (or somewhere in it, when `index` is `None`).
#[derive(Debug)]
pub struct HandlerError {
    /// Index in the batch of the event that failed, if known.
    pub index: Option<usize>,
    /// What went wrong.
    pub source: BoxError,
}

impl HandlerError {
    /// A failure on the event at `index` of the batch.
    pub fn at(index: usize, source: impl Into<BoxError>) -> Self {
        Self { index: Some(index), source: source.into() }
    }
}

/// A projection: turns events into a read model (or side effects).
///
/// `Tx` is the store's transaction (`PgTx`, `SqliteTx`, `MemoryTx`), opened by the runtime for each
/// batch and committed together with the batch's checkpoints and the ownership check:
///
/// - **Transactional** projections write their read model through `tx`. The writes, the checkpoint
///   and the fencing check commit atomically, so every event takes effect exactly once, across
///   restarts, crashes, rebalances and zombie workers.
/// - **Non-transactional** projections (publishing, calling other services) ignore `tx`. They are
///   at-least-once: after a crash or a lost slot, at most the batch in flight is delivered again.
///
/// ```
/// use async_trait::async_trait;
/// use orchestrator_core::ports::BoxError;
/// use orchestrator_core::{Event, Scope};
/// use orchestrator_memory::MemoryTx;
/// use orchestrator_runtime::Projection;
///
/// /// Counts events per account in a read-model table.
/// struct EventsPerAccount;
///
/// #[async_trait]
/// impl Projection<MemoryTx> for EventsPerAccount {
///     fn name(&self) -> &str {
///         "events_per_account"
///     }
///
///     fn scope(&self) -> Scope {
///         Scope { aggregate_types: vec!["Account".into()], bounded_contexts: vec![] }
///     }
///
///     async fn handle(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), BoxError> {
///         let key = &event.stream.aggregate_id;
///         let seen = tx.get("events_per_account", key).map_or(0, |v| v[0]);
///         tx.put("events_per_account", key, vec![seen + 1]); // committed with the checkpoint
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut MemoryTx) -> Result<(), BoxError> {
///         let _ = tx; // a real read model deletes its rows here
///         Ok(())
///     }
/// }
/// ```
///
/// With PostgreSQL or SQLite, `Tx` is `PgTx` or `SqliteTx` and the handler runs its queries on
/// `&mut **tx`; one implementation generic over sqlx's `Database` serves both
/// (`examples/bank-ledger/src/balances.rs`).
///
/// Events arrive in order within each aggregate. A failing batch is retried with backoff (the
/// transaction rolled back each time); after the last attempt the projection stops, naming the
/// event, and no checkpoint moves past it.
#[async_trait]
pub trait Projection<Tx: Send>: Send + Sync {
    /// Unique name; checkpoints are kept under it.
    fn name(&self) -> &str;

    /// The events this projection wants; others are not delivered (and still count as processed).
    fn scope(&self) -> Scope {
        Scope::all()
    }

    /// Handles one event.
    async fn handle(&self, tx: &mut Tx, event: &Event) -> Result<(), BoxError>;

    /// Clears the read model, in the transaction that resets the projection's checkpoints
    /// ([`reset_projection`](crate::reset_projection), `orchestrator projection reset`), so a
    /// rebuild starts from an empty read model. The default clears nothing.
    async fn reset(&self, tx: &mut Tx) -> Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// Handles a batch; override to write many rows in one statement. The default calls
    /// [`Projection::handle`] for each event in order.
    async fn handle_batch(&self, tx: &mut Tx, events: &[Event]) -> Result<(), HandlerError> {
        for (index, event) in events.iter().enumerate() {
            self.handle(tx, event)
                .await
                .map_err(|source| HandlerError { index: Some(index), source })?;
        }
        Ok(())
    }
}
