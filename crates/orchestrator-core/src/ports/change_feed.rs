//! The change feed port: prompt wake-ups for idle workers, where the store can push them.

use async_trait::async_trait;

use crate::ids::ReplicaSetName;
use crate::ports::error::StoreResult;

/// What may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Events were appended.
    Events,
    /// The coordination state of this replica set changed (a join, a leave, a generation, a
    /// released slot, an ack).
    Coordination(ReplicaSetName),
}

/// A stream of hints that something changed in the store.
///
/// # Contract
/// - Hints may be late, merged or spurious; a worker that acts on one re-reads the store.
/// - An error means hints may have been missed; the feed may recover on the next call. Workers keep
///   polling at their intervals regardless, so a missed hint delays, never loses, work.
#[async_trait]
pub trait ChangeFeed: Send {
    /// Waits for the next hint.
    async fn next_change(&mut self) -> StoreResult<Change>;
}

#[async_trait]
impl<F: ChangeFeed + ?Sized> ChangeFeed for Box<F> {
    async fn next_change(&mut self) -> StoreResult<Change> {
        (**self).next_change().await
    }
}
