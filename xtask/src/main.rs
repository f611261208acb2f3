//! Project automation, run as `cargo xtask <command>`; std only, so it builds in seconds.
//!
//! Commands:
//! - `ci`: everything `.ci/run` checks besides the tests: fmt, clippy, check-deps, docs.
//! - `test`: the test suite (nextest over the workspace, then doctests).
//! - `check-deps`: fails if `orchestrator-core` gains a dependency outside its allow-list.
//! - `demo`: the README's first command: worker processes on SQLite scaling 1 -> 3 -> 2.
//! - `sim-demo`: the same story simulated over the in-memory store.
//! - `bench [--events N] [--runs R]`: benchmarks against plain sqlx references (needs PostgreSQL).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(command) = args.first() else {
        bail!("usage: cargo xtask <ci|test|check-deps|demo|sim-demo|bench>");
    };
    match command.as_str() {
        "ci" => ci(),
        "test" => test(),
        "check-deps" => check_deps(),
        "demo" => demo(),
        "sim-demo" => sim_demo(),
        "bench" => bench(&args[1..]),
        other => bail!(
            "unknown command {other:?}; expected ci, test, check-deps, demo, sim-demo or bench"
        ),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(project_root());
    command
}

fn run_step(name: &str, mut command: Command) -> Result<()> {
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

/// The README's first command: real `orchestrator` worker processes on an embedded SQLite file,
/// scaling 1 -> 3 -> 2 (one leaves by SIGTERM, one dies by kill -9 and a replacement starts), with
/// events appended throughout, then a check of `demo_audit`. Exits non-zero if the check fails.
fn demo() -> Result<()> {
    let mut build = cargo();
    build.args(["build", "--quiet", "--release", "-p", "orchestrator-cli"]);
    run_step("build the orchestrator binary", build)?;
    let demo = Demo::new()?;
    let started = Instant::now();
    eprintln!("==> demo in {} (SQLite, no server)", demo.dir.display());
    demo.orchestrator(&["migrate"])?;
    demo.orchestrator(&["demo", "append", "--events", "2000", "--aggregates", "50"])?;

    let mut workers = vec![demo.start_worker("worker-1")?];
    demo.wait_settled(&["worker-1"], "one worker processes everything")?;
    let mut appender = demo.spawn(
        &["demo", "append", "--events", "3000", "--aggregates", "50", "--rate", "300"],
        "append.log",
    )?;
    workers.push(demo.start_worker("worker-2")?);
    workers.push(demo.start_worker("worker-3")?);
    demo.wait_settled(
        &["worker-1", "worker-2", "worker-3"],
        "two more workers joined: the slots split three ways",
    )?;

    eprintln!("--- worker-2 receives SIGTERM");
    signal(&workers[1], "TERM")?;
    let status = workers.remove(1).wait()?;
    eprintln!("    worker-2 exited ({status})");
    demo.wait_settled(
        &["worker-1", "worker-3"],
        "worker-2 left gracefully: its slots were handed over at once",
    )?;

    eprintln!("--- worker-3 is killed with kill -9; worker-4 starts in its place");
    let mut killed = workers.remove(1);
    let killing = killed.kill();
    killed.wait()?;
    killing?;
    workers.push(demo.start_worker("worker-4")?);
    demo.wait_settled(
        &["worker-1", "worker-4"],
        "worker-3 went stale and was evicted; worker-4 took its share",
    )?;

    let appended = appender.wait()?;
    if !appended.success() {
        bail!(
            "the background appender failed ({appended}); see {}",
            demo.dir.join("append.log").display()
        );
    }
    demo.orchestrator(&["demo", "append", "--events", "1000", "--aggregates", "50"])?;
    eprintln!("--- waiting for the workers to apply all 6000 events");
    let verdict = demo.wait_verified(Duration::from_secs(60));
    for worker in &workers {
        let _ = signal(worker, "TERM");
    }
    for mut worker in workers {
        let _ = worker.wait();
    }
    let verdict = verdict?;
    println!("{verdict}");
    eprintln!("==> demo finished in {:.0?}", started.elapsed());
    Ok(())
}

struct Demo {
    dir: PathBuf,
    binary: PathBuf,
}

impl Demo {
    fn new() -> Result<Self> {
        let dir = project_root().join("target").join("demo");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context("cannot create target/demo")?;
        Ok(Self { dir, binary: project_root().join("target/release/orchestrator") })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .current_dir(&self.dir)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info");
        command
    }

    /// Runs a command to completion, failing with its stderr if it fails.
    fn orchestrator(&self, args: &[&str]) -> Result<String> {
        let output = self.command(args).output().context("cannot run orchestrator")?;
        if !output.status.success() {
            bail!(
                "orchestrator {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    fn spawn(&self, args: &[&str], log: &str) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(log))?;
        Ok(self.command(args).stdout(Stdio::null()).stderr(log).spawn()?)
    }

    /// A worker with short timings so a crash is noticed within seconds.
    fn start_worker(&self, id: &str) -> Result<Child> {
        eprintln!("--- {id} starts");
        self.spawn(
            &[
                "demo",
                "worker",
                "--worker-id",
                id,
                "--heartbeat-interval",
                "1s",
                "--stale-worker-timeout",
                "4s",
                "--registration-wait",
                "500ms",
            ],
            &format!("{id}.log"),
        )
    }

    /// Waits until exactly `members` are the members, every slot owned and none moving, printing
    /// the status whenever it changes.
    fn wait_settled(&self, members: &[&str], what: &str) -> Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            let status = self.orchestrator(&["status"]).unwrap_or_default();
            let headline = status.lines().next().unwrap_or_default().to_owned();
            if headline != last && !headline.is_empty() {
                eprintln!("    [{:>4.1}s] {headline}", started.elapsed().as_secs_f64());
                last = headline;
            }
            let mut current: Vec<&str> = status
                .lines()
                .filter(|line| line.contains(" member "))
                .filter_map(|line| line.split_whitespace().next())
                .collect();
            current.sort_unstable();
            let settled = current == members
                && status.contains(&format!(", {} members,", members.len()))
                && status.contains("(0 unowned, 0 moving)");
            if settled {
                eprintln!("    {what}:");
                for line in status.lines().skip(1) {
                    eprintln!("      {line}");
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the cluster did not settle with members {members:?} within 30 s; last status:\n{status}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_verified(&self, within: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            let output = self.command(&["demo", "verify"]).output()?;
            let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if output.status.success() {
                return Ok(report);
            }
            if started.elapsed() > within {
                bail!("demo_audit check failed:\n{report}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Sends a signal by name through `kill` (std can only send SIGKILL).
fn signal(child: &Child, name: &str) -> Result<()> {
    let status =
        Command::new("kill").args([format!("-{name}"), child.id().to_string()]).status()?;
    if !status.success() {
        bail!("kill -{name} {} failed", child.id());
    }
    Ok(())
}

/// The simulated cluster (engine over the in-memory store, simulated clock).
fn sim_demo() -> Result<()> {
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
        "demo",
    ]);
    run_step("cluster simulation (simulated workers over the in-memory store)", sim)
}

fn bench(args: &[String]) -> Result<()> {
    let mut bench = cargo();
    bench.args(["run", "--quiet", "--release", "-p", "orchestrator-bench", "--"]).args(args);
    run_step("benchmarks (each against a plain sqlx reference in the same run)", bench)
}
