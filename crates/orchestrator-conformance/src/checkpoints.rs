//! Cases for the [`CheckpointStore`] contract.

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator_core::ports::{CheckpointStore, CoordinationStore, Fence, StoreError};
use orchestrator_core::{Epoch, Position, ReplicaSetName, Slot, SlotAction, SlotChange, WorkerId};

use crate::coordination::{first_generation, next_plan, replica_set, slots, worker};
use crate::{Harness, SLOTS};

fn fence(worker: &WorkerId, grants: &[(u32, u64)]) -> Fence {
    Fence {
        replica_set: replica_set(),
        worker: worker.clone(),
        grants: grants.iter().map(|(s, e)| (Slot(*s), Epoch(*e))).collect(),
    }
}

fn at(pairs: &[(u32, u64)]) -> BTreeMap<Slot, Position> {
    pairs.iter().map(|(s, g)| (Slot(*s), Position::global(*g))).collect()
}

/// Slots never committed load as `Position::START`.
pub async fn unknown_checkpoints_start_at_the_beginning<H: Harness>(h: &H) {
    let loaded = h.store().load(&replica_set(), "orders", &[Slot(0), Slot(5)]).await.unwrap();
    assert_eq!(loaded, at(&[(0, 0), (5, 0)]));
}

/// A fenced commit by the owner advances its checkpoints and keeps its read-model writes.
pub async fn commit_advances_checkpoints_and_read_model_together<H: Harness>(h: &H) {
    let store = h.store();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let mut tx = store.begin().await.unwrap();
    h.put_row(&mut tx, "order-1", "placed").await;
    store
        .commit(tx, &fence(&w1, &[(0, 1), (1, 1)]), "orders", &at(&[(0, 10), (1, 12)]))
        .await
        .unwrap();
    assert_eq!(h.get_row("order-1").await.as_deref(), Some("placed"));
    let loaded = store.load(&replica_set(), "orders", &[Slot(0), Slot(1), Slot(2)]).await.unwrap();
    assert_eq!(loaded, at(&[(0, 10), (1, 12), (2, 0)]));
}

/// A zombie committing under an epoch the slot has moved past is `Fenced`, and its read-model
/// writes and checkpoints are rolled back together.
pub async fn stale_epoch_is_fenced_and_read_model_writes_roll_back<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let (w1, w2) = (worker("w1"), worker("w2"));
    let incarnation = first_generation(store, &w1).await;
    store.register(&rs, slots(), &w2).await.unwrap();

    let grant =
        SlotChange { slot: Slot(0), epoch: Epoch(1), action: SlotAction::Grant { to: w2.clone() } };
    let plan = next_plan(1, &w1, incarnation, &[&w2], vec![grant]);
    store.create_generation(&rs, &plan).await.unwrap();

    // The zombie still believes it owns slot 0 at epoch 1 and processes a batch.
    let mut zombie_tx = store.begin().await.unwrap();
    h.put_row(&mut zombie_tx, "order-1", "zombie").await;

    let err = store
        .commit(zombie_tx, &fence(&w1, &[(0, 1), (1, 1)]), "orders", &at(&[(0, 50), (1, 50)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(err.is_conflict() && !err.is_retryable());
    assert_eq!(h.get_row("order-1").await, None, "read-model write rolled back");
    let loaded = store.load(&rs, "orders", &[Slot(0), Slot(1)]).await.unwrap();
    assert_eq!(loaded, at(&[(0, 0), (1, 0)]), "no checkpoint moved, not even the still-owned slot");

    // The new owner commits under the new epoch.
    let mut tx = store.begin().await.unwrap();
    h.put_row(&mut tx, "order-1", "owner").await;
    store.commit(tx, &fence(&w2, &[(0, 2)]), "orders", &at(&[(0, 50)])).await.unwrap();
    assert_eq!(h.get_row("order-1").await.as_deref(), Some("owner"));
}

/// A checkpoint for a slot the fence does not claim is `Fenced`.
pub async fn slot_outside_the_fence_is_fenced<H: Harness>(h: &H) {
    let store = h.store();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let tx = store.begin().await.unwrap();
    let err = store
        .commit(tx, &fence(&w1, &[(0, 1)]), "orders", &at(&[(0, 5), (1, 5)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { slot: Slot(1), .. }), "{err}");
    let tx = store.begin().await.unwrap();
    let err = store
        .commit(tx, &fence(&worker("w9"), &[(0, 1)]), "orders", &at(&[(0, 5)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
}

/// A checkpoint never moves backwards; the failed commit keeps nothing.
pub async fn checkpoints_never_move_backwards<H: Harness>(h: &H) {
    let store = h.store();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let all: Vec<(u32, u64)> = (0..SLOTS).map(|s| (s, 1)).collect();
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &all), "orders", &at(&[(0, 20)])).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    h.put_row(&mut tx, "k", "v").await;
    let err = store.commit(tx, &fence(&w1, &all), "orders", &at(&[(0, 19)])).await.unwrap_err();
    assert!(matches!(err, StoreError::CheckpointRegression { .. }), "{err}");
    assert_eq!(h.get_row("k").await, None);
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &all), "orders", &at(&[(0, 20)])).await.unwrap();
}

/// A transaction dropped without commit keeps nothing.
pub async fn dropped_transaction_keeps_nothing<H: Harness>(h: &H) {
    let store = h.store();
    let mut tx = store.begin().await.unwrap();
    h.put_row(&mut tx, "k", "v").await;
    drop(tx);
    assert_eq!(h.get_row("k").await, None);
}

/// Checkpoints are kept per (replica set, projection, slot).
pub async fn checkpoints_are_per_replica_set_and_projection<H: Harness>(h: &H) {
    let store = h.store();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(0, 1)]), "orders", &at(&[(0, 7)])).await.unwrap();
    let other_projection = store.load(&replica_set(), "invoices", &[Slot(0)]).await.unwrap();
    assert_eq!(other_projection, at(&[(0, 0)]));
    let other_set = ReplicaSetName::new("analytics").unwrap();
    assert_eq!(store.load(&other_set, "orders", &[Slot(0)]).await.unwrap(), at(&[(0, 0)]));
    // The replica set need not have a generation for its checkpoints to be read.
    store.register(&other_set, slots(), &w1).await.unwrap();
}

/// `projections` lists the projections with checkpoints; `reset` deletes one projection's
/// checkpoints (also those several slots share), commits the caller's read-model writes, and fences
/// every slot so that a worker still running commits nothing under its old epochs.
pub async fn reset_rebuilds_one_projection_and_fences_running_owners<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    assert_eq!(store.projections(&rs).await.unwrap(), Vec::<String>::new());
    // Two slots at one position (stores may keep that in one row), one slot on its own.
    let tx = store.begin().await.unwrap();
    store
        .commit(tx, &fence(&w1, &[(0, 1), (1, 1)]), "orders", &at(&[(0, 9), (1, 9)]))
        .await
        .unwrap();
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(2, 1)]), "orders", &at(&[(2, 4)])).await.unwrap();
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(0, 1)]), "invoices", &at(&[(0, 6)])).await.unwrap();
    assert_eq!(store.projections(&rs).await.unwrap(), vec!["invoices", "orders"]);

    let mut tx = store.begin().await.unwrap();
    h.put_row(&mut tx, "orders-read-model", "cleared").await;
    store.reset(tx, &rs, "orders").await.unwrap();
    assert_eq!(h.get_row("orders-read-model").await.as_deref(), Some("cleared"));
    let all = [Slot(0), Slot(1), Slot(2)];
    assert_eq!(store.load(&rs, "orders", &all).await.unwrap(), at(&[(0, 0), (1, 0), (2, 0)]));
    assert_eq!(store.load(&rs, "invoices", &[Slot(0)]).await.unwrap(), at(&[(0, 6)]));
    assert_eq!(store.projections(&rs).await.unwrap(), vec!["invoices"]);

    // The worker that was running: fenced under its old epoch, fine under the new one.
    let tx = store.begin().await.unwrap();
    let err =
        store.commit(tx, &fence(&w1, &[(0, 1)]), "orders", &at(&[(0, 12)])).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    let snapshot = store.snapshot(&rs).await.unwrap();
    let epoch = snapshot.slots[0].epoch;
    assert!(epoch > Epoch(1), "reset gives slots a new epoch, got {epoch}");
    assert_eq!(snapshot.slots[0].owner.as_ref(), Some(&w1), "ownership stays");
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(0, epoch.0)]), "orders", &at(&[(0, 3)])).await.unwrap();
    assert_eq!(store.load(&rs, "orders", &[Slot(0)]).await.unwrap(), at(&[(0, 3)]));
}

/// `remove` forgets one projection (checkpoints in rows of their own and shared ones alike) and
/// leaves the others and the slots' epochs alone.
pub async fn remove_forgets_one_projection<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let tx = store.begin().await.unwrap();
    store
        .commit(tx, &fence(&w1, &[(0, 1), (1, 1)]), "retired", &at(&[(0, 9), (1, 9)]))
        .await
        .unwrap();
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(2, 1)]), "retired", &at(&[(2, 4)])).await.unwrap();
    let tx = store.begin().await.unwrap();
    store.commit(tx, &fence(&w1, &[(0, 1)]), "kept", &at(&[(0, 6)])).await.unwrap();
    let epoch = store.snapshot(&rs).await.unwrap().slots[0].epoch;

    store.remove(&rs, "retired").await.unwrap();
    assert_eq!(store.projections(&rs).await.unwrap(), vec!["kept"]);
    let all = [Slot(0), Slot(1), Slot(2)];
    assert_eq!(store.load(&rs, "retired", &all).await.unwrap(), at(&[(0, 0), (1, 0), (2, 0)]));
    assert_eq!(store.load(&rs, "kept", &[Slot(0)]).await.unwrap(), at(&[(0, 6)]));
    assert_eq!(store.snapshot(&rs).await.unwrap().slots[0].epoch, epoch, "nobody is fenced");
    store.remove(&rs, "never-existed").await.unwrap();
}

/// A stop is recorded once per (replica set, projection), the first one kept; it is listed until
/// resumed, and a reset or remove clears it.
pub async fn stopped_projections_are_recorded_until_resumed<H: Harness>(h: &H) {
    use orchestrator_core::ports::ProjectionStop;
    let store = h.store();
    let rs = replica_set();
    let other = ReplicaSetName::new("other-set").unwrap();
    let stop = |projection: &str, global: u64, error: &str| ProjectionStop {
        projection: projection.to_owned(),
        position: Position { commit: 0, global },
        aggregate: "bank/Account/acct-7".to_owned(),
        event_type: "MoneyDeposited".to_owned(),
        error: error.to_owned(),
    };
    assert!(store.stopped_projections(&rs).await.unwrap().is_empty());
    store.stop_projection(&rs, &stop("balances", 42, "cannot decode")).await.unwrap();
    store.stop_projection(&rs, &stop("balances", 43, "a later failure")).await.unwrap();
    store.stop_projection(&rs, &stop("audit", 7, "boom")).await.unwrap();
    let listed = store.stopped_projections(&rs).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|s| s.stop.projection.as_str()).collect();
    assert_eq!(names, vec!["audit", "balances"]);
    assert_eq!(listed[1].stop, stop("balances", 42, "cannot decode"), "the first stop is kept");
    assert!(listed[1].age < Duration::from_secs(600));
    assert!(store.stopped_projections(&other).await.unwrap().is_empty(), "per replica set");

    assert!(store.resume_projection(&rs, "balances").await.unwrap());
    assert!(!store.resume_projection(&rs, "balances").await.unwrap(), "not stopped any more");
    let names: Vec<String> = store
        .stopped_projections(&rs)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.stop.projection)
        .collect();
    assert_eq!(names, vec!["audit"]);

    let w1 = worker("w1");
    first_generation(store, &w1).await;
    let tx = store.begin().await.unwrap();
    store.reset(tx, &rs, "audit").await.unwrap();
    assert!(store.stopped_projections(&rs).await.unwrap().is_empty(), "a reset starts it over");
    store.stop_projection(&rs, &stop("audit", 9, "again")).await.unwrap();
    store.remove(&rs, "audit").await.unwrap();
    assert!(store.stopped_projections(&rs).await.unwrap().is_empty(), "a removed one is forgotten");
}
