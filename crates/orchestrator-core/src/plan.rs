//! The leader's decision: when membership changed, what the next generation looks like.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::assignment::assign;
use crate::ids::{Epoch, Generation, Incarnation, ReplicaSetName, WorkerId};
use crate::ports::StoreError;
use crate::slot::Slot;
use crate::snapshot::Snapshot;
use crate::timing::Timing;

/// What happens to one slot when a generation is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// The slot has no live owner: give it to `to` at once, bumping the epoch (fences the old owner).
    Grant {
        /// New owner.
        to: WorkerId,
    },
    /// The owner is alive: ask it to hand the slot to `to` (it stops, commits, then releases).
    Handoff {
        /// Worker to receive the slot.
        to: WorkerId,
    },
    /// A pending handoff is no longer wanted: the current owner keeps the slot.
    CancelHandoff,
}

impl SlotAction {
    /// How stores encode the action (`grant`, `handoff`, `cancel`).
    pub fn kind(&self) -> &'static str {
        match self {
            SlotAction::Grant { .. } => "grant",
            SlotAction::Handoff { .. } => "handoff",
            SlotAction::CancelHandoff => "cancel",
        }
    }

    /// The worker the slot goes to (or is handed to), if any.
    pub fn target(&self) -> Option<&WorkerId> {
        match self {
            SlotAction::Grant { to } | SlotAction::Handoff { to } => Some(to),
            SlotAction::CancelHandoff => None,
        }
    }
}

/// A change to one slot, valid only if the slot's epoch is still `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotChange {
    /// The slot.
    pub slot: Slot,
    /// Epoch the plan was computed against; the store refuses the plan if it moved.
    pub epoch: Epoch,
    /// What to do.
    pub action: SlotAction,
}

/// A proposal for the next generation, applied atomically by the coordination store.
///
/// The store applies it only if the replica set is still at `expected`, the leader lease is held by
/// `leader` at `leader_incarnation` and has not expired, and every changed slot is still at its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationPlan {
    /// Generation the plan replaces (compare-and-set).
    pub expected: Generation,
    /// The new generation, `expected.next()`.
    pub generation: Generation,
    /// The lease holder proposing it.
    pub leader: WorkerId,
    /// The lease holder's registration.
    pub leader_incarnation: Incarnation,
    /// Members of the new generation, sorted by id.
    pub members: Vec<WorkerId>,
    /// Slot ownership changes.
    pub changes: Vec<SlotChange>,
    /// Stale workers whose rows are removed (they must register again).
    pub evict: Vec<WorkerId>,
}

impl GenerationPlan {
    /// The compare-and-set every store makes before applying the plan, given the replica set's
    /// `actual` generation and whether the plan's leader holds an unexpired lease at its
    /// incarnation: `GenerationConflict` unless both hold and the plan is for the next generation.
    /// (Each store checks the changed slots' epochs in its own writes.)
    pub fn check_applies(
        &self,
        replica_set: &ReplicaSetName,
        actual: Generation,
        leads: bool,
    ) -> Result<(), StoreError> {
        if actual == self.expected && self.generation == self.expected.next() && leads {
            Ok(())
        } else {
            Err(self.conflict(replica_set, actual))
        }
    }

    /// The refusal of this plan when the store is at `actual` (a changed slot's epoch moved, say).
    pub fn conflict(&self, replica_set: &ReplicaSetName, actual: Generation) -> StoreError {
        StoreError::GenerationConflict {
            replica_set: replica_set.clone(),
            expected: self.expected,
            actual,
        }
    }
}

/// Why the leader did not create a generation from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// Membership and ownership agree: nothing to do.
    Settled,
    /// Joins are still arriving; ask again after this long.
    BatchingJoins(Duration),
    /// No live worker to own anything.
    NoLiveWorkers,
}

/// Decides whether the leader creates a generation, and what it contains.
///
/// A generation is created when the live workers (heartbeat within the stale timeout) differ from the
/// current members, when some slot's intended owner is not a member, or when a handoff is
/// `overdue` (pending for `coordination_timeout` while its owner kept heartbeating: a hung handler,
/// a frozen process): such a slot is granted to its next owner anyway, with a bumped epoch, so the
/// old owner's late commit is fenced.
/// Departures (graceful or stale) are acted on at once; joins alone wait until no join has arrived
/// for `registration_wait` (bounded by `coordination_timeout`), so a burst of pods gives one generation.
pub fn plan_generation(
    snapshot: &Snapshot,
    timing: &Timing,
    leader: &WorkerId,
    leader_incarnation: Incarnation,
    overdue: &BTreeSet<Slot>,
) -> Result<GenerationPlan, Deferral> {
    let stale_after = timing.stale_worker_timeout;
    let live: Vec<WorkerId> =
        snapshot.workers.iter().filter(|w| w.is_live(stale_after)).map(|w| w.id.clone()).collect();
    if live.is_empty() {
        return Err(Deferral::NoLiveWorkers);
    }
    let members: BTreeSet<&WorkerId> = snapshot.members.iter().collect();
    let live_set: BTreeSet<&WorkerId> = live.iter().collect();
    let departed = members.difference(&live_set).count();
    let joiners: Vec<_> = snapshot
        .workers
        .iter()
        .filter(|w| live_set.contains(&w.id) && !members.contains(&w.id))
        .collect();

    let ownership_settled = snapshot
        .slots
        .iter()
        .all(|rec| rec.intended_owner().is_some_and(|owner| members.contains(owner)));
    let forced: BTreeSet<Slot> = overdue
        .iter()
        .copied()
        .filter(|slot| {
            let rec = snapshot.slot(*slot);
            rec.owner.is_some() && rec.next_owner.as_ref().is_some_and(|n| live_set.contains(n))
        })
        .collect();
    if departed == 0 && joiners.is_empty() && ownership_settled && forced.is_empty() {
        return Err(Deferral::Settled);
    }
    if departed == 0 && !joiners.is_empty() && forced.is_empty() {
        let youngest = joiners.iter().map(|w| w.registered_age).min().unwrap_or_default();
        let oldest = joiners.iter().map(|w| w.registered_age).max().unwrap_or_default();
        if youngest < timing.registration_wait && oldest < timing.coordination_timeout {
            return Err(Deferral::BatchingJoins(timing.registration_wait - youngest));
        }
    }

    let previous: Vec<Option<WorkerId>> =
        snapshot.slots.iter().map(|rec| rec.intended_owner().cloned()).collect();
    let target = assign(snapshot.slot_count, &live, &previous);
    let changes = snapshot
        .slots
        .iter()
        .zip(&target)
        .enumerate()
        .filter_map(|(slot, (rec, to))| {
            if forced.contains(&Slot(slot as u32)) && rec.next_owner.as_ref() == Some(to) {
                return Some(SlotChange {
                    slot: Slot(slot as u32),
                    epoch: rec.epoch,
                    action: SlotAction::Grant { to: to.clone() },
                });
            }
            let action = match &rec.owner {
                Some(owner) if owner == to => {
                    rec.next_owner.as_ref()?;
                    SlotAction::CancelHandoff
                }
                Some(owner) if live_set.contains(owner) => {
                    if rec.next_owner.as_ref() == Some(to) {
                        return None;
                    }
                    SlotAction::Handoff { to: to.clone() }
                }
                _ => SlotAction::Grant { to: to.clone() },
            };
            Some(SlotChange { slot: Slot(slot as u32), epoch: rec.epoch, action })
        })
        .collect();
    let evict = snapshot
        .workers
        .iter()
        .filter(|w| !live_set.contains(&w.id))
        .map(|w| w.id.clone())
        .collect();

    let mut members = live;
    members.sort();
    Ok(GenerationPlan {
        expected: snapshot.generation,
        generation: snapshot.generation.next(),
        leader: leader.clone(),
        leader_incarnation,
        members,
        changes,
        evict,
    })
}
