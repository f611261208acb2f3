//! Project automation, run as `cargo xtask <command>`. It depends on a few small crates only
//! (clap, serde_json, rand, nix, url, and orchestrator-core for the duration parser), not on the
//! product's runtime or adapters, so it builds in seconds; the process-level commands build and
//! run the `orchestrator` binary.
//!
//! Commands:
//! - `ci`: everything `.ci/run` checks besides the tests: fmt, clippy, check-deps, docs.
//! - `test`: the test suite (nextest over the workspace, then doctests).
//! - `check-deps`: fails if `orchestrator-core` gains a dependency outside its allow-list.
//! - `demo`: the README's first command: worker processes on SQLite scaling 1 -> 3 -> 2.
//! - `cluster up|scale N|status|down`: a local cluster of worker processes (SQLite or PostgreSQL).
//! - `sim --seed N | --seeds K`: the seeded simulation of real workers with injected faults.
//! - `sim-demo`: seed 0 of the simulation told as a story (its trace and verdict).
//! - `bench [--events N] [--runs R]`: benchmarks against plain sqlx references (needs PostgreSQL).
//! - `chaos --store postgres|sqlite [--workers N] [--events E] [--duration D] [--seed S]
//!   [--strategy S]`: worker processes under seeded faults, then the exactly-once check.
//! - `prometheus`: every PromQL expression of the dashboard, the adapter rules and the docs
//!   evaluated by a real Prometheus scraping demo workers.
//! - `browser`: the status page driven in headless Chromium against a cluster that scales.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

mod browser;
mod chaos;
mod cluster;
mod demo;
mod example;
mod fleet;
mod procs;
mod prometheus;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "Project automation")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Everything .ci/run checks besides the tests: fmt, clippy, check-deps, docs.
    Ci,
    /// The test suite: nextest over the workspace, then doctests.
    Test,
    /// Fails if orchestrator-core gains a dependency outside its allow-list.
    CheckDeps,
    /// The README's first command: worker processes on SQLite scaling 1 -> 3 -> 2.
    Demo,
    /// A local cluster of worker processes (SQLite or PostgreSQL) that outlives the command.
    Cluster(cluster::ClusterArgs),
    /// The seeded simulation of real workers with injected faults (`--seed N` or `--seeds K`).
    Sim(PassThrough),
    /// Seed 0 of the simulation told as a story: its trace and verdict.
    SimDemo,
    /// Benchmarks against plain sqlx references (needs PostgreSQL).
    Bench(PassThrough),
    /// Worker processes under seeded faults, then the exactly-once check.
    Chaos(chaos::ChaosArgs),
    /// The example application (examples/bank-ledger): two workers, commands, one worker
    /// stopped midway, then the balances checked against the events.
    Example(example::ExampleArgs),
    /// A real Prometheus scrapes demo workers; every PromQL expression of the dashboard, the
    /// prometheus-adapter rules and the docs must return series.
    Prometheus(prometheus::PrometheusArgs),
    /// The status page in headless Chromium: slot map against `status --json`, then a scale.
    Browser(browser::BrowserArgs),
}

/// Arguments handed on to the program the command runs (which checks them).
#[derive(Debug, Args)]
struct PassThrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Crates `orchestrator-core` may depend on (normal edges): no IO, no runtime, no clock.
const CORE_ALLOWED: &[&str] = &[
    "orchestrator-core",
    "async-trait",
    "thiserror",
    "thiserror-impl",
    "proc-macro2",
    "quote",
    "syn",
    "unicode-ident",
    // Event ids are UUIDs (generated outside core), and append checks parse metadata as JSON so
    // that every store refuses the same input: pure data crates, no IO.
    "uuid",
    "serde_json",
    "serde_core",
    "itoa",
    "memchr",
    "zmij",
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    match Xtask::parse().task {
        Task::Ci => ci(),
        Task::Test => test(),
        Task::CheckDeps => check_deps(),
        Task::Demo => demo::demo(),
        Task::Cluster(args) => cluster::cluster(args),
        Task::SimDemo => sim_demo(),
        Task::Sim(args) => sim(&args.args),
        Task::Bench(args) => bench(&args.args),
        Task::Chaos(args) => chaos::chaos(args),
        Task::Example(args) => example::example(args),
        Task::Prometheus(args) => prometheus::prometheus(args),
        Task::Browser(args) => browser::browser(args),
    }
}

pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub(crate) fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(project_root());
    command
}

pub(crate) fn run_step(name: &str, mut command: Command) -> Result<()> {
    eprintln!("==> {name}");
    let status = command.status().with_context(|| format!("could not start {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run_step("cargo fmt --check", fmt)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run_step("cargo clippy -D warnings", clippy)?;
    // The example's diesel variant is behind a feature the workspace build leaves off.
    let mut clippy_diesel = cargo();
    clippy_diesel.args([
        "clippy",
        "-p",
        "bank-ledger",
        "--features",
        "diesel",
        "--",
        "-D",
        "warnings",
    ]);
    run_step("cargo clippy -D warnings (bank-ledger --features diesel)", clippy_diesel)?;
    check_deps()?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings");
    run_step("cargo doc", doc)
}

fn test() -> Result<()> {
    let mut nextest = cargo();
    nextest.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    run_step("cargo nextest run", nextest)?;
    let mut doctests = cargo();
    doctests.args(["test", "--workspace", "--doc"]);
    run_step("cargo test --doc", doctests)
}

fn check_deps() -> Result<()> {
    eprintln!("==> check-deps: orchestrator-core stays free of IO crates");
    let output = cargo()
        .args(["tree", "-p", "orchestrator-core", "-e", "normal", "--prefix", "none", "-f", "{p}"])
        .output()
        .context("could not run cargo tree")?;
    if !output.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let tree = String::from_utf8(output.stdout).context("cargo tree printed non-UTF-8")?;
    let offenders: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| !CORE_ALLOWED.contains(name))
        .collect();
    if !offenders.is_empty() {
        bail!(
            "orchestrator-core must stay pure (no IO, runtime or clock crates) but depends on: {}",
            offenders.join(", ")
        );
    }
    eprintln!("    ok: {} crates, all allowed", tree.lines().count());
    Ok(())
}

/// The seeded simulation: `--seed N` replays one run with its trace, `--seeds K` runs K seeds.
fn sim(args: &[String]) -> Result<()> {
    let mut sim = sim_command();
    sim.arg("run").args(args);
    run_step("seeded simulation (real workers, in-memory store, injected faults)", sim)
}

/// Seed 0 of the simulation as a story (real workers over the in-memory store, simulated clock).
fn sim_demo() -> Result<()> {
    let mut sim = sim_command();
    sim.arg("demo");
    run_step("seed 0 of the simulation (real workers over the in-memory store)", sim)
}

/// `cargo run` of the simulation binary (release), waiting for its subcommand.
fn sim_command() -> Command {
    let mut sim = cargo();
    sim.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "orchestrator-tests",
        "--bin",
        "orchestrator-sim",
        "--",
    ]);
    sim
}

fn bench(args: &[String]) -> Result<()> {
    // The processing suite runs real `orchestrator demo worker` processes.
    let mut cli = cargo();
    cli.args(["build", "--quiet", "--release", "-p", "orchestrator-cli"]);
    run_step("the orchestrator binary (release)", cli)?;
    let mut bench = cargo();
    bench.args(["run", "--quiet", "--release", "-p", "orchestrator-bench", "--"]).args(args);
    run_step("benchmarks (each against a plain sqlx reference in the same run)", bench)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn commands_parse_and_pass_arguments_on() {
        let parse = |args: &[&str]| {
            Xtask::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
        };
        let Task::Sim(sim) = parse(&["sim", "--seeds", "300"]).unwrap().task else { panic!() };
        assert_eq!(sim.args, ["--seeds", "300"]);
        let Task::Bench(bench) = parse(&["bench", "store", "--events", "1000"]).unwrap().task
        else {
            panic!()
        };
        assert_eq!(bench.args, ["store", "--events", "1000"]);
        assert!(matches!(parse(&["check-deps"]).unwrap().task, Task::CheckDeps));
        assert!(parse(&["teleport"]).is_err());
        assert!(parse(&["cluster", "up", "--workers", "many"]).is_err());
    }
}
