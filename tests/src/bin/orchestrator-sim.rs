//! Runs the simulated cluster.
//!
//! - `orchestrator-sim run --seed N` / `--seeds K [--first S]`: the seeded fault-injecting
//!   simulation of real workers (`orchestrator_tests::runtime_sim`); prints the trace of a single
//!   seed, or one line per seed, and exits non-zero if any seed broke an invariant (its trace is
//!   printed, and `--seed N` replays it exactly).
//! - `orchestrator-sim demo`: the run of seed 0 told as a story (its trace and verdict). Exits
//!   non-zero if it broke an invariant.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use orchestrator_tests::runtime_sim::{self, SimConfig, SimReport};

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
    /// The run of seed 0 as a story: its trace and verdict.
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

/// A story of real workers over the in-memory store: the standard seeded run of seed 0, its
/// trace (joins, leaves, crashes, pauses, each generation and its partitions) and its verdict.
fn demo() -> ExitCode {
    println!(
        "Simulated cluster: real workers (the runtime's Orchestrator) over the in-memory store,"
    );
    println!(
        "on a paused tokio clock, with seeded faults; the same run as `cargo xtask sim --seed 0`.\n"
    );
    let report = runtime_sim::run(SimConfig::standard(0));
    print!("{}", report.trace_text());
    println!("\n{}", report.summary());
    if report.violation.is_none() {
        println!("verdict: PASS - every event took effect exactly once, in per-aggregate order");
        ExitCode::SUCCESS
    } else {
        println!("verdict: FAIL");
        ExitCode::FAILURE
    }
}
