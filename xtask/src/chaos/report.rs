//! The summary of a run and, when it failed, the rows that show what went wrong.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use super::logs::count_messages;
use super::options::{Options, Store};
use super::postgres::Postgres;
use super::schedule::Fault;
use super::status::Polls;
use super::verify::VerifyReport;
use super::{CONVERGE_WITHIN, PROJECTIONS};
use crate::procs::Procs;

/// What the run found.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) faults: BTreeMap<Fault, u32>,
    pub(super) replacements: u32,
    pub(super) evicted_while_stopped: u32,
    pub(super) restarts: Vec<Duration>,
    pub(super) violations: Vec<String>,
    pub(super) processes: u32,
    pub(super) final_workers: usize,
    pub(super) appender_runs: u32,
    pub(super) appenders_failed: u32,
    pub(super) appends_done: Duration,
    /// How long the cluster took to converge and pass `demo verify`; `None`: it did not.
    pub(super) converged_in: Option<Duration>,
    pub(super) not_converged: String,
    /// The last `demo verify --json` report.
    pub(super) report: Option<VerifyReport>,
    pub(super) generation: Option<u64>,
}

impl Outcome {
    pub(super) fn passed(&self) -> bool {
        self.converged_in.is_some() && self.violations.is_empty()
    }

    fn faults(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(fault, n)| match fault {
                Fault::Kill => format!("{} {n} ({} replaced)", fault.label(), self.replacements),
                Fault::Pause => format!(
                    "{} {n} ({} evicted while stopped)",
                    fault.label(),
                    self.evicted_while_stopped
                ),
                Fault::RestartServer => {
                    let longest = self.restarts.iter().max().copied().unwrap_or_default();
                    format!("{} {n} (longest {:.1}s)", fault.label(), longest.as_secs_f64())
                }
                _ => format!("{} {n}", fault.label()),
            })
            .collect();
        if faults.is_empty() { "none".to_owned() } else { faults.join(", ") }
    }
}

/// Prints the summary.
pub(super) fn print_summary(
    procs: &Procs,
    options: &Options,
    outcome: &Outcome,
    polls: &Polls,
    total: Duration,
) {
    let database_url = procs.database_url.as_deref().unwrap_or_default();
    let appended = outcome
        .report
        .as_ref()
        .map_or("unknown (no verify report)".to_owned(), |r| r.events.to_string());
    println!("\n==> chaos summary");
    println!("store:            {} ({database_url})", options.store.name());
    println!("seed:             {}  (replay: {})", options.seed, options.replay());
    println!("strategy:         {}", options.strategy.name());
    println!("concurrency:      {} slot group(s) per worker", options.processing_concurrency);
    println!(
        "duration:         {:.0}s of faults, {:.1}s in all (appends done at {:.1}s)",
        options.duration.as_secs_f64(),
        total.as_secs_f64(),
        outcome.appends_done.as_secs_f64()
    );
    println!(
        "workers:          {} at the start, {} processes in all, {} at the end",
        options.workers, outcome.processes, outcome.final_workers
    );
    println!(
        "events appended:  {appended} (asked {}; {} appender processes, {} failed)",
        options.events, outcome.appender_runs, outcome.appenders_failed
    );
    println!("faults injected:  {}: {}", outcome.faults.values().sum::<u32>(), outcome.faults());
    println!(
        "rebalances:       generation {} at the end; {} `Stale worker cleaned`, {} `Commit fenced` \
         in the worker logs",
        outcome.generation.map_or("unknown".to_owned(), |g| g.to_string()),
        count_messages(&procs.dir, "Stale worker cleaned"),
        count_messages(&procs.dir, "Commit fenced")
    );
    println!(
        "max lag seen:     {} events (status polled {} times, {} failed)",
        polls.max_lag, polls.count, polls.failures
    );
    match outcome.converged_in {
        Some(took) => println!("time to converge: {:.1}s", took.as_secs_f64()),
        None => println!(
            "time to converge: never within {CONVERGE_WITHIN:?} ({})",
            outcome.not_converged
        ),
    }
    println!("verify:");
    match &outcome.report {
        Some(report) => report.lines().iter().for_each(|line| println!("    {line}")),
        None => println!("    no report"),
    }
    for violation in &outcome.violations {
        println!("violation:        {violation}");
    }
    println!("verdict:          {}", if outcome.passed() { "PASS" } else { "FAIL" });
}

/// On a failed check: the rows that show what went wrong, straight from the database.
pub(super) fn evidence(procs: &Procs, options: &Options, postgres: Option<&Postgres>) -> String {
    let missing = format!(
        "WITH p(name) AS (VALUES ('{}'), ('{}')) \
         SELECT p.name AS projection, e.global_position, e.aggregate_id, e.aggregate_version, e.slot \
         FROM orch_events e CROSS JOIN p WHERE NOT EXISTS (SELECT 1 FROM demo_audit a \
         WHERE a.projection = p.name AND a.global_position = e.global_position) \
         ORDER BY 1, 2 LIMIT 30",
        PROJECTIONS[0], PROJECTIONS[1]
    );
    let queries = [
        (
            "applied more than once",
            "SELECT projection, global_position, aggregate_id, aggregate_version, slot, times, \
             handled_seq, worker_id, handled_at FROM demo_audit WHERE times <> 1 \
             ORDER BY projection, global_position LIMIT 30"
                .to_owned(),
        ),
        ("never applied", missing),
        (
            "applied per worker",
            "SELECT projection, worker_id, count(*) AS events, min(handled_at) AS first, \
             max(handled_at) AS last FROM demo_audit GROUP BY projection, worker_id \
             ORDER BY projection, worker_id"
                .to_owned(),
        ),
    ];
    let mut out = String::new();
    for (title, sql) in queries {
        let result = match (options.store, postgres) {
            (Store::Postgres, Some(postgres)) => postgres.table(&sql),
            _ => Command::new("sqlite3")
                .args(["-header", "-column"])
                .arg(procs.dir.join("chaos.db"))
                .arg(&sql)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr)
                }),
        };
        out.push_str(&format!("--- {title}:\n"));
        match result {
            Ok(text) => out.push_str(text.trim_end()),
            Err(err) => out.push_str(&format!("(could not query: {err})")),
        }
        out.push('\n');
    }
    out
}
