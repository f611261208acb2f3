//! The coordination store port: membership, heartbeats, leader lease, generations, slot ownership.

use std::time::Duration;

use async_trait::async_trait;

use crate::ids::{Epoch, Generation, Incarnation, ReplicaSetName, WorkerId};
use crate::plan::GenerationPlan;
use crate::ports::error::StoreResult;
use crate::slot::{Slot, SlotCount};
use crate::snapshot::Snapshot;

/// Outcome of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// Whether this worker holds the leader lease after the heartbeat.
    pub leader: bool,
}

/// One generation of a replica set's history, for display (`orchestrator status`, the status
/// page): who its members were and how long ago it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRecord {
    /// Its number.
    pub generation: Generation,
    /// Its members, sorted by id.
    pub members: Vec<WorkerId>,
    /// The leader that created it.
    pub leader: WorkerId,
    /// Time since it was created, by the store's clock.
    pub age: Duration,
}

/// Durable coordination state of replica sets.
///
/// All times (heartbeat ages, lease expiry) are measured by the store's own clock: the database's
/// `clock_timestamp()` for SQL stores, so no worker's clock is ever compared with the database's.
///
/// # Contract
/// - `register` creates the replica set with `slot_count` if it does not exist, and fails with
///   `SlotCountMismatch` if it exists with another count. It inserts or replaces the worker's row with
///   a greater incarnation, a fresh heartbeat and no acked generation, and bumps the epoch of every
///   slot the worker id owns, so a previous incarnation of the same id is fenced.
/// - `heartbeat` refreshes the row of that incarnation, or fails with `NotRegistered`. In the same
///   step it takes the leader lease for `lease` if the lease is vacant, expired or already this
///   incarnation's, and reports whether this worker holds it.
/// - `snapshot` reads the whole state of one replica set consistently, or fails with
///   `UnknownReplicaSet`.
/// - `create_generation` applies a plan atomically, or fails with `GenerationConflict` and writes
///   nothing, when the current generation is not `plan.expected`, the lease is not held (unexpired) by
///   `plan.leader` at `plan.leader_incarnation`, or a changed slot's epoch differs from the plan's.
///   `Grant` sets owner, clears `next_owner` and bumps the epoch; `Handoff` sets `next_owner`;
///   `CancelHandoff` clears it. Evicted workers' rows are removed. Generations never go backwards.
/// - `release_slot` moves a slot from this worker to its `next_owner` and bumps its epoch, if the slot
///   is still owned by the worker at `epoch` with a handoff pending; otherwise it fails with `Fenced`.
/// - `ack_generation` records the generation a worker adopted (never lowering it), or fails with
///   `NotRegistered`.
/// - `deregister` removes the worker's row, moves each of its slots to the slot's `next_owner` (or
///   leaves it without owner) with a bumped epoch, and gives up the lease if held. Deregistering an
///   unknown incarnation succeeds and does nothing.
/// - Old generations and departed workers do not accumulate.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait CoordinationStore: Send + Sync {
    /// Registers a worker, creating the replica set if needed.
    async fn register(
        &self,
        replica_set: &ReplicaSetName,
        slot_count: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation>;

    /// Refreshes a heartbeat and takes or renews the leader lease when possible.
    async fn heartbeat(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck>;

    /// Reads the replica set's state.
    async fn snapshot(&self, replica_set: &ReplicaSetName) -> StoreResult<Snapshot>;

    /// Applies a generation plan (compare-and-set).
    async fn create_generation(
        &self,
        replica_set: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()>;

    /// Hands a stopped slot to its next owner.
    async fn release_slot(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()>;

    /// Records that a worker adopted a generation.
    async fn ack_generation(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()>;

    /// Leaves the replica set.
    async fn deregister(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()>;

    /// The newest generations of the replica set, newest first, at most `limit`: what the store
    /// kept of its history (the SQL stores keep the last 100). For display only; workers never
    /// read it. The default keeps no history and returns none.
    async fn recent_generations(
        &self,
        replica_set: &ReplicaSetName,
        limit: usize,
    ) -> StoreResult<Vec<GenerationRecord>> {
        let _ = (replica_set, limit);
        Ok(Vec::new())
    }
}
