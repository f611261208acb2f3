//! The engine's exact commands for the steps of a join, a handoff and a graceful leave.

use std::time::Duration;

use orchestrator_core::{
    Call, Command, Engine, EngineConfig, Epoch, Exit, Generation, Incarnation, Input, Lease,
    Notice, PROTOCOL_VERSION, ReplicaSetName, Slot, SlotAction, SlotCount, SlotRecord, Snapshot,
    Strategy, Timestamp, Timing, WorkerId, WorkerRecord,
};

const T0: Timestamp = Timestamp(1_000_000);

/// The lease every heartbeat asks for: the stale timeout.
const LEASE: Duration = Duration::from_secs(30);

fn id(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn engine(name: &str, strategy: Strategy) -> Engine {
    Engine::new(EngineConfig {
        replica_set: ReplicaSetName::new("main-projections").unwrap(),
        worker_id: id(name),
        slot_count: SlotCount::new(4).unwrap(),
        timing: Timing::default(),
        strategy,
    })
}

fn worker(name: &str, incarnation: u64, registered_secs: u64, acked: u64) -> WorkerRecord {
    WorkerRecord {
        id: id(name),
        incarnation: Incarnation(incarnation),
        heartbeat_age: Duration::from_millis(100),
        registered_age: Duration::from_secs(registered_secs),
        acked_generation: Generation(acked),
        protocol: PROTOCOL_VERSION,
    }
}

fn snapshot(
    generation: u64,
    members: &[&str],
    leader: &str,
    workers: Vec<WorkerRecord>,
    slots: Vec<SlotRecord>,
) -> Snapshot {
    let lease_incarnation =
        workers.iter().find(|w| w.id.as_str() == leader).map(|w| w.incarnation).unwrap_or_default();
    Snapshot {
        replica_set: ReplicaSetName::new("main-projections").unwrap(),
        slot_count: SlotCount::new(4).unwrap(),
        generation: Generation(generation),
        members: members.iter().map(|m| id(m)).collect(),
        lease: Some(Lease {
            holder: id(leader),
            incarnation: lease_incarnation,
            remaining: Duration::from_secs(20),
        }),
        workers,
        slots,
    }
}

fn owned(owner: &str, epoch: u64) -> SlotRecord {
    SlotRecord { owner: Some(id(owner)), epoch: Epoch(epoch), next_owner: None }
}

fn registered(e: &mut Engine, incarnation: u64) {
    e.handle(T0, Input::Start);
    assert_eq!(e.take_commands(), vec![Command::Register]);
    e.handle(T0, Input::Registered(Incarnation(incarnation)));
    assert_eq!(
        e.take_commands(),
        vec![
            Command::Heartbeat { incarnation: Incarnation(incarnation), lease: LEASE },
            Command::Observe
        ]
    );
}

#[test]
fn a_lone_leader_waits_for_the_registration_window_then_grants_everything() {
    let mut a = engine("a", Strategy::Recreate);
    registered(&mut a, 1);

    let fresh = snapshot(0, &[], "a", vec![worker("a", 1, 0, 0)], vec![SlotRecord::default(); 4]);
    a.handle(T0, Input::Observed(fresh));
    assert_eq!(a.take_commands(), vec![], "joins are batched for registration_wait");
    assert_eq!(a.next_deadline(), Some(T0 + Duration::from_secs(1)));

    let waited = snapshot(0, &[], "a", vec![worker("a", 1, 1, 0)], vec![SlotRecord::default(); 4]);
    a.handle(T0 + Duration::from_secs(1), Input::Observed(waited));
    let commands = a.take_commands();
    let Command::CreateGeneration(plan) = &commands[0] else { panic!("{commands:?}") };
    assert_eq!((plan.expected, plan.generation), (Generation(0), Generation(1)));
    assert_eq!(plan.members, vec![id("a")]);
    assert!(plan.changes.iter().all(|c| c.action == SlotAction::Grant { to: id("a") }));
    assert_eq!(plan.changes.len(), 4);
    assert_eq!(commands[1], Command::Observe);
}

#[test]
fn a_member_acks_then_starts_its_slots() {
    let mut a = engine("a", Strategy::Recreate);
    registered(&mut a, 1);
    let gen1 = snapshot(1, &["a"], "a", vec![worker("a", 1, 2, 0)], vec![owned("a", 1); 4]);
    a.handle(T0, Input::Observed(gen1));
    let mut expected =
        vec![Command::AckGeneration { incarnation: Incarnation(1), generation: Generation(1) }];
    expected.extend((0..4).map(|s| Command::StartSlot { slot: Slot(s), epoch: Epoch(1) }));
    assert_eq!(a.take_commands(), expected);
    assert!(a.take_notices().contains(&Notice::Processing {
        generation: Generation(1),
        partition: Some(orchestrator_core::Partition { index: 0, count: 1 }),
        slots: 4,
    }));
}

fn running_alone(strategy: Strategy) -> Engine {
    let mut a = engine("a", strategy);
    registered(&mut a, 1);
    let gen1 = snapshot(1, &["a"], "a", vec![worker("a", 1, 2, 0)], vec![owned("a", 1); 4]);
    a.handle(T0, Input::Observed(gen1));
    a.take_commands();
    a.take_notices();
    a
}

fn handoff_of_slot_3() -> Snapshot {
    let mut slots = vec![owned("a", 1); 4];
    slots[3].next_owner = Some(id("b"));
    snapshot(2, &["a", "b"], "a", vec![worker("a", 1, 9, 1), worker("b", 2, 2, 0)], slots)
}

#[test]
fn incremental_stops_and_releases_only_the_moved_slot() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::Observed(handoff_of_slot_3()));
    assert_eq!(a.take_commands(), vec![Command::StopSlot { slot: Slot(3) }]);
    a.handle(T0, Input::SlotStopped(Slot(3)));
    a.handle(T0, Input::Observed(handoff_of_slot_3()));
    assert_eq!(a.take_commands(), vec![Command::ReleaseSlot { slot: Slot(3), epoch: Epoch(1) }]);
    assert_eq!(a.running().len(), 3, "unmoved slots never stopped");
}

#[test]
fn recreate_stops_everything_and_restarts_after_everyone_acked() {
    let mut a = running_alone(Strategy::Recreate);
    a.handle(T0, Input::Observed(handoff_of_slot_3()));
    assert_eq!(
        a.take_commands(),
        (0..4).map(|s| Command::StopSlot { slot: Slot(s) }).collect::<Vec<_>>()
    );
    for s in 0..4 {
        a.handle(T0, Input::SlotStopped(Slot(s)));
    }
    a.handle(T0, Input::Observed(handoff_of_slot_3()));
    assert_eq!(a.take_commands(), vec![Command::ReleaseSlot { slot: Slot(3), epoch: Epoch(1) }]);

    // Released: a acks; b has not acked yet, so nothing starts.
    let mut slots = vec![owned("a", 1); 4];
    slots[3] = owned("b", 2);
    let released = snapshot(
        2,
        &["a", "b"],
        "a",
        vec![worker("a", 1, 9, 1), worker("b", 2, 2, 0)],
        slots.clone(),
    );
    a.handle(T0, Input::Observed(released));
    assert_eq!(
        a.take_commands(),
        vec![Command::AckGeneration { incarnation: Incarnation(1), generation: Generation(2) }]
    );

    let everyone =
        snapshot(2, &["a", "b"], "a", vec![worker("a", 1, 9, 2), worker("b", 2, 2, 2)], slots);
    a.handle(T0 + Duration::from_millis(300), Input::Observed(everyone));
    assert_eq!(
        a.take_commands(),
        (0..3).map(|s| Command::StartSlot { slot: Slot(s), epoch: Epoch(1) }).collect::<Vec<_>>()
    );
    assert!(
        a.take_notices()
            .iter()
            .any(|n| matches!(n, Notice::AllCoordinated { generation: Generation(2), .. }))
    );
}

#[test]
fn a_slot_taken_away_is_stopped_at_once() {
    let mut a = running_alone(Strategy::Incremental);
    let mut slots = vec![owned("a", 1); 4];
    slots[0] = owned("b", 2);
    let workers = vec![worker("a", 1, 9, 1), worker("b", 2, 9, 1)];
    a.handle(T0, Input::Observed(snapshot(1, &["a", "b"], "b", workers, slots)));
    assert_eq!(a.take_commands(), vec![Command::StopSlot { slot: Slot(0) }]);
    assert!(a.take_notices().contains(&Notice::OwnershipLost { slot: Slot(0) }));
}

#[test]
fn graceful_leave_drains_then_deregisters() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::Shutdown);
    assert_eq!(
        a.take_commands(),
        (0..4).map(|s| Command::StopSlot { slot: Slot(s) }).collect::<Vec<_>>()
    );
    for s in 0..3 {
        a.handle(T0, Input::SlotStopped(Slot(s)));
        assert_eq!(a.take_commands(), vec![]);
    }
    a.handle(T0, Input::SlotStopped(Slot(3)));
    assert_eq!(a.take_commands(), vec![Command::Deregister { incarnation: Incarnation(1) }]);
    a.handle(T0, Input::Deregistered);
    assert!(a.has_left());
}

#[test]
fn heartbeats_and_observes_follow_their_intervals() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0 + Duration::from_millis(999), Input::Tick);
    assert_eq!(a.take_commands(), vec![]);
    a.handle(T0 + Duration::from_secs(1), Input::Tick);
    assert_eq!(a.take_commands(), vec![Command::Observe]);
    a.handle(T0 + Duration::from_secs(5), Input::Tick);
    assert_eq!(
        a.take_commands(),
        vec![Command::Heartbeat { incarnation: Incarnation(1), lease: LEASE }, Command::Observe]
    );
}

#[test]
fn without_acknowledged_heartbeats_processing_stops() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0 + Duration::from_secs(31), Input::Tick);
    let commands = a.take_commands();
    assert!(commands.contains(&Command::StopSlot { slot: Slot(0) }), "{commands:?}");
    assert!(a.take_notices().contains(&Notice::ContactLost));
}

#[test]
fn an_evicted_worker_registers_again_and_a_superseded_one_leaves() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::NotRegistered);
    let commands = a.take_commands();
    assert_eq!(commands.last(), Some(&Command::Register));
    assert_eq!(commands.len(), 5, "four stops then register: {commands:?}");

    let mut b = running_alone(Strategy::Incremental);
    let newer = snapshot(1, &["a"], "a", vec![worker("a", 7, 0, 0)], vec![owned("a", 2); 4]);
    b.handle(T0, Input::Observed(newer));
    assert_eq!(b.take_commands().len(), 4);
    assert!(b.has_left());
    assert!(b.take_notices().contains(&Notice::Superseded));
}

#[test]
fn a_live_worker_of_another_protocol_makes_this_one_leave_and_a_stale_one_does_not() {
    let mut a = running_alone(Strategy::Incremental);
    let mut old = worker("old", 7, 60, 0);
    old.protocol = PROTOCOL_VERSION - 1;
    old.heartbeat_age = Timing::default().stale_worker_timeout + Duration::from_secs(1);
    let with_stale_old =
        snapshot(1, &["a"], "a", vec![worker("a", 1, 2, 0), old.clone()], vec![owned("a", 1); 4]);
    a.handle(T0, Input::Observed(with_stale_old));
    assert!(!a.take_notices().iter().any(|n| matches!(n, Notice::IncompatibleWorkers { .. })));
    assert!(!a.take_commands().iter().any(|c| matches!(c, Command::StopSlot { .. })));

    old.heartbeat_age = Duration::from_millis(100);
    let with_live_old =
        snapshot(1, &["a"], "a", vec![worker("a", 1, 2, 0), old], vec![owned("a", 1); 4]);
    a.handle(T0, Input::Observed(with_live_old));
    let notices = a.take_notices();
    assert!(
        notices.contains(&Notice::IncompatibleWorkers {
            workers: vec![(id("old"), PROTOCOL_VERSION - 1)]
        }),
        "{notices:?}"
    );
    // It leaves the way a graceful shutdown does: stop everything, then deregister.
    assert_eq!(
        a.take_commands(),
        (0..4).map(|s| Command::StopSlot { slot: Slot(s) }).collect::<Vec<_>>()
    );
    for s in 0..4 {
        a.handle(T0, Input::SlotStopped(Slot(s)));
    }
    assert_eq!(a.take_commands(), vec![Command::Deregister { incarnation: Incarnation(1) }]);
}

fn failed(call: Call, transient: bool) -> Input {
    Input::CallFailed { call, transient }
}

#[test]
fn registration_is_retried_with_backoff_at_the_engines_deadlines_and_shutdown_ends_it() {
    let mut e = engine("a", Strategy::Incremental);
    e.handle(T0, Input::Start);
    assert_eq!(e.take_commands(), vec![Command::Register]);
    let mut at = T0;
    for (attempt, backoff_ms) in
        [(1, 200), (2, 400), (3, 800), (4, 1600), (5, 3200), (6, 5000), (7, 5000)]
    {
        e.handle(at, failed(Call::Register, true));
        let after = Duration::from_millis(backoff_ms);
        assert_eq!(
            e.take_notices(),
            vec![Notice::RetryScheduled { call: Call::Register, attempt, after }]
        );
        assert_eq!(e.next_deadline(), Some(at + after), "attempt {attempt}");
        e.handle(at + after - Duration::from_millis(1), Input::Tick);
        assert_eq!(e.take_commands(), vec![], "not before its time");
        at = at + after;
        e.handle(at, Input::Tick);
        assert_eq!(e.take_commands(), vec![Command::Register]);
        assert_eq!(e.next_deadline(), None, "nothing due while the attempt is in flight");
    }
    // SIGTERM while the database is down: the worker ends at once, with nothing to undo.
    e.handle(at, failed(Call::Register, true));
    e.handle(at, Input::Shutdown);
    assert!(e.has_left());
    assert_eq!(e.exit(), Some(&Exit::Left));
    assert_eq!(e.next_deadline(), None);
    // A registration that lands after the shutdown is undone.
    e.handle(at, Input::Registered(Incarnation(4)));
    assert_eq!(e.take_commands(), vec![Command::Deregister { incarnation: Incarnation(4) }]);
}

#[test]
fn a_definite_refusal_ends_the_worker_and_a_success_resets_the_backoff() {
    let mut e = engine("a", Strategy::Incremental);
    e.handle(T0, Input::Start);
    e.take_commands();
    e.handle(T0, failed(Call::Register, false));
    assert!(e.has_left());
    assert_eq!(e.exit(), Some(&Exit::Refused));

    let mut e = engine("b", Strategy::Incremental);
    e.handle(T0, Input::Start);
    e.take_commands();
    e.handle(T0, failed(Call::Register, true));
    e.handle(T0 + Duration::from_millis(200), Input::Tick);
    e.take_commands();
    e.handle(T0 + Duration::from_millis(250), Input::Registered(Incarnation(1)));
    assert_eq!(
        e.next_deadline(),
        Some(T0 + Duration::from_millis(250) + Timing::default().poll_interval),
        "no retry pending once registered"
    );
}

#[test]
fn deregistration_is_retried_until_the_leave_deadline() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::Shutdown);
    a.take_commands();
    for s in 0..4 {
        a.handle(T0, Input::SlotStopped(Slot(s)));
    }
    assert_eq!(a.take_commands(), vec![Command::Deregister { incarnation: Incarnation(1) }]);
    a.handle(T0, failed(Call::Deregister, true));
    assert!(matches!(
        a.take_notices()[..],
        [Notice::RetryScheduled { call: Call::Deregister, attempt: 1, .. }]
    ));
    a.handle(T0 + Duration::from_millis(200), Input::Tick);
    assert!(a.take_commands().contains(&Command::Deregister { incarnation: Incarnation(1) }));
    // The database stays down: at coordination_timeout the worker gives up and ends.
    let deadline = T0 + Timing::default().coordination_timeout;
    a.handle(deadline, failed(Call::Deregister, true));
    a.handle(deadline, Input::Tick);
    assert!(a.has_left());
    assert_eq!(a.exit(), Some(&Exit::LeaveTimedOut));
    assert!(a.take_notices().contains(&Notice::LeaveTimedOut));
}

#[test]
fn a_leave_ends_at_its_deadline_even_if_a_batch_never_finishes() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::Shutdown);
    a.take_commands();
    let deadline = T0 + Timing::default().coordination_timeout;
    assert!(a.next_deadline().is_some_and(|d| d <= deadline));
    a.handle(deadline - Duration::from_millis(1), Input::Tick);
    assert!(!a.has_left());
    a.handle(deadline, Input::Tick);
    assert_eq!(a.exit(), Some(&Exit::LeaveTimedOut));
}

#[test]
fn a_lost_slot_is_stopped_and_the_store_looked_at_again() {
    let mut a = running_alone(Strategy::Incremental);
    a.handle(T0, Input::SlotLost(Slot(2)));
    assert!(!a.running().contains_key(&Slot(2)));
    assert_eq!(a.take_commands(), vec![Command::Observe]);
}

/// A handoff whose owner keeps heartbeating but never releases the slot (a hung handler, a frozen
/// process) is forced by the leader after `coordination_timeout`: the slot is granted to its next
/// owner with the plan's epoch check, which bumps the epoch and fences the old owner's commit.
#[test]
fn a_handoff_not_released_within_the_coordination_timeout_is_forced() {
    let mut b = engine("b", Strategy::Incremental);
    registered(&mut b, 2);
    let stuck = || {
        let mut slots = vec![owned("a", 1), owned("a", 1), owned("b", 1), owned("a", 4)];
        slots[3].next_owner = Some(id("b"));
        snapshot(2, &["a", "b"], "b", vec![worker("a", 1, 90, 2), worker("b", 2, 90, 2)], slots)
    };
    b.handle(T0, Input::Observed(stuck()));
    let planned =
        |commands: &[Command]| commands.iter().any(|c| matches!(c, Command::CreateGeneration(_)));
    assert!(!planned(&b.take_commands()), "a handoff just seen is waited for");
    let timeout = Timing::default().coordination_timeout;
    assert!(
        b.next_deadline().is_some_and(|d| d <= T0 + timeout),
        "the leader looks again when the handoff falls due"
    );
    b.handle(T0 + timeout / 2, Input::Observed(stuck()));
    assert!(!planned(&b.take_commands()), "not yet due");
    b.take_notices();

    b.handle(T0 + timeout, Input::Observed(stuck()));
    let commands = b.take_commands();
    let Some(Command::CreateGeneration(plan)) =
        commands.iter().find(|c| matches!(c, Command::CreateGeneration(_)))
    else {
        panic!("the overdue handoff is forced: {commands:?}")
    };
    assert_eq!(plan.generation, Generation(3));
    assert_eq!(plan.changes.len(), 1, "only the stuck slot moves: {:?}", plan.changes);
    assert_eq!(plan.changes[0].slot, Slot(3));
    assert_eq!(plan.changes[0].epoch, Epoch(4), "compare-and-set on the epoch the owner holds");
    assert_eq!(plan.changes[0].action, SlotAction::Grant { to: id("b") });
    assert!(b.take_notices().contains(&Notice::HandoffForced {
        slot: Slot(3),
        from: id("a"),
        to: id("b"),
    }));
}

/// A handoff released in time is never forced, and a new handoff of the same slot starts its own
/// clock.
#[test]
fn a_handoff_released_in_time_is_not_forced() {
    let mut b = engine("b", Strategy::Incremental);
    registered(&mut b, 2);
    let timeout = Timing::default().coordination_timeout;
    let with_handoff = |epoch: u64| {
        let mut slots = vec![owned("a", 1), owned("a", 1), owned("b", 1), owned("a", epoch)];
        slots[3].next_owner = Some(id("b"));
        snapshot(2, &["a", "b"], "b", vec![worker("a", 1, 90, 2), worker("b", 2, 90, 2)], slots)
    };
    b.handle(T0, Input::Observed(with_handoff(4)));
    let released = {
        let slots = vec![owned("a", 1), owned("a", 1), owned("b", 1), owned("b", 5)];
        snapshot(2, &["a", "b"], "b", vec![worker("a", 1, 90, 2), worker("b", 2, 90, 2)], slots)
    };
    b.handle(T0 + timeout / 2, Input::Observed(released));
    b.handle(T0 + timeout, Input::Observed(with_handoff(6)));
    let commands = b.take_commands();
    assert!(
        !commands.iter().any(|c| matches!(c, Command::CreateGeneration(_))),
        "a later handoff is timed from when it was seen: {commands:?}"
    );
}
