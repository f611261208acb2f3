//! What a user would try, on every adapter: one worker, workers joining, a graceful leave, a crash,
//! a failing handler under both failure policies (`stop`: its projection stops on every worker,
//! the others and the workers go on, until resumed; `park`: its key's events are set aside and
//! retried after a fix), two replica sets
//! side by side. Every scenario appends events while the cluster changes and ends by checking that each projection applied every event exactly once, in
//! per-aggregate order.

mod support;

use std::time::Duration;

use orchestrator_core::ports::CheckpointStore;
use orchestrator_core::{ReplicaSetName, Strategy};
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

/// Waits until `check` holds (polling every 25 ms), or fails after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `stop` policy: a projection that fails for good on one event stops on every worker,
/// recorded in the store; the workers and their other projection go on; after a fix (a new
/// release of the handler) and `projection resume`, it goes on from the failing event.
async fn a_failing_handler_stops_its_projection_on_every_worker<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    let rs = ReplicaSetName::new("main-projections").unwrap();
    cluster.append(60).await;
    let failing = 37;
    // "audit" fails on one event (every attempt); "audit_b", in the same workers, must not notice.
    cluster.projections = vec!["audit_b".into()];
    for id in ["w1", "w2"] {
        let projections = vec![
            cluster.harness.audit("audit", id, Some(failing)),
            cluster.harness.audit("audit_b", id, None),
        ];
        cluster
            .spawn(id, fast_settings("main-projections", id, Strategy::default()), projections)
            .await;
    }
    cluster.wait_all_applied(WITHIN).await;
    let store = cluster.harness.store();
    eventually(WITHIN, "the stop is recorded", || async {
        !store.stopped_projections(&rs).await.unwrap().is_empty()
    })
    .await;
    let stopped = store.stopped_projections(&rs).await.unwrap();
    assert_eq!(stopped.len(), 1);
    let stop = &stopped[0].stop;
    assert_eq!(
        (stop.projection.as_str(), stop.position.global, stop.event_type.as_str()),
        ("audit", failing, "Deposited")
    );
    assert_eq!(stop.aggregate, format!("bank/Account/acct-{}", failing % 20));
    assert!(stop.error.contains("projection configured to fail at 37"), "{}", stop.error);
    // Both workers stay, the healthy projection goes on; the stopped one is not retried in a loop
    // by whoever owns the slot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.append(20).await;
    cluster.wait_all_applied(WITHIN).await;
    // No checkpoint moved past the failing event, and it never took effect.
    let slot = orchestrator_core::SlotCount::new(support::SLOTS)
        .unwrap()
        .slot_of(&format!("acct-{}", failing % 20));
    let checkpoints = store.load(&rs, "audit", &[slot]).await.unwrap();
    assert!(
        checkpoints[&slot].global < failing,
        "checkpoint {} passed the failing event",
        checkpoints[&slot]
    );
    let rows = cluster.harness.audit_rows("audit").await;
    assert!(rows.iter().all(|r| r.global != failing));
    // The workers leave cleanly: a stopped projection is not the worker's failure.
    cluster.leave("w1").await.unwrap();
    cluster.leave("w2").await.unwrap();
    // The fix is deployed (a handler that no longer fails) and the projection resumed.
    assert!(store.resume_projection(&rs, "audit").await.unwrap());
    cluster.projections = vec!["audit".into(), "audit_b".into()];
    let projections = vec![
        cluster.harness.audit("audit", "w3", None),
        cluster.harness.audit("audit_b", "w3", None),
    ];
    cluster
        .spawn("w3", fast_settings("main-projections", "w3", Strategy::default()), projections)
        .await;
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// A projection stopped while its workers run starts again on `projection resume`, without a
/// restart: the workers see the record gone at their next heartbeat interval.
async fn a_resumed_projection_goes_on_in_running_workers<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    let rs = ReplicaSetName::new("main-projections").unwrap();
    cluster.join("w1").await;
    cluster.append(40).await;
    cluster.wait_all_applied(WITHIN).await;
    let store = cluster.harness.store();
    // An operator (or another worker) records a stop: this worker stops the projection too.
    let stop = orchestrator_core::ports::ProjectionStop {
        projection: "audit".into(),
        position: orchestrator_core::Position::global(1),
        aggregate: "bank/Account/acct-1".into(),
        event_type: "Deposited".into(),
        error: "stopped by hand".into(),
    };
    store.stop_projection(&rs, &stop).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.append(20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cluster.harness.audit_rows("audit").await.len(), 40, "stopped: nothing applied");
    assert!(store.resume_projection(&rs, "audit").await.unwrap());
    cluster.wait_all_applied(WITHIN).await;
    cluster.stop_all().await;
}

/// The `park` policy: the failing event and every later event of its key go to the dead letters,
/// everything else is applied; after a fix, `dlq retry` applies the parked events exactly once
/// and in order, and the key's later events follow.
async fn a_failing_event_is_parked_and_retried_after_a_fix<H: Harness>() {
    use orchestrator_core::ports::{DeadLetterAction, DeadLetterFilter, DeadLetterStore};
    let Some(mut cluster) = Cluster::<H>::start(Strategy::default()).await else { return };
    let rs = ReplicaSetName::new("main-projections").unwrap();
    cluster.append(60).await;
    let failing = 37;
    let key = format!("acct-{}", failing % 20);
    let mut settings = fast_settings("main-projections", "w1", Strategy::default());
    settings.failure_policy = orchestrator_runtime::FailurePolicy::Park;
    let projections = vec![cluster.harness.audit("audit", "w1", Some(failing))];
    cluster.spawn("w1", settings.clone(), projections).await;
    let store = cluster.harness.store();
    // Events 37 and 57 are acct-17's from the failing one on: parked; the other 58 applied.
    let parked_of = |letters: &[orchestrator_core::ports::DeadLetter]| {
        letters.iter().map(|l| l.position.global).collect::<Vec<_>>()
    };
    eventually(WITHIN, "the failing key parked", || async {
        parked_of(&store.dead_letters(&rs, &DeadLetterFilter::default()).await.unwrap()) == [37, 57]
    })
    .await;
    eventually(WITHIN, "the rest applied", || async {
        cluster.harness.audit_rows("audit").await.len() == 58
    })
    .await;
    let letters = store.dead_letters(&rs, &DeadLetterFilter::default()).await.unwrap();
    assert!(letters.iter().all(|l| l.key == key && l.projection == "audit"));
    assert!(
        letters[0].error.contains("projection configured to fail at 37"),
        "{}",
        letters[0].error
    );
    assert_eq!(letters[0].attempts, 3);
    // Later events of the key are parked behind it, those of other keys applied.
    cluster.append(20).await;
    eventually(WITHIN, "acct-17's event 77 parked", || async {
        store.dead_letters(&rs, &DeadLetterFilter::default()).await.unwrap().len() == 3
    })
    .await;
    eventually(WITHIN, "the rest applied", || async {
        cluster.harness.audit_rows("audit").await.len() == 77
    })
    .await;
    let rows = cluster.harness.audit_rows("audit").await;
    assert!(rows.iter().all(|r| r.aggregate != key || r.global < failing));
    cluster.leave("w1").await.unwrap();
    // The fix: a handler that no longer fails; then the retry, carried out by the worker.
    let projections = vec![cluster.harness.audit("audit", "w2", None)];
    settings.worker_id = orchestrator_core::WorkerId::new("w2").unwrap();
    cluster.spawn("w2", settings, projections).await;
    let filter = DeadLetterFilter { projection: Some("audit".into()), ..Default::default() };
    assert_eq!(store.request(&rs, &filter, DeadLetterAction::Retry).await.unwrap(), 3);
    cluster.projections = vec!["audit".into()];
    cluster.wait_all_applied(WITHIN).await;
    assert!(store.dead_letters(&rs, &DeadLetterFilter::default()).await.unwrap().is_empty());
    cluster.stop_all().await;
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

/// A projection whose own queries meet the store's trouble on one event, `times` times in a row
/// (a connection lost under the handler, as during a database restart).
struct StoreTrouble<Tx> {
    inner: std::sync::Arc<dyn orchestrator_runtime::Projection<Tx>>,
    on: u64,
    left: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl<Tx: Send + 'static> orchestrator_runtime::Projection<Tx> for StoreTrouble<Tx> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn handle(
        &self,
        tx: &mut Tx,
        event: &orchestrator_core::Event,
    ) -> Result<(), orchestrator_core::ports::BoxError> {
        use std::sync::atomic::Ordering::SeqCst;
        if event.position.global == self.on
            && self.left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            let lost = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
            return Err(orchestrator_core::ports::StoreError::unavailable("upsert", lost).into());
        }
        self.inner.handle(tx, event).await
    }
}

/// Store failures raised through the handler are retried for as long as they last and never
/// count as attempts: ten in a row on one event, with three attempts allowed, stop nothing.
async fn store_failures_under_the_handler_never_stop_a_projection<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::Incremental).await else { return };
    cluster.projections = vec!["audit".into()];
    let trouble = StoreTrouble {
        inner: cluster.harness.audit("audit", "w1", None),
        on: 30,
        left: std::sync::atomic::AtomicU32::new(10),
    };
    let settings = fast_settings("main-projections", "w1", Strategy::Incremental);
    assert_eq!(settings.retry.max_attempts, 3);
    cluster.spawn("w1", settings, vec![std::sync::Arc::new(trouble)]).await;
    cluster.append(60).await;
    cluster.wait_all_applied(WITHIN).await;
    let rs = ReplicaSetName::new("main-projections").unwrap();
    assert!(cluster.harness.store().stopped_projections(&rs).await.unwrap().is_empty());
    cluster.stop_all().await;
}

/// A projection that blocks its thread on one event (a synchronous call without a timeout:
/// neither the handler timeout nor anything else can interrupt it) while its worker's other tasks
/// keep heartbeating.
struct Blocking<Tx> {
    inner: std::sync::Arc<dyn orchestrator_runtime::Projection<Tx>>,
    on: u64,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    for_: Duration,
}

#[async_trait::async_trait]
impl<Tx: Send + 'static> orchestrator_runtime::Projection<Tx> for Blocking<Tx> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn handle(
        &self,
        tx: &mut Tx,
        event: &orchestrator_core::Event,
    ) -> Result<(), orchestrator_core::ports::BoxError> {
        if event.position.global == self.on
            && !self.blocked.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            // The handler's thread hangs; block_in_place hands the thread's other tasks to
            // another one, as separate threads would: a plain sleep here also froze whatever
            // task sat in the blocked worker's LIFO slot (the heartbeats, at times), so the
            // owner looked dead instead of hung.
            tokio::task::block_in_place(|| std::thread::sleep(self.for_));
        }
        self.inner.handle(tx, event).await
    }
}

/// A slot in handoff whose owner keeps heartbeating but never finishes its batch is moved anyway
/// after `coordination_timeout` (4 s here), with a bumped epoch: the new owner processes it long
/// before the old owner's handler returns (10 s), and the old owner's late commit is fenced, so
/// every event is still applied exactly once.
async fn a_hung_owner_loses_its_slots_after_the_coordination_timeout<H: Harness>() {
    let Some(mut cluster) = Cluster::<H>::start(Strategy::Incremental).await else { return };
    cluster.projections = vec!["audit".into()];
    let hang = Duration::from_secs(10);
    let blocking = Blocking {
        inner: cluster.harness.audit("audit", "w1", None),
        on: 30,
        blocked: Default::default(),
        for_: hang,
    };
    cluster
        .spawn(
            "w1",
            fast_settings("main-projections", "w1", Strategy::Incremental),
            vec![std::sync::Arc::new(blocking)],
        )
        .await;
    cluster.append(60).await;
    // w1 is blocked on event 30 with every slot in its batch; w2 joins and half the slots are
    // handed to it, which w1 cannot release.
    eventually(WITHIN, "w1 blocked", || async {
        cluster.harness.audit_rows("audit").await.len() >= 5
    })
    .await;
    let blocked_at = tokio::time::Instant::now();
    cluster.join("w2").await;
    eventually(WITHIN, "w2 processes a moved slot", || async {
        cluster.harness.audit_rows("audit").await.iter().any(|r| r.worker == "w2")
    })
    .await;
    assert!(
        blocked_at.elapsed() < hang - Duration::from_secs(1),
        "the handoff was forced before the hung handler returned ({:?})",
        blocked_at.elapsed()
    );
    // Once the handler returns, its batch's commit is refused; w1 goes on with what it still owns.
    cluster.append(40).await;
    tokio::time::sleep(hang).await;
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
                a_failing_handler_stops_its_projection_on_every_worker::<$harness>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn resume_while_running() {
                a_resumed_projection_goes_on_in_running_workers::<$harness>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn store_failures_never_count() {
                store_failures_under_the_handler_never_stop_a_projection::<$harness>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn park_and_retry() {
                a_failing_event_is_parked_and_retried_after_a_fix::<$harness>().await;
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

// Not on SQLite: there a batch's transaction holds the database's only write lock, so a hung
// handler stops the worker's heartbeats too, and it is evicted as stale instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_hung_owner_handoff_is_forced() {
    a_hung_owner_loses_its_slots_after_the_coordination_timeout::<support::adapters::Memory>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_hung_owner_handoff_is_forced() {
    a_hung_owner_loses_its_slots_after_the_coordination_timeout::<support::adapters::Postgres>()
        .await;
}

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
