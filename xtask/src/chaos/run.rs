//! The run: worker processes started, watched and stopped; the main loop; convergence and the
//! final check.

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::appenders::{Appender, plan_appenders};
use super::options::Options;
use super::postgres::Postgres;
use super::report::Outcome;
use super::schedule::{Fault, schedule};
use super::status::status;
use super::verify::{VerifyReport, verify};
use super::{CONVERGE_WITHIN, LEAVE_WITHIN, WORKER_TIMINGS};
use crate::procs::{Procs, Signal, signal};

pub(super) enum State {
    Running,
    /// SIGSTOPped until `until`.
    Stopped {
        since: Instant,
        until: Instant,
        /// `Stale worker cleaned` lines about it in the logs when it was stopped.
        evictions_before: usize,
    },
    /// SIGTERMed at `since`, expected to leave.
    Leaving {
        since: Instant,
    },
}

pub(super) struct Worker {
    pub(super) id: String,
    pub(super) child: Child,
    pub(super) state: State,
}

/// The processes of a run and what happened to them.
pub(super) struct Chaos<'a> {
    pub(super) procs: &'a Procs,
    pub(super) options: &'a Options,
    pub(super) postgres: Option<&'a Postgres>,
    pub(super) started: Instant,
    pub(super) workers: Vec<Worker>,
    pub(super) next_worker: u32,
    pub(super) appenders: Vec<Appender>,
    pub(super) faults: BTreeMap<Fault, u32>,
    pub(super) replacements: u32,
    pub(super) evicted_while_stopped: u32,
    /// How long each PostgreSQL restart took, until the server accepted connections again.
    pub(super) restarts: Vec<Duration>,
    pub(super) violations: Vec<String>,
}

impl Drop for Chaos<'_> {
    /// Nothing outlives the run, even when it stops early.
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = signal(&worker.child, Signal::SIGCONT);
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
        for appender in &mut self.appenders {
            if let Some(child) = &mut appender.child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Chaos<'_> {
    pub(super) fn log(&self, message: &str) {
        println!("[{:>6.1}s] {message}", self.started.elapsed().as_secs_f64());
    }

    pub(super) fn start_worker(&mut self, why: &str) -> Result<()> {
        self.next_worker += 1;
        let id = format!("chaos-w{}", self.next_worker);
        let concurrency = self.options.processing_concurrency.to_string();
        let mut args = vec!["demo", "worker", "--worker-id", &id, "--strategy"];
        args.push(self.options.strategy.name());
        args.extend(["--processing-concurrency", &concurrency]);
        args.extend(WORKER_TIMINGS);
        let child = self
            .procs
            .spawn(&args, &format!("{id}.log"))
            .with_context(|| format!("cannot start {id}"))?;
        self.log(&format!("start {id} (pid {}): {why}", child.id()));
        self.workers.push(Worker { id, child, state: State::Running });
        Ok(())
    }

    /// Indexes of the running (not stopped, not leaving) workers, oldest first.
    pub(super) fn running(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| matches!(self.workers[i].state, State::Running))
            .collect()
    }

    /// Ids of the workers that should be members: running or stopped, not leaving.
    pub(super) fn alive_ids(&self) -> Vec<String> {
        self.workers
            .iter()
            .filter(|w| !matches!(w.state, State::Leaving { .. }))
            .map(|w| w.id.clone())
            .collect()
    }

    /// Notices workers that exited: expected after SIGTERM, a violation otherwise. A worker
    /// that does not leave within `LEAVE_WITHIN` of its SIGTERM is killed, and that is a violation.
    pub(super) fn reap(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.workers.len() {
            let exit = self.workers[i].child.try_wait()?;
            let worker = &self.workers[i];
            match (&worker.state, exit) {
                (State::Leaving { since }, Some(status)) => {
                    let message = format!(
                        "{} left after {:.1}s ({status})",
                        worker.id,
                        since.elapsed().as_secs_f64()
                    );
                    if !status.success() {
                        self.violations.push(format!(
                            "{} exited with {status} after SIGTERM (see {}.log)",
                            worker.id, worker.id
                        ));
                    }
                    self.log(&message);
                    self.workers.remove(i);
                    continue;
                }
                (State::Leaving { since }, None) if since.elapsed() > LEAVE_WITHIN => {
                    let message = format!(
                        "{} did not leave within {LEAVE_WITHIN:?} of SIGTERM: kill -9 (see {}.log)",
                        worker.id, worker.id
                    );
                    self.log(&message);
                    self.violations.push(message);
                    let mut worker = self.workers.remove(i);
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    continue;
                }
                (_, Some(status)) => {
                    let message =
                        format!("{} exited by itself ({status}); see {}.log", worker.id, worker.id);
                    self.log(&message);
                    self.violations.push(message);
                    self.workers.remove(i);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        if self.running().is_empty() {
            self.start_worker("keeps one worker running")?;
        }
        Ok(())
    }

    /// One step of the main loop.
    pub(super) fn tick(&mut self) -> Result<()> {
        self.resume(false)?;
        self.reap()?;
        self.appenders()?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// SIGTERMs every worker and waits for them to leave.
    fn stop_all(&mut self) -> Result<()> {
        self.log(&format!("SIGTERM the {} workers", self.workers.len()));
        for worker in &mut self.workers {
            signal(&worker.child, Signal::SIGTERM)?;
            worker.state = State::Leaving { since: Instant::now() };
        }
        while !self.workers.is_empty() {
            let mut i = 0;
            while i < self.workers.len() {
                let worker = &mut self.workers[i];
                let since = match worker.state {
                    State::Leaving { since } => since,
                    _ => Instant::now(),
                };
                if let Some(status) = worker.child.try_wait()? {
                    if !status.success() {
                        let message = format!(
                            "{} exited with {status} after SIGTERM (see {}.log)",
                            worker.id, worker.id
                        );
                        self.violations.push(message);
                    }
                    self.workers.remove(i);
                    continue;
                }
                if since.elapsed() > LEAVE_WITHIN {
                    let message = format!(
                        "{} did not leave within {LEAVE_WITHIN:?} of SIGTERM (see {}.log)",
                        worker.id, worker.id
                    );
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    self.violations.push(message);
                    self.workers.remove(i);
                    continue;
                }
                i += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.log("every worker left");
        Ok(())
    }
}

/// What the wait for convergence found.
struct Convergence {
    took: Option<Duration>,
    not_converged: String,
    report: Option<VerifyReport>,
    generation: Option<u64>,
}

/// Waits until the cluster converged (no lag, every slot owned, the live workers are the
/// members) and `demo verify` passes, or `CONVERGE_WITHIN` is over, or the check failed for
/// good (an event applied twice or out of order).
fn converge(chaos: &mut Chaos<'_>) -> Result<Convergence> {
    let converging = Instant::now();
    let mut found = Convergence {
        took: None,
        not_converged: "no status yet".to_owned(),
        report: None,
        generation: None,
    };
    while converging.elapsed() < CONVERGE_WITHIN {
        chaos.reap()?;
        match status(chaos.procs) {
            Ok(view) => {
                found.generation = Some(view.generation);
                match view.converged(&chaos.alive_ids()) {
                    Ok(()) => match verify(chaos.procs) {
                        Ok(report) if report.passed() => {
                            found.took = Some(converging.elapsed());
                            found.report = Some(report);
                            chaos.log(&format!(
                                "converged: generation {}, members {:?}, no lag; demo verify passed",
                                view.generation,
                                view.members()
                            ));
                            return Ok(found);
                        }
                        Ok(report) => {
                            found.not_converged = "demo verify fails".to_owned();
                            let definitive = report.definitive_failure();
                            found.report = Some(report);
                            if definitive {
                                chaos.log("demo verify found events applied twice or out of order");
                                return Ok(found);
                            }
                        }
                        Err(err) => found.not_converged = format!("{err:#}"),
                    },
                    Err(missing) => found.not_converged = missing,
                }
            }
            Err(err) => found.not_converged = format!("status failed: {err:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    chaos.log(&format!("did not converge: {}", found.not_converged));
    Ok(found)
}

pub(super) fn run(
    procs: &Procs,
    options: &Options,
    postgres: Option<&Postgres>,
) -> Result<Outcome> {
    let mut chaos = Chaos {
        procs,
        options,
        postgres,
        started: Instant::now(),
        workers: Vec::new(),
        next_worker: 0,
        appenders: plan_appenders(options),
        faults: BTreeMap::new(),
        replacements: 0,
        evicted_while_stopped: 0,
        restarts: Vec::new(),
        violations: Vec::new(),
    };
    for _ in 0..options.workers {
        chaos.start_worker("initial worker")?;
    }
    let plan = schedule(options.seed, options.store, options.duration);
    chaos.log(&format!("{} faults scheduled over {:?}", plan.len(), options.duration));
    let mut next = plan.iter().peekable();
    while chaos.started.elapsed() < options.duration {
        while let Some(planned) = next.next_if(|p| chaos.started.elapsed() >= p.at) {
            chaos.inject(planned)?;
        }
        chaos.tick()?;
    }

    chaos.log("no more faults: resume stopped workers, wait for the appenders");
    chaos.resume(true)?;
    let appends_deadline = Instant::now() + Duration::from_secs(180).max(options.duration * 2);
    while chaos.appending() {
        if Instant::now() > appends_deadline {
            chaos.stop_appenders()?;
            chaos.violations.push("appenders still running 3 minutes after the faults".into());
            break;
        }
        chaos.tick()?;
    }
    let appends_done = chaos.started.elapsed();
    while chaos.running().len() < 2 {
        chaos.start_worker("at least two workers for the end")?;
    }

    chaos.log("appends over: waiting for the cluster to converge and demo verify to pass");
    let convergence = converge(&mut chaos)?;
    let report = match convergence.report {
        Some(report) => Some(report),
        None => verify(procs).ok(),
    };
    let final_workers = chaos.workers.len();
    chaos.stop_all()?;

    Ok(Outcome {
        faults: std::mem::take(&mut chaos.faults),
        replacements: chaos.replacements,
        evicted_while_stopped: chaos.evicted_while_stopped,
        restarts: std::mem::take(&mut chaos.restarts),
        violations: std::mem::take(&mut chaos.violations),
        processes: chaos.next_worker,
        final_workers,
        appender_runs: chaos.appenders.iter().map(|a| a.runs).sum(),
        appenders_failed: chaos.appenders.iter().map(|a| a.failures).sum(),
        appends_done,
        converged_in: convergence.took,
        not_converged: convergence.not_converged,
        report,
        generation: convergence.generation,
    })
}
