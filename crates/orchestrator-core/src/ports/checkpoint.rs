//! The checkpoint store port: per (projection, slot) positions, committed under a fence.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::event::Position;
use crate::ids::{Epoch, ReplicaSetName, WorkerId};
use crate::ports::error::StoreResult;
use crate::slot::Slot;

/// A projection stopped by its failure policy (`stop`): where and why, recorded in the store so
/// that no worker of the replica set runs it again until it is resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStop {
    /// The projection.
    pub projection: String,
    /// Position of the event it failed on.
    pub position: Position,
    /// That event's stream (`bounded_context/aggregate_type/aggregate_id`).
    pub aggregate: String,
    /// That event's type.
    pub event_type: String,
    /// The handler's last error.
    pub error: String,
}

/// A recorded stop, with how long ago it happened by the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedProjection {
    /// Where and why.
    pub stop: ProjectionStop,
    /// Time since it was recorded.
    pub age: std::time::Duration,
}

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
/// - `projections` lists the projections of a replica set that have committed a checkpoint.
/// - `reset` deletes every checkpoint of a projection in a replica set and gives every slot of the
///   replica set a new epoch, in the given transaction (where the caller has cleared the read
///   model), and commits it. A worker still running the projection is then fenced at its next
///   commit, reloads its checkpoints and starts over from the first event.
/// - `remove` forgets a retired projection: its checkpoints are deleted and `projections` no
///   longer lists it. Slots are not fenced (a worker still running it would record it again).
/// - `stop_projection` records a stop per (replica set, projection); the first record stays (the
///   event that stopped it first is the one to fix). `stopped_projections` lists the records;
///   `resume_projection` deletes one and says whether there was one. `reset` and `remove` delete
///   it too.
#[cfg_attr(feature = "mock", mockall::automock(type Tx = ();))]
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

    /// Whether an error a handler returned is the store's own trouble (a connection lost, a
    /// serialization failure, a server restarting), raised by the handler's queries on the
    /// transaction: the runtime retries it for as long as it lasts and never counts it as a
    /// handler attempt. The default finds a retryable [`StoreError`](crate::ports::StoreError)
    /// in the error's source chain; SQL adapters also recognise their driver's errors.
    #[allow(unused_parens)] // mockall's expansion of the parenthesised trait object
    fn is_store_failure(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        crate::ports::error::has_retryable_store_error(error)
    }

    /// Checks the fence, advances checkpoints and commits the transaction.
    async fn commit(
        &self,
        tx: Self::Tx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()>;

    /// The projections with checkpoints in a replica set, by name.
    async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>>;

    /// Forgets a retired projection: deletes its checkpoints.
    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()>;

    /// Records that a projection stopped (keeps an earlier record).
    async fn stop_projection(
        &self,
        replica_set: &ReplicaSetName,
        stop: &ProjectionStop,
    ) -> StoreResult<()>;

    /// The stopped projections of a replica set, by name.
    async fn stopped_projections(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<Vec<StoppedProjection>>;

    /// Lets a stopped projection run again (from its checkpoints: the failing event first);
    /// whether it was stopped.
    async fn resume_projection(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<bool>;

    /// Rebuilds a projection from the start: deletes its checkpoints, fences every slot, commits
    /// `tx`.
    async fn reset(
        &self,
        tx: Self::Tx,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()>;
}
