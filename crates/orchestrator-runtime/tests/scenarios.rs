//! What a user would try, on every adapter: one worker, workers joining, a graceful leave, a crash,
//! a failing handler (its projection stops, the others and the worker go on), two replica sets
//! side by side. Every scenario appends events while the cluster changes and ends by checking that each projection applied every event exactly once, in
//! per-aggregate order.

mod support;

use std::time::Duration;

use orchestrator_core::ports::CheckpointStore;
use orchestrator_core::{ReplicaSetName, Strategy};
use orchestrator_runtime::RunError;
use support::{Cluster, Harness, fast_settings};

const WITHIN: Duration = Duration::from_secs(30);

async fn one_worker_processes_everything<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    cluster.append(150).await;
    cluster.join("w1").await;
    cluster.append(50).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert_eq!(by_worker.get("w1"), Some(&200));
    cluster.stop_all().await;
}

async fn workers_join_and_the_work_splits<H: Harness>(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<H>::start(strategy).await else { return };
    cluster.join("w1").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.join("w3").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    // Appends after everyone has settled land on all three.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert_eq!(by_worker.len(), 3, "every worker applied events: {by_worker:?}");
    cluster.stop_all().await;
}

async fn a_graceful_leave_hands_over_its_share<H: Harness>(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<H>::start(strategy).await else { return };
    for id in ["w1", "w2", "w3"] {
        cluster.join(id).await;
    }
    cluster.append(150).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.leave("w2").await.unwrap();
    cluster.append(150).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

async fn a_crashed_worker_is_replaced_after_the_stale_timeout<H: Harness>(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<H>::start(strategy).await else { return };
    cluster.join("w1").await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.crash("w2");
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert!(by_worker.contains_key("w1"));
    cluster.stop_all().await;
}

async fn a_failing_handler_stops_its_projection_at_the_event<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    cluster.append(60).await;
    let failing = 37;
    // "audit" fails for good on one event; "audit_b", in the same worker, must not notice.
    cluster.projections = vec!["audit_b".into()];
    let projections = vec![
        cluster.harness.audit("audit", "w1", Some(failing)),
        cluster.harness.audit("audit_b", "w1", None),
    ];
    cluster
        .spawn("w1", fast_settings("main-projections", "w1", Strategy::default()), projections)
        .await;
    cluster.wait_all_applied(WITHIN).await;
    // Long enough for the three attempts (10 ms and 20 ms apart) to run out; then more events,
    // which the healthy projection of the same worker still applies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.append(20).await;
    cluster.wait_all_applied(WITHIN).await;
    // The worker stayed; leaving, it reports the projection that stopped.
    let err = cluster.leave("w1").await.unwrap_err();
    let RunError::ProjectionFailed {
        projection, position, aggregate, event_type, attempts, ..
    } = &err
    else {
        panic!("unexpected error {err}");
    };
    assert_eq!(
        (projection.as_str(), position.global, event_type.as_str(), *attempts),
        ("audit", failing, "Deposited", 3)
    );
    assert_eq!(aggregate, &format!("bank/Account/acct-{}", failing % 20));
    assert!(err.to_string().contains("projection configured to fail at 37"), "{err}");
    // No checkpoint moved past the failing event, and it never took effect.
    let store = cluster.harness.store();
    let slot = orchestrator_core::SlotCount::new(support::SLOTS)
        .unwrap()
        .slot_of(&format!("acct-{}", failing % 20));
    let checkpoints = store
        .load(&ReplicaSetName::new("main-projections").unwrap(), "audit", &[slot])
        .await
        .unwrap();
    assert!(
        checkpoints[&slot].global < failing,
        "checkpoint {} passed the failing event",
        checkpoints[&slot]
    );
    let rows = cluster.harness.audit_rows("audit").await;
    assert!(rows.iter().all(|r| r.global != failing));
    cluster.harness.finish().await;
}

async fn two_replica_sets_run_side_by_side<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    cluster.projections = vec!["main_view".into(), "analytics_view".into()];
    for (replica_set, projection, id) in [
        ("main-projections", "main_view", "m1"),
        ("main-projections", "main_view", "m2"),
        ("analytics", "analytics_view", "a1"),
    ] {
        let projections = vec![cluster.harness.audit(projection, id, None)];
        cluster.spawn(id, fast_settings(replica_set, id, Strategy::default()), projections).await;
    }
    cluster.append(200).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// A worker frozen with a batch in flight (SIGSTOP) goes stale; the other takes its slots and
/// applies those events; when the zombie thaws, its commit is refused and nothing applies twice.
async fn a_paused_worker_cannot_commit_when_it_resumes<H: Harness>(strategy: Strategy) {
    let Some(mut cluster) = Cluster::<H>::start(strategy).await else { return };
    let zombie_store = support::pausable::Pausable::new(cluster.harness.store(), H::SINGLE_WRITER);
    let projections =
        cluster.projections.iter().map(|p| cluster.harness.audit(p, "zombie", None)).collect();
    cluster.spawn_on(
        zombie_store.clone(),
        cluster.harness.change_feed().await,
        "zombie",
        fast_settings("main-projections", "zombie", strategy),
        projections,
    );
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    zombie_store.pause();
    cluster.append(200).await;
    let by_worker = cluster.wait_all_applied(WITHIN).await;
    assert!(by_worker.contains_key("w2"), "{by_worker:?}");
    zombie_store.resume();
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    // Let the thawed zombie's commits land (or be refused) before the final count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

macro_rules! scenarios {
    ($module:ident, $harness:ty) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_worker() {
                one_worker_processes_everything::<$harness>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn joins_recreate() {
                workers_join_and_the_work_splits::<$harness>(Strategy::Recreate).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn joins_incremental() {
                workers_join_and_the_work_splits::<$harness>(Strategy::Incremental).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn graceful_leave_recreate() {
                a_graceful_leave_hands_over_its_share::<$harness>(Strategy::Recreate).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn graceful_leave_incremental() {
                a_graceful_leave_hands_over_its_share::<$harness>(Strategy::Incremental).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_recreate() {
                a_crashed_worker_is_replaced_after_the_stale_timeout::<$harness>(
                    Strategy::Recreate,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crash_incremental() {
                a_crashed_worker_is_replaced_after_the_stale_timeout::<$harness>(
                    Strategy::Incremental,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zombie_recreate() {
                a_paused_worker_cannot_commit_when_it_resumes::<$harness>(Strategy::Recreate).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zombie_incremental() {
                a_paused_worker_cannot_commit_when_it_resumes::<$harness>(Strategy::Incremental)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn failing_handler() {
                a_failing_handler_stops_its_projection_at_the_event::<$harness>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_replica_sets() {
                two_replica_sets_run_side_by_side::<$harness>().await;
            }
        }
    };
}

scenarios!(memory, support::adapters::Memory);
scenarios!(sqlite, support::adapters::Sqlite);
scenarios!(postgres, support::adapters::Postgres);

/// Every connection is cut twice while two workers process and events keep arriving (a database
/// restart or failover as the workers see it): they reconnect by themselves and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_loss_is_survived() {
    let Some(mut cluster) =
        Cluster::<support::adapters::Postgres>::start(Strategy::Incremental).await
    else {
        return;
    };
    cluster.join("w1").await;
    cluster.join("w2").await;
    cluster.append(100).await;
    cluster.wait_all_applied(WITHIN).await;
    for _ in 0..2 {
        let killed = cluster.harness.schema().kill_connections().await.unwrap();
        assert!(killed > 0);
        cluster.append(100).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}
