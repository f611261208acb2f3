//! Property tests of the coordination engine: several workers over the in-memory store, driven by
//! random joins, graceful leaves, crashes, pauses past the stale timeout, appends and time.
//!
//! After every step: at most one worker processes a slot under its current epoch and it is the
//! owner; generations never go back; no event takes effect twice; per-aggregate order holds.
//! Once faults stop: every slot is owned by a live member, balanced, and every event took effect
//! exactly once. The same operations replay to the same trace.

use std::time::Duration;

use orchestrator_core::{SlotCount, Strategy as Rebalancing};
use orchestrator_tests::sim::Cluster;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Join,
    Leave(usize),
    Crash(usize),
    Pause(usize),
    Resume(usize),
    Advance(u64),
    Append(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => any::<usize>().prop_map(Op::Crash),
        1 => any::<usize>().prop_map(Op::Pause),
        1 => any::<usize>().prop_map(Op::Resume),
        4 => (50u64..3_000).prop_map(Op::Advance),
        3 => (1u64..30).prop_map(Op::Append),
    ]
}

fn run(strategy: Rebalancing, slots: u32, ops: &[Op]) -> Cluster {
    let mut cluster = Cluster::new(strategy, SlotCount::new(u64::from(slots)).unwrap());
    cluster.join();
    for op in ops {
        let n = cluster.workers.len();
        match *op {
            Op::Join => {
                cluster.join();
            }
            Op::Leave(i) => cluster.leave(i % n),
            Op::Crash(i) => cluster.crash(i % n),
            Op::Pause(i) => cluster.pause(i % n),
            Op::Resume(i) => cluster.resume(i % n),
            Op::Advance(ms) => cluster.advance(Duration::from_millis(ms)),
            Op::Append(k) => cluster.append(k),
        }
        cluster.check_invariants();
        if !cluster.violations.is_empty() {
            return cluster;
        }
    }
    // Make sure someone is left to finish the work.
    if cluster.workers.iter().all(|w| {
        w.status != orchestrator_tests::sim::Status::Running
            && w.status != orchestrator_tests::sim::Status::Paused
    }) {
        cluster.join();
    }
    cluster.quiesce(Duration::from_secs(60));
    cluster
}

fn report(cluster: &Cluster) -> String {
    let tail: Vec<&String> = cluster.trace.iter().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
    format!("violations: {:#?}\nlast trace lines:\n{}", cluster.violations, tail.join("\n"))
}

fn strategies() -> impl Strategy<Value = Rebalancing> {
    prop_oneof![Just(Rebalancing::Recreate), Just(Rebalancing::Incremental)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_membership_churn(
        strategy in strategies(),
        slots in prop_oneof![Just(4u32), Just(16), Just(64)],
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let cluster = run(strategy, slots, &ops);
        prop_assert!(cluster.violations.is_empty(), "{}", report(&cluster));
        prop_assert!(cluster.settled(), "not settled after faults stopped\n{}", report(&cluster));
        prop_assert!(cluster.all_applied(), "events missing\n{}", report(&cluster));
    }

    #[test]
    fn the_same_operations_replay_the_same_run(
        strategy in strategies(),
        ops in proptest::collection::vec(op(), 1..25),
    ) {
        let first = run(strategy, 16, &ops);
        let second = run(strategy, 16, &ops);
        prop_assert_eq!(first.trace, second.trace);
    }
}
