//! Runs the simulated cluster.
//!
//! - `orchestrator-sim run --seed N` / `--seeds K [--first S]`: the seeded fault-injecting
//!   simulation of real workers (`orchestrator_tests::runtime_sim`); prints the trace of a single
//!   seed, or one line per seed, and exits non-zero if any seed broke an invariant (its trace is
//!   printed, and `--seed N` replays it exactly).
//! - `orchestrator-sim demo`: scales 1 -> 3 -> 2 workers over the in-memory store with the default
//!   timing, printing each generation, and checks that every event took effect exactly once in
//!   per-aggregate order. Exits non-zero if the check fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use orchestrator_core::{Generation, SlotCount, Strategy, Timing};
use orchestrator_tests::runtime_sim::{self, SimConfig, SimReport};
use orchestrator_tests::sim::Cluster;

#[derive(Debug, Parser)]
#[command(name = "orchestrator-sim", about = "The simulated cluster")]
struct Cli {
    #[command(subcommand)]
    command: SimCommand,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// The seeded fault-injecting simulation of real workers.
    Run(RunArgs),
    /// 1 -> 3 -> 2 workers over the in-memory store with the default timing.
    Demo,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["seed", "seeds"])))]
struct RunArgs {
    /// Replay one seed, printing its trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Run K seeds, one line each (a failing seed's trace is printed).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: Option<u64>,
    /// The first of the K seeds (with --seeds).
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Steps per seed (default: the standard configuration's).
    #[arg(long)]
    steps: Option<usize>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        SimCommand::Demo => demo(),
        SimCommand::Run(args) => simulate(Run::from(args)),
    }
}

/// Which seeds to run.
struct Run {
    seeds: std::ops::Range<u64>,
    single: bool,
    steps: Option<usize>,
}

impl From<RunArgs> for Run {
    fn from(args: RunArgs) -> Self {
        match (args.seed, args.seeds) {
            (Some(seed), _) => Run { seeds: seed..seed + 1, single: true, steps: args.steps },
            (None, count) => {
                let count = count.unwrap_or(1);
                Run { seeds: args.first..args.first + count, single: false, steps: args.steps }
            }
        }
    }
}

fn simulate(run: Run) -> ExitCode {
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    let mut totals: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let (mut events, mut simulated, mut generations, mut count) = (0, Duration::ZERO, 0, 0);
    for seed in run.seeds.clone() {
        let mut config = SimConfig::standard(seed);
        if let Some(steps) = run.steps {
            config.steps = steps;
        }
        let report: SimReport = runtime_sim::run(config);
        count += 1;
        events += report.events;
        simulated += report.simulated;
        generations += report.generations;
        for (kind, n) in &report.faults {
            *totals.entry(kind).or_default() += n;
        }
        if run.single || report.violation.is_some() {
            print!("{}", report.trace_text());
        }
        println!("{}", report.summary());
        if report.violation.is_some() {
            failed.push(seed);
        }
    }
    let faults: Vec<String> = totals.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "\n{count} seeds ({}..{}), {events} events, {generations} generations, {:.0?} simulated in {:.1?}; faults [{}]",
        run.seeds.start,
        run.seeds.end - 1,
        simulated,
        started.elapsed(),
        faults.join(", ")
    );
    if failed.is_empty() {
        println!("verdict: PASS - every seed kept every invariant");
        ExitCode::SUCCESS
    } else {
        let seeds: Vec<String> = failed.iter().map(u64::to_string).collect();
        println!("verdict: FAIL - seeds {} (replay one with --seed N)", seeds.join(", "));
        ExitCode::FAILURE
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
