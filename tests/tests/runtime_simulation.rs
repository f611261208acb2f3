//! The seeded simulation of real workers (engine + runtime) over the in-memory store with faults:
//! a handful of seeds here; `cargo xtask sim --seeds K` runs many more.

use orchestrator_tests::runtime_sim::{SimConfig, run};

#[test]
fn seeds_keep_every_invariant() {
    for seed in 1..=6 {
        let report = run(SimConfig::standard(seed));
        assert!(report.violation.is_none(), "{}\n{}", report.summary(), report.trace_text());
        assert!(report.events > 100, "{}", report.summary());
        assert!(report.faults.values().sum::<u64>() > 0, "{}", report.summary());
    }
}

#[test]
fn a_seed_replays_the_same_run() {
    let first = run(SimConfig::standard(42));
    let second = run(SimConfig::standard(42));
    assert_eq!(first.trace, second.trace);
    assert_eq!(first.summary(), second.summary());
}
