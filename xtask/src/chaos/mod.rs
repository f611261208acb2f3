//! `cargo xtask chaos`: the multi-process chaos run (docs/testing.md).
//!
//! Real `orchestrator demo worker` processes on PostgreSQL or SQLite, concurrent `demo append`
//! processes, and a seeded schedule of faults: workers joining, leaving by SIGTERM, dying by
//! kill -9, frozen by SIGSTOP for longer than the stale timeout and then resumed as zombies, and
//! (PostgreSQL) their database connections terminated and the server itself restarted.
//! Afterwards the cluster must converge (no lag, every slot owned, the live workers are the
//! members, as `orchestrator status --json` shows) and `orchestrator demo verify --json` must
//! pass: every event took effect exactly once per projection, in per-aggregate order. Anything
//! else exits non-zero; the logs (JSON lines) stay in `target/chaos-<store>/`.
//!
//! The same seed gives the same schedule (fault kinds, targets, timings); the default seed comes
//! from the clock and is printed so a run can be replayed.
//!
//! - [`options`]: the flags; [`schedule`]: the seeded faults; [`run`]: the processes and the
//!   main loop; [`faults`]: injecting one fault; [`appenders`]: the `demo append` processes;
//!   [`status`] and [`verify`]: the two JSON reports read; [`logs`]: the workers' JSON logs;
//!   [`postgres`]: the run's database, connection kills and server restarts; [`report`]: the
//!   summary and a failed run's evidence.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

mod appenders;
mod faults;
mod logs;
mod options;
mod postgres;
mod report;
mod run;
mod schedule;
mod status;
mod verify;

pub(crate) use options::ChaosArgs;
use options::Store;
use postgres::Postgres;
use status::{Polls, poll_status};

use crate::procs::{Procs, build_orchestrator};

/// Worker timings: short, so that crashes and pauses are noticed within seconds.
const WORKER_TIMINGS: [&str; 8] = [
    "--heartbeat-interval",
    "500ms",
    "--stale-worker-timeout",
    "3s",
    "--registration-wait",
    "300ms",
    "--coordination-timeout",
    "10s",
];
/// Most workers alive at once (running or stopped).
const MAX_WORKERS: usize = 6;
/// `demo append` processes, started at different moments.
const APPENDERS: u64 = 4;
const AGGREGATES: &str = "50";
/// How long the cluster has, once appends are over, to process everything and pass the check.
const CONVERGE_WITHIN: Duration = Duration::from_secs(90);
/// How long a worker has to leave after SIGTERM.
const LEAVE_WITHIN: Duration = Duration::from_secs(30);
/// The demo projections (`demo verify` checks both).
const PROJECTIONS: [&str; 2] = ["demo_audit", "demo_audit_batch"];

pub(crate) fn chaos(args: ChaosArgs) -> Result<()> {
    let options = args.options();
    build_orchestrator()?;
    let mut procs = Procs::new(&format!("chaos-{}", options.store.name()))?;
    // JSON lines: chaos reads the workers' logs as data.
    procs.log_format = Some("json");
    let postgres = match options.store {
        Store::Sqlite => None,
        Store::Postgres => Some(Postgres::create(options.seed)?),
    };
    let database_url = match &postgres {
        Some(postgres) => postgres.url.clone(),
        None => format!("sqlite:{}", procs.dir.join("chaos.db").display()),
    };
    procs.database_url = Some(database_url.clone());
    println!(
        "==> chaos on {} ({database_url}), seed {}{}, strategy {}, {} workers, {} events, {:.0}s of faults",
        options.store.name(),
        options.seed,
        if options.seed_from_clock { " (from the clock)" } else { "" },
        options.strategy.name(),
        options.workers,
        options.events,
        options.duration.as_secs_f64()
    );
    println!("    logs in {}", procs.dir.display());
    procs.orchestrator(&["migrate"])?;

    let stop = AtomicBool::new(false);
    let polls = Mutex::new(Polls::default());
    let started = Instant::now();
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| poll_status(&procs, &stop, &polls));
        let outcome = run::run(&procs, &options, postgres.as_ref());
        stop.store(true, Ordering::Relaxed);
        outcome
    })?;
    let polls = polls.into_inner().unwrap_or_else(|e| e.into_inner());
    report::print_summary(&procs, &options, &outcome, &polls, started.elapsed());
    if !outcome.passed() {
        let evidence = report::evidence(&procs, &options, postgres.as_ref());
        let _ = std::fs::write(procs.dir.join("evidence.txt"), &evidence);
        println!("\n{evidence}");
        let dir = procs.dir.strip_prefix(crate::project_root()).unwrap_or(&procs.dir);
        bail!(
            "chaos run failed (seed {}; replay: {}); logs and evidence in {}",
            options.seed,
            options.replay(),
            dir.display()
        );
    }
    Ok(())
}
