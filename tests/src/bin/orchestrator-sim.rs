//! Runs the simulated cluster. `orchestrator-sim demo` scales 1 -> 3 -> 2 workers over the
//! in-memory store with the default timing, printing each generation, and checks that every event
//! took effect exactly once in per-aggregate order. Exits non-zero if the check fails.

use std::process::ExitCode;
use std::time::Duration;

use orchestrator_core::{Generation, SlotCount, Strategy, Timing};
use orchestrator_tests::sim::Cluster;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("demo") => demo(),
        _ => {
            eprintln!("usage: orchestrator-sim demo");
            ExitCode::FAILURE
        }
    }
}

struct Narrator {
    last_seen: (Generation, Vec<(orchestrator_core::WorkerId, usize)>),
}

impl Narrator {
    fn say(&self, cluster: &Cluster, what: &str) {
        println!("[{:>6.1}s] {what}", cluster.elapsed().as_secs_f64());
    }

    /// Runs the cluster for `span`, appending `rate` events per simulated second, and prints every
    /// generation that appears.
    fn run_for(&mut self, cluster: &mut Cluster, span: Duration, rate: u64) {
        let step = Duration::from_millis(100);
        let mut elapsed = Duration::ZERO;
        while elapsed < span {
            cluster.append(rate / 10);
            cluster.advance(step);
            elapsed += step;
            let (generation, members) = cluster.membership();
            if (generation, &members) != (self.last_seen.0, &self.last_seen.1) {
                self.last_seen = (generation, members.clone());
                let n = members.len();
                let parts: Vec<String> = members
                    .iter()
                    .enumerate()
                    .map(|(i, (id, slots))| format!("{id} partition {i}/{n} ({slots} slots)"))
                    .collect();
                self.say(cluster, &format!("generation {generation}: {}", parts.join(", ")));
            }
        }
    }
}

fn demo() -> ExitCode {
    println!(
        "Simulated cluster: workers run the real coordination engine over the in-memory store,"
    );
    println!("with default timing (heartbeat 5s, stale after 30s) on a simulated clock.");
    println!("(The multi-process demo on SQLite replaces this once the runtime and CLI exist.)\n");
    let mut cluster =
        Cluster::with_timing(Strategy::Recreate, SlotCount::DEFAULT, Timing::default());
    let mut narrator = Narrator { last_seen: (Generation::ZERO, Vec::new()) };

    narrator.say(&cluster, "worker-0 starts");
    cluster.join();
    narrator.run_for(&mut cluster, Duration::from_secs(5), 200);

    narrator.say(&cluster, "worker-1 and worker-2 start");
    cluster.join();
    cluster.join();
    narrator.run_for(&mut cluster, Duration::from_secs(10), 200);

    narrator.say(&cluster, "worker-1 receives SIGTERM and leaves gracefully");
    cluster.leave(1);
    narrator.run_for(&mut cluster, Duration::from_secs(10), 200);

    narrator.say(&cluster, "worker-2 is killed (kill -9); a replacement, worker-3, starts");
    cluster.crash(2);
    cluster.join();
    narrator.run_for(&mut cluster, Duration::from_secs(45), 200);

    narrator.say(&cluster, "appends stop; waiting for the workers to catch up");
    cluster.quiesce(Duration::from_secs(120));
    let (generation, members) = cluster.membership();
    println!();
    println!("events appended:        {}", cluster.appended());
    println!("generations:            {generation}");
    println!("final members:          {}", members.len());
    println!("fenced commits refused: {}", cluster.count_in_trace("fenced on slot"));
    let ok = cluster.violations.is_empty() && cluster.all_applied() && cluster.settled();
    if ok {
        println!("verdict: PASS - every event took effect exactly once, in per-aggregate order");
        ExitCode::SUCCESS
    } else {
        println!("verdict: FAIL");
        for violation in &cluster.violations {
            println!("  {violation}");
        }
        if !cluster.all_applied() {
            println!("  not every event was applied exactly once");
        }
        ExitCode::FAILURE
    }
}
