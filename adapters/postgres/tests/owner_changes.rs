//! Every change of slot ownership writes a new version of the replica set's row: a fenced commit's
//! one statement relies on it to learn that an owner change committed after its snapshot was
//! taken (see `fencing.rs` and docs/ARCHITECTURE.md, "Fenced commit").

use orchestrator_conformance::coordination::{
    first_generation, next_plan, replica_set, slots, worker,
};
use orchestrator_core::ports::{CheckpointStore, CoordinationStore};
use orchestrator_core::{Epoch, Slot, SlotAction, SlotChange};
use orchestrator_postgres::testing::TestSchema;

/// The replica set row's current version.
async fn row_version(schema: &TestSchema) -> String {
    sqlx::query_scalar("SELECT ctid::text FROM orch_replica_sets WHERE name = $1")
        .bind(replica_set().as_str())
        .fetch_one(&schema.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_change_of_owner_writes_a_new_version_of_the_replica_set_row() {
    let Some(schema) = TestSchema::start(slots()).await else { return };
    let (store, rs) = (&schema.store, replica_set());
    let (w1, w2) = (worker("w1"), worker("w2"));

    let leader = first_generation(store, &w1).await;
    let mut seen = vec![row_version(&schema).await];
    let mut changed = |what: &str, version: String| {
        assert!(!seen.contains(&version), "{what} left the replica set's row as it was");
        seen.push(version);
    };

    // Registering fences the previous incarnation of the id out of its slots.
    store.register(&rs, slots(), &w2).await.unwrap();
    changed("register", row_version(&schema).await);

    // A generation handing slot 0 to w2, then its release.
    let handoff = SlotChange {
        slot: Slot(0),
        epoch: Epoch(1),
        action: SlotAction::Handoff { to: w2.clone() },
    };
    let plan = next_plan(1, &w1, leader, &[&w1, &w2], vec![handoff]);
    store.create_generation(&rs, &plan).await.unwrap();
    changed("create_generation", row_version(&schema).await);
    store.release_slot(&rs, &w1, Slot(0), Epoch(1)).await.unwrap();
    changed("release_slot", row_version(&schema).await);

    let tx = store.begin().await.unwrap();
    CheckpointStore::reset(store, tx, &rs, "orders").await.unwrap();
    changed("reset", row_version(&schema).await);

    store.deregister(&rs, &w1, leader).await.unwrap();
    changed("deregister", row_version(&schema).await);
    schema.drop_schema().await;
}
