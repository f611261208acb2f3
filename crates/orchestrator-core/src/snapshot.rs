//! What a worker sees of its replica set: one consistent read of the coordination store.

use std::time::Duration;

use crate::ids::{Epoch, Generation, Incarnation, ReplicaSetName, WorkerId};
use crate::slot::{Slot, SlotCount};

/// A registered worker, as the coordination store holds it.
///
/// Ages are measured by the store's clock (the database's), so no two machines' clocks are compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// The worker's id.
    pub id: WorkerId,
    /// Which registration of that id is current.
    pub incarnation: Incarnation,
    /// Time since its last heartbeat.
    pub heartbeat_age: Duration,
    /// Time since it registered.
    pub registered_age: Duration,
    /// The newest generation it has finished adopting (stopped, released what moved).
    pub acked_generation: Generation,
    /// The coordination protocol it speaks ([`PROTOCOL_VERSION`] for this release; 1 for workers
    /// registered by releases that did not record one).
    pub protocol: u32,
}

impl WorkerRecord {
    /// Whether it heartbeated within `stale_after` (the stale worker timeout): the one rule of
    /// liveness, for plans, barriers, protocol checks and the live-worker gauge.
    pub fn is_live(&self, stale_after: Duration) -> bool {
        self.heartbeat_age <= stale_after
    }
}

/// The coordination protocol of this release. Workers of different protocols must not run in one
/// replica set at once: a worker that meets a live member of another protocol leaves with an error
/// instead of taking part.
///
/// - 2: readers rely on appenders registering with the read horizon, which earlier releases did
///   not do.
/// - 3: on PostgreSQL a fenced commit locks the replica set's row inside its check, and relies on
///   every change of owner writing a new version of that row; workers of protocol 2 change owners
///   by only locking it, which a commit of protocol 3 would not notice.
pub const PROTOCOL_VERSION: u32 = 3;

/// Ownership of one slot.
///
/// `owner` processes the slot under `epoch`. When `next_owner` is set, the owner is asked to hand the
/// slot over: it stops, commits, and releases, which moves ownership to `next_owner` and bumps the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlotRecord {
    /// Current owner, if any.
    pub owner: Option<WorkerId>,
    /// Ownership token; bumped on every change of owner.
    pub epoch: Epoch,
    /// Worker the slot is being handed to, if a handoff is pending.
    pub next_owner: Option<WorkerId>,
}

impl SlotRecord {
    /// The worker that will own the slot once pending handoffs complete.
    pub fn intended_owner(&self) -> Option<&WorkerId> {
        self.next_owner.as_ref().or(self.owner.as_ref())
    }
}

/// The leader lease of a replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Worker holding (or last holding) the lease.
    pub holder: WorkerId,
    /// Registration of the holder that took the lease.
    pub incarnation: Incarnation,
    /// Time left before the lease expires; zero when expired.
    pub remaining: Duration,
}

/// A worker's share of a generation: `partition index of count` in the seed's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// The member's index in the generation's sorted member list.
    pub index: usize,
    /// Number of members.
    pub count: usize,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One consistent view of a replica set's coordination state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The replica set.
    pub replica_set: ReplicaSetName,
    /// Its slot count.
    pub slot_count: SlotCount,
    /// Current generation (ZERO before the first).
    pub generation: Generation,
    /// Members of the current generation, sorted by id.
    pub members: Vec<WorkerId>,
    /// The leader lease, if anyone ever held it.
    pub lease: Option<Lease>,
    /// Registered workers, sorted by id.
    pub workers: Vec<WorkerRecord>,
    /// One record per slot, in slot order.
    pub slots: Vec<SlotRecord>,
}

impl Snapshot {
    /// An empty replica set with no workers and no owners.
    pub fn empty(replica_set: ReplicaSetName, slot_count: SlotCount) -> Self {
        Self {
            replica_set,
            slot_count,
            generation: Generation::ZERO,
            members: Vec::new(),
            lease: None,
            workers: Vec::new(),
            slots: vec![SlotRecord::default(); slot_count.get() as usize],
        }
    }

    /// The record of a worker, if registered.
    pub fn worker(&self, id: &WorkerId) -> Option<&WorkerRecord> {
        self.workers.iter().find(|w| &w.id == id)
    }

    /// The record of a slot.
    pub fn slot(&self, slot: Slot) -> &SlotRecord {
        &self.slots[slot.0 as usize]
    }

    /// The valid lease holder, if the lease has not expired.
    pub fn leader(&self) -> Option<&Lease> {
        self.lease.as_ref().filter(|lease| !lease.remaining.is_zero())
    }

    /// A member's partition in the current generation.
    pub fn partition_of(&self, id: &WorkerId) -> Option<Partition> {
        let index = self.members.iter().position(|m| m == id)?;
        Some(Partition { index, count: self.members.len() })
    }

    /// Slots a worker owns now, with their epochs.
    pub fn owned_by(&self, id: &WorkerId) -> Vec<(Slot, Epoch)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, rec)| rec.owner.as_ref() == Some(id))
            .map(|(slot, rec)| (Slot(slot as u32), rec.epoch))
            .collect()
    }
}
