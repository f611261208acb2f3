//! Injecting one planned fault, and resuming stopped workers.

use std::time::Instant;

use anyhow::{Context, Result};

use super::MAX_WORKERS;
use super::logs::evictions_of;
use super::run::{Chaos, State};
use super::schedule::{Fault, Planned};
use crate::procs::{Signal, signal};

impl Chaos<'_> {
    pub(super) fn inject(&mut self, planned: &Planned) -> Result<()> {
        let running = self.running();
        let alive = self.alive_ids().len();
        let mut fault = planned.fault;
        if fault == Fault::Join && alive >= MAX_WORKERS {
            fault = Fault::Term;
        }
        if running.is_empty() || matches!(fault, Fault::Term | Fault::Pause) && running.len() <= 1 {
            // Keep at least one worker running: grow instead. (A kill -9 of the last one is
            // always followed by a replacement.)
            fault = Fault::Join;
        }
        *self.faults.entry(fault).or_default() += 1;
        let target = running.get((planned.pick % running.len().max(1) as u64) as usize).copied();
        match (fault, target) {
            (Fault::DropConnections, _) => {
                let postgres = self.postgres.context("no PostgreSQL here")?;
                let killed = postgres.terminate_connections()?;
                self.log(&format!(
                    "pg_terminate_backend: {killed} connections to {} terminated (workers, appenders, status)",
                    postgres.database
                ));
            }
            (Fault::RestartServer, _) => {
                let postgres = self.postgres.context("no PostgreSQL here")?;
                self.log("PostgreSQL server restart: every connection drops until it is back");
                let took = postgres.restart_server()?;
                self.restarts.push(took);
                self.log(&format!(
                    "PostgreSQL accepts connections again, {:.1}s after the restart began",
                    took.as_secs_f64()
                ));
            }
            (Fault::Join, _) | (_, None) => self.start_worker("joins")?,
            (Fault::Term, Some(i)) => {
                signal(&self.workers[i].child, Signal::SIGTERM)?;
                self.workers[i].state = State::Leaving { since: Instant::now() };
                self.log(&format!("SIGTERM {} (graceful leave)", self.workers[i].id));
            }
            (Fault::Kill, Some(i)) => {
                let mut worker = self.workers.remove(i);
                worker.child.kill().with_context(|| format!("cannot kill {}", worker.id))?;
                worker.child.wait()?;
                let replace = planned.replace || running.len() <= 1;
                self.log(&format!(
                    "kill -9 {} (pid {}){}",
                    worker.id,
                    worker.child.id(),
                    if replace { ", a replacement starts" } else { "" }
                ));
                if replace {
                    self.replacements += 1;
                    self.start_worker(&format!("replaces {}", worker.id))?;
                }
            }
            (Fault::Pause, Some(i)) => {
                let evictions_before = evictions_of(&self.procs.dir, &self.workers[i].id);
                signal(&self.workers[i].child, Signal::SIGSTOP)?;
                let now = Instant::now();
                self.workers[i].state =
                    State::Stopped { since: now, until: now + planned.pause, evictions_before };
                self.log(&format!(
                    "SIGSTOP {} for {:.1}s (stale timeout 3s: it must be evicted, then fenced as a zombie)",
                    self.workers[i].id,
                    planned.pause.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// SIGCONTs stopped workers whose pause is over (all of them when `all`).
    pub(super) fn resume(&mut self, all: bool) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.workers.len() {
            let State::Stopped { since, until, evictions_before } = self.workers[i].state else {
                continue;
            };
            if !all && now < until {
                continue;
            }
            let id = self.workers[i].id.clone();
            // The leaders' logs say whether the stopped worker was evicted while stopped.
            let evicted = if evictions_of(&self.procs.dir, &id) > evictions_before {
                self.evicted_while_stopped += 1;
                "evicted while stopped (a leader logged `Stale worker cleaned`); now a zombie"
                    .to_owned()
            } else {
                let mut text =
                    "not evicted while stopped (no `Stale worker cleaned` for it in any log)"
                        .to_owned();
                if let Some(waiting) = self.postgres.and_then(|p| p.waiting_on_locks()) {
                    text.push_str(&format!("; {waiting}"));
                }
                text
            };
            signal(&self.workers[i].child, Signal::SIGCONT)?;
            self.workers[i].state = State::Running;
            self.log(&format!(
                "SIGCONT {id} after {:.1}s stopped: {evicted}",
                since.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }
}
