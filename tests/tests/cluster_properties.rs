//! Cluster properties on the real executor: every case is a seeded run of the runtime simulation
//! (`orchestrator_tests::runtime_sim`): real `Orchestrator` workers over one in-memory store on a
//! paused tokio clock, with random joins, graceful leaves, crashes, pauses past the stale timeout,
//! lost heartbeats, failed and lost commits and appends, under both strategies (by seed parity).
//!
//! After every step the simulation checks: at most one worker processes a slot under its current
//! epoch and it is the owner; generations never go back; no event takes effect twice; per-aggregate
//! order holds. Once faults stop: every slot is owned by a live member and every event took effect
//! exactly once per projection. A seed replays to the same trace.

use orchestrator_tests::runtime_sim::{self, SimConfig};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn every_seed_keeps_the_invariants(seed in any::<u64>()) {
        let report = runtime_sim::run(SimConfig::standard(seed));
        prop_assert!(
            report.violation.is_none(),
            "{}\nreplay: cargo xtask sim --seed {seed}\n{}",
            report.summary(),
            report.trace_text()
        );
    }

    #[test]
    fn a_seed_replays_to_the_same_trace(seed in any::<u64>()) {
        let mut config = SimConfig::standard(seed);
        config.steps = 20;
        let first = runtime_sim::run(config.clone());
        let second = runtime_sim::run(config);
        prop_assert_eq!(first.trace, second.trace);
    }
}
