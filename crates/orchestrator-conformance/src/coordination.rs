//! Cases for the [`CoordinationStore`] contract.

use orchestrator_core::ports::{CoordinationStore, StoreError};
use orchestrator_core::{
    Epoch, Generation, GenerationPlan, Incarnation, ReplicaSetName, Slot, SlotAction, SlotChange,
    SlotCount, WorkerId,
};

use crate::{Harness, LEASE, SLOTS};

/// The replica set most cases use.
pub fn replica_set() -> ReplicaSetName {
    ReplicaSetName::new("main-projections").unwrap()
}

/// A worker id.
pub fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// The slot count of the cases.
pub fn slots() -> SlotCount {
    SlotCount::new(u64::from(SLOTS)).unwrap()
}

/// Registers `leader`, gives it the lease, and creates generation 1 granting it every slot.
pub async fn first_generation<S: CoordinationStore>(store: &S, leader: &WorkerId) -> Incarnation {
    first_generation_in(store, &replica_set(), leader).await
}

/// `from` leads generation 1 alone, `to` registers, and generation 2 hands `slot` (at epoch 1)
/// over to `to`; the incarnations of `from` and `to`.
async fn hand_off<S: CoordinationStore>(
    store: &S,
    from: &WorkerId,
    to: &WorkerId,
    slot: Slot,
) -> (Incarnation, Incarnation) {
    let rs = replica_set();
    let incarnation = first_generation(store, from).await;
    let to_incarnation = store.register(&rs, slots(), to).await.unwrap();
    let changes =
        vec![SlotChange { slot, epoch: Epoch(1), action: SlotAction::Handoff { to: to.clone() } }];
    store
        .create_generation(&rs, &next_plan(1, from, incarnation, &[from, to], changes))
        .await
        .unwrap();
    (incarnation, to_incarnation)
}

/// [`first_generation`] in replica set `rs`.
pub async fn first_generation_in<S: CoordinationStore>(
    store: &S,
    rs: &ReplicaSetName,
    leader: &WorkerId,
) -> Incarnation {
    let incarnation = store.register(rs, slots(), leader).await.unwrap();
    assert!(store.heartbeat(rs, leader, incarnation, LEASE * 20).await.unwrap().leader);
    let grants = slots()
        .all()
        .map(|slot| SlotChange {
            slot,
            epoch: Epoch::ZERO,
            action: SlotAction::Grant { to: leader.clone() },
        })
        .collect();
    let plan = next_plan(0, leader, incarnation, &[leader], grants);
    store.create_generation(rs, &plan).await.unwrap();
    incarnation
}

/// The plan of the generation after `expected`, by `leader`, with `members` and `changes`.
pub fn next_plan(
    expected: u64,
    leader: &WorkerId,
    incarnation: Incarnation,
    members: &[&WorkerId],
    changes: Vec<SlotChange>,
) -> GenerationPlan {
    GenerationPlan {
        expected: Generation(expected),
        generation: Generation(expected + 1),
        leader: leader.clone(),
        leader_incarnation: incarnation,
        members: members.iter().map(|m| (*m).clone()).collect(),
        changes,
        evict: Vec::new(),
    }
}

/// `register` creates the replica set and refuses a different slot count later.
pub async fn register_creates_replica_set_and_checks_slot_count<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    store.register(&rs, slots(), &worker("w1")).await.unwrap();
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert_eq!(snapshot.slot_count, slots());
    assert_eq!(snapshot.generation, Generation::ZERO);
    assert_eq!(snapshot.slots.len(), SLOTS as usize);
    assert!(snapshot.slots.iter().all(|r| r.owner.is_none() && r.next_owner.is_none()));
    assert_eq!(snapshot.workers.len(), 1);

    let err = store.register(&rs, SlotCount::new(16).unwrap(), &worker("w2")).await.unwrap_err();
    assert!(matches!(err, StoreError::SlotCountMismatch { .. }), "{err}");
    assert!(!err.is_retryable());
}

/// Registering an id again gives a greater incarnation, fences the slots the id owned, and the
/// old incarnation can no longer heartbeat.
pub async fn register_again_fences_the_previous_incarnation<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    let first = first_generation(store, &w1).await;
    let second = store.register(&rs, slots(), &w1).await.unwrap();
    assert!(second > first);
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert!(snapshot.slots.iter().all(|r| r.owner.as_ref() == Some(&w1) && r.epoch == Epoch(2)));
    assert_eq!(snapshot.worker(&w1).unwrap().incarnation, second);
    let err = store.heartbeat(&rs, &w1, first, LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::NotRegistered { .. }), "{err}");
}

/// A heartbeat for an incarnation the store does not know fails with `NotRegistered`.
pub async fn heartbeat_of_unknown_incarnation_is_refused<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let incarnation = store.register(&rs, slots(), &worker("w1")).await.unwrap();
    let err = store.heartbeat(&rs, &worker("w2"), incarnation, LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::NotRegistered { .. }), "{err}");
    let err = store.heartbeat(&rs, &worker("w1"), incarnation.next(), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::NotRegistered { .. }), "{err}");
}

/// A snapshot of a replica set nobody registered in fails with `UnknownReplicaSet`.
pub async fn snapshot_of_unknown_replica_set_is_refused<H: Harness>(h: &H) {
    let err = h.store().snapshot(&ReplicaSetName::new("nobody-here").unwrap()).await.unwrap_err();
    assert!(matches!(err, StoreError::UnknownReplicaSet(_)), "{err}");
}

/// The first heartbeat takes the lease; others get it only once it expired.
pub async fn lease_goes_to_first_heartbeat_and_changes_hands_only_after_expiry<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let i1 = store.register(&rs, slots(), &w1).await.unwrap();
    let i2 = store.register(&rs, slots(), &w2).await.unwrap();
    assert!(store.heartbeat(&rs, &w1, i1, LEASE).await.unwrap().leader);
    assert!(!store.heartbeat(&rs, &w2, i2, LEASE).await.unwrap().leader);
    assert!(store.heartbeat(&rs, &w1, i1, LEASE).await.unwrap().leader, "renewal");
    let lease = store.snapshot(&rs).await.unwrap().leader().cloned().expect("valid lease");
    assert_eq!((lease.holder, lease.incarnation), (w1.clone(), i1));

    h.advance(LEASE + LEASE / 2).await;
    assert!(store.snapshot(&rs).await.unwrap().leader().is_none(), "expired");
    assert!(store.heartbeat(&rs, &w2, i2, LEASE).await.unwrap().leader);
    assert!(!store.heartbeat(&rs, &w1, i1, LEASE).await.unwrap().leader);
    assert_eq!(store.snapshot(&rs).await.unwrap().leader().unwrap().holder, w2);
}

/// Heartbeat and registration ages grow with the store's clock and a heartbeat resets its age.
pub async fn ages_are_measured_by_the_store_clock<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    let incarnation = store.register(&rs, slots(), &w1).await.unwrap();
    h.advance(LEASE).await;
    let record = store.snapshot(&rs).await.unwrap().worker(&w1).cloned().unwrap();
    assert!(record.heartbeat_age >= LEASE, "{record:?}");
    assert!(record.registered_age >= LEASE, "{record:?}");
    store.heartbeat(&rs, &w1, incarnation, LEASE).await.unwrap();
    let record = store.snapshot(&rs).await.unwrap().worker(&w1).cloned().unwrap();
    assert!(record.heartbeat_age < LEASE, "{record:?}");
    assert!(record.registered_age >= LEASE, "{record:?}");
}

/// A plan applies only on the generation it expects, to `expected + 1`; generations never go back.
pub async fn create_generation_is_compare_and_set<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    let incarnation = first_generation(store, &w1).await;
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert_eq!(snapshot.generation, Generation(1));
    assert_eq!(snapshot.members, vec![w1.clone()]);
    assert!(snapshot.slots.iter().all(|r| r.owner.as_ref() == Some(&w1) && r.epoch == Epoch(1)));

    for (expected, generation) in [(0, 1), (1, 3), (2, 3)] {
        let mut plan = next_plan(expected, &w1, incarnation, &[&w1], Vec::new());
        plan.generation = Generation(generation);
        let err = store.create_generation(&rs, &plan).await.unwrap_err();
        assert!(matches!(err, StoreError::GenerationConflict { .. }), "{err}");
        assert!(err.is_conflict());
    }
    store
        .create_generation(&rs, &next_plan(1, &w1, incarnation, &[&w1], Vec::new()))
        .await
        .unwrap();
    assert_eq!(store.snapshot(&rs).await.unwrap().generation, Generation(2));
}

/// Only the unexpired lease holder (at its incarnation) can create a generation.
pub async fn create_generation_requires_the_lease<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let i1 = store.register(&rs, slots(), &w1).await.unwrap();
    let i2 = store.register(&rs, slots(), &w2).await.unwrap();
    assert!(store.heartbeat(&rs, &w1, i1, LEASE).await.unwrap().leader);

    let by_follower = next_plan(0, &w2, i2, &[&w1, &w2], Vec::new());
    let err = store.create_generation(&rs, &by_follower).await.unwrap_err();
    assert!(matches!(err, StoreError::GenerationConflict { .. }), "{err}");
    let wrong_incarnation = next_plan(0, &w1, i2, &[&w1, &w2], Vec::new());
    assert!(store.create_generation(&rs, &wrong_incarnation).await.is_err());

    h.advance(LEASE + LEASE / 2).await;
    let expired = next_plan(0, &w1, i1, &[&w1, &w2], Vec::new());
    let err = store.create_generation(&rs, &expired).await.unwrap_err();
    assert!(matches!(err, StoreError::GenerationConflict { .. }), "{err}");
    assert_eq!(store.snapshot(&rs).await.unwrap().generation, Generation::ZERO);
}

/// A plan whose changed slot moved to another epoch is refused as a whole.
pub async fn create_generation_checks_slot_epochs<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let incarnation = first_generation(store, &w1).await;
    let changes = vec![
        SlotChange { slot: Slot(0), epoch: Epoch(1), action: SlotAction::Grant { to: w2.clone() } },
        SlotChange { slot: Slot(1), epoch: Epoch(0), action: SlotAction::Grant { to: w2.clone() } },
    ];
    let err = store
        .create_generation(&rs, &next_plan(1, &w1, incarnation, &[&w1, &w2], changes))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::GenerationConflict { .. }), "{err}");
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert_eq!(snapshot.generation, Generation(1));
    assert_eq!(snapshot.slot(Slot(0)).owner.as_ref(), Some(&w1), "nothing applied");
}

/// A handoff leaves the owner in place; its release moves the slot and bumps the epoch.
pub async fn handoff_then_release_moves_the_slot_and_bumps_the_epoch<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let (incarnation, _) = hand_off(store, &w1, &w2, Slot(3)).await;
    let record = store.snapshot(&rs).await.unwrap().slot(Slot(3)).clone();
    assert_eq!(
        (record.owner.as_ref(), record.next_owner.as_ref(), record.epoch),
        (Some(&w1), Some(&w2), Epoch(1))
    );

    store.release_slot(&rs, &w1, Slot(3), Epoch(1)).await.unwrap();
    let record = store.snapshot(&rs).await.unwrap().slot(Slot(3)).clone();
    assert_eq!(
        (record.owner.as_ref(), record.next_owner, record.epoch),
        (Some(&w2), None, Epoch(2))
    );
    let err = store.release_slot(&rs, &w1, Slot(3), Epoch(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");

    let cancel = vec![SlotChange {
        slot: Slot(4),
        epoch: Epoch(1),
        action: SlotAction::Handoff { to: w2.clone() },
    }];
    store
        .create_generation(&rs, &next_plan(2, &w1, incarnation, &[&w1, &w2], cancel))
        .await
        .unwrap();
    let cancel =
        vec![SlotChange { slot: Slot(4), epoch: Epoch(1), action: SlotAction::CancelHandoff }];
    store
        .create_generation(&rs, &next_plan(3, &w1, incarnation, &[&w1, &w2], cancel))
        .await
        .unwrap();
    let record = store.snapshot(&rs).await.unwrap().slot(Slot(4)).clone();
    assert_eq!(
        (record.owner.as_ref(), record.next_owner, record.epoch),
        (Some(&w1), None, Epoch(1))
    );
}

/// Releasing a slot one does not own, at a stale epoch, or with no handoff pending is `Fenced`.
pub async fn release_by_a_non_owner_is_fenced<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    hand_off(store, &w1, &w2, Slot(0)).await;
    for (who, slot, epoch) in
        [(&w2, Slot(0), Epoch(1)), (&w1, Slot(0), Epoch(0)), (&w1, Slot(1), Epoch(1))]
    {
        let err = store.release_slot(&rs, who, slot, epoch).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{who} {slot} {epoch}: {err}");
    }
    assert_eq!(store.snapshot(&rs).await.unwrap().slot(Slot(0)).owner.as_ref(), Some(&w1));
}

/// The acked generation only moves forward, and only for the registered incarnation.
pub async fn ack_generation_never_goes_back<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    let incarnation = store.register(&rs, slots(), &w1).await.unwrap();
    store.ack_generation(&rs, &w1, incarnation, Generation(2)).await.unwrap();
    store.ack_generation(&rs, &w1, incarnation, Generation(1)).await.unwrap();
    let record = store.snapshot(&rs).await.unwrap().worker(&w1).cloned().unwrap();
    assert_eq!(record.acked_generation, Generation(2));
    let err = store.ack_generation(&rs, &w1, incarnation.next(), Generation(3)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotRegistered { .. }), "{err}");
}

/// Deregistering removes the worker, hands pending slots on, frees the rest with new epochs and
/// gives up the lease; doing it twice is harmless.
pub async fn deregister_frees_slots_and_the_lease<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let (incarnation, _) = hand_off(store, &w1, &w2, Slot(0)).await;

    store.deregister(&rs, &w1, incarnation).await.unwrap();
    let snapshot = store.snapshot(&rs).await.unwrap();
    assert!(snapshot.worker(&w1).is_none());
    assert!(
        snapshot.lease.is_none() || snapshot.leader().is_none(),
        "lease given up: {:?}",
        snapshot.lease
    );
    assert_eq!(snapshot.slot(Slot(0)).owner.as_ref(), Some(&w2));
    assert_eq!(snapshot.slot(Slot(0)).epoch, Epoch(2));
    for slot in 1..SLOTS {
        let record = snapshot.slot(Slot(slot));
        assert_eq!((record.owner.as_ref(), record.epoch), (None, Epoch(2)), "slot {slot}");
    }
    store.deregister(&rs, &w1, incarnation).await.unwrap();
}

/// A worker that leaves while a handoff to it is pending cancels that handoff: the slot stays with
/// its owner, at its epoch, and is never handed to a worker that has gone.
pub async fn deregister_cancels_handoffs_to_the_leaver<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let (incarnation, w2_incarnation) = hand_off(store, &w1, &w2, Slot(3)).await;
    store.deregister(&rs, &w2, w2_incarnation).await.unwrap();
    let snapshot = store.snapshot(&rs).await.unwrap();
    let record = snapshot.slot(Slot(3));
    assert_eq!((record.owner.as_ref(), record.next_owner.as_ref()), (Some(&w1), None));
    assert_eq!(record.epoch, Epoch(1), "the owner's grant still holds");
    // Its owner leaving now frees it rather than handing it to the departed worker.
    store.deregister(&rs, &w1, incarnation).await.unwrap();
    assert_eq!(store.snapshot(&rs).await.unwrap().slot(Slot(3)).owner, None);
}

/// Workers named in a plan's `evict` are removed.
pub async fn evicted_workers_are_removed<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let incarnation = first_generation(store, &w1).await;
    store.register(&rs, slots(), &w2).await.unwrap();
    let mut plan = next_plan(1, &w1, incarnation, &[&w1], Vec::new());
    plan.evict = vec![w2.clone()];
    store.create_generation(&rs, &plan).await.unwrap();
    assert!(store.snapshot(&rs).await.unwrap().worker(&w2).is_none());
}
