//! What users implement: projections, handed batches of events and the store's transaction.

use async_trait::async_trait;
use orchestrator_core::ports::BoxError;
use orchestrator_core::processing::FailurePolicy;
use orchestrator_core::{Event, Scope};

/// An error retrying cannot fix (an event the handler cannot decode, a rule the event breaks):
/// return it, or anything whose source chain holds one, and the projection's failure policy
/// applies at once instead of after the retries.
///
/// ```
/// # use orchestrator_core::ports::BoxError;
/// use orchestrator_runtime::Permanent;
/// fn amount(payload: &[u8]) -> Result<u64, BoxError> {
///     let text = std::str::from_utf8(payload).map_err(Permanent::new)?;
///     Ok(text.parse().map_err(Permanent::new)?)
/// }
/// assert!(amount(b"12x").unwrap_err().downcast_ref::<Permanent>().is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(#[source] pub BoxError);

impl Permanent {
    /// Marks `error` as permanent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }

    /// Whether `error` or one of its sources is [`Permanent`].
    pub fn is_in(error: &(dyn std::error::Error + 'static)) -> bool {
        orchestrator_core::ports::any_in_chain(error, |e| e.is::<Permanent>())
    }
}

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

    /// A failure somewhere in the batch: with the `park` policy, the batch is then retried one
    /// event at a time to find the event.
    pub fn somewhere(source: impl Into<BoxError>) -> Self {
        Self { index: None, source: source.into() }
    }

    /// Whether the handler said retrying cannot help ([`Permanent`]).
    pub fn is_permanent(&self) -> bool {
        Permanent::is_in(&*self.source)
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
/// Events arrive in order within each partition key (so within each aggregate).
///
/// Failures: a failing batch is rolled back and retried with backoff; an error that is the
/// store's (a connection lost, a serialization failure, a server restarting, raised by the
/// handler's own queries too) is retried for as long as it lasts and never counts as an attempt.
/// When the attempts run out, or the handler returns a [`Permanent`] error, the projection's
/// failure policy ([`Projection::failure_policy`], else `FAILURE_POLICY`) decides: `stop` stops
/// the projection on every worker, naming the event, until `orchestrator projection resume`;
/// `park` sets the event and every later event of its partition key aside as dead letters
/// (`orchestrator dlq`) and goes on with the rest.
#[async_trait]
pub trait Projection<Tx: Send>: Send + Sync {
    /// Unique name; checkpoints are kept under it.
    fn name(&self) -> &str;

    /// The events this projection wants; others are not delivered (and still count as processed).
    fn scope(&self) -> Scope {
        Scope::all()
    }

    /// Its failure policy, when it differs from the worker's `FAILURE_POLICY`.
    fn failure_policy(&self) -> Option<FailurePolicy> {
        None
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

    /// Handles a batch of at most `BATCH_SIZE` events; override to write many rows in one
    /// statement. The default calls [`Projection::handle`] for each event in order.
    ///
    /// A projection behind its shared read may get several calls in one transaction (one per
    /// read, up to four, while its batches take under 25 ms a read), committed together; each
    /// call is bounded by `HANDLER_TIMEOUT`.
    async fn handle_batch(&self, tx: &mut Tx, events: &[Event]) -> Result<(), HandlerError> {
        for (index, event) in events.iter().enumerate() {
            self.handle(tx, event)
                .await
                .map_err(|source| HandlerError { index: Some(index), source })?;
        }
        Ok(())
    }
}
