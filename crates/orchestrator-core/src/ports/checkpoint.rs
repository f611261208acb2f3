//! The checkpoint store port: per (projection, slot) positions, committed under a fence.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::event::Position;
use crate::ids::{Epoch, ReplicaSetName, WorkerId};
use crate::ports::error::StoreResult;
use crate::slot::Slot;

/// The ownership a commit claims: these slots, owned by this worker, at these epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The replica set.
    pub replica_set: ReplicaSetName,
    /// The committing worker.
    pub worker: WorkerId,
    /// Each slot the commit touches, with the epoch it was granted under.
    pub grants: BTreeMap<Slot, Epoch>,
}

/// Checkpoints of projections, advanced atomically with the projection's own writes.
///
/// # Contract
/// - `load` returns the checkpoint of each requested slot; a slot never committed is at
///   `Position::START`.
/// - `begin` opens a transaction. A transactional projection writes its read model through it
///   (the adapter exposes how), and `commit` ends it.
/// - `commit` checks, inside the transaction and serialized with any concurrent change of ownership,
///   that every slot in `checkpoints` is in `fence.grants` and is owned by `fence.worker` at that
///   epoch. If not, it fails with `Fenced` and nothing of the transaction is kept, read-model writes
///   included. Otherwise it advances each checkpoint and commits everything at once.
/// - A checkpoint never moves backwards: `CheckpointRegression`, and nothing is kept.
/// - Dropping a transaction without `commit` keeps nothing.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// An open transaction; read-model writes go through it.
    type Tx: Send;

    /// Loads the checkpoints of some slots of a projection.
    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>>;

    /// Opens a transaction.
    async fn begin(&self) -> StoreResult<Self::Tx>;

    /// Checks the fence, advances checkpoints and commits the transaction.
    async fn commit(
        &self,
        tx: Self::Tx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()>;
}
