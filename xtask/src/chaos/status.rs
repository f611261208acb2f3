//! The replica set as `orchestrator status --json` shows it, and the background poll.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::PROJECTIONS;
use crate::procs::Procs;

/// One replica set of `status --json` (the fields chaos reads).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct StatusView {
    pub(crate) generation: u64,
    pub(crate) slots: u64,
    pub(crate) workers: Vec<WorkerView>,
    pub(crate) projections: Vec<ProjectionView>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct WorkerView {
    pub(crate) id: String,
    /// `member` or `joining`.
    pub(crate) state: String,
    pub(crate) slots: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ProjectionView {
    pub(crate) name: String,
    pub(crate) lag_events: u64,
}

impl StatusView {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let sets: Vec<StatusView> =
            serde_json::from_str(text).context("status --json printed something else")?;
        sets.into_iter().next().context("status --json printed no replica set")
    }

    pub(crate) fn max_lag(&self) -> u64 {
        self.projections.iter().map(|p| p.lag_events).max().unwrap_or(0)
    }

    pub(crate) fn members(&self) -> Vec<&str> {
        let mut members: Vec<&str> =
            self.workers.iter().filter(|w| w.state == "member").map(|w| w.id.as_str()).collect();
        members.sort_unstable();
        members
    }

    /// `Ok` when every projection is caught up, every slot owned and the members are exactly
    /// `alive`; otherwise what is still missing.
    pub(crate) fn converged(&self, alive: &[String]) -> Result<(), String> {
        let owned: usize = self.workers.iter().map(|w| w.slots.len()).sum();
        let mut alive: Vec<&str> = alive.iter().map(String::as_str).collect();
        alive.sort_unstable();
        let mut missing = Vec::new();
        if self.projections.len() < PROJECTIONS.len() {
            missing.push(format!("{} projections with checkpoints", self.projections.len()));
        }
        for p in self.projections.iter().filter(|p| p.lag_events > 0) {
            missing.push(format!("{} lags {} events", p.name, p.lag_events));
        }
        if owned as u64 != self.slots {
            missing.push(format!("{owned} of {} slots owned", self.slots));
        }
        if self.members() != alive {
            missing.push(format!("members {:?}, live workers {alive:?}", self.members()));
        }
        if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
    }
}

pub(crate) fn status(procs: &Procs) -> Result<StatusView> {
    StatusView::parse(&procs.orchestrator(&["status", "--json"])?)
}

/// What the background poll of `status --json` (once a second) has seen.
#[derive(Debug, Default)]
pub(crate) struct Polls {
    pub(crate) count: u32,
    pub(crate) failures: u32,
    pub(crate) max_lag: u64,
}

/// Polls `status --json` once a second until `stop`.
pub(crate) fn poll_status(procs: &Procs, stop: &AtomicBool, polls: &Mutex<Polls>) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let seen = status(procs);
        {
            let mut polls = polls.lock().unwrap_or_else(|e| e.into_inner());
            polls.count += 1;
            match seen {
                Ok(view) => polls.max_lag = polls.max_lag.max(view.max_lag()),
                Err(_) => polls.failures += 1,
            }
        }
        let wake = started + Duration::from_secs(1);
        while Instant::now() < wake && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_json() {
        let text = r#"[{"replica_set":"main-projections","generation":7,"strategy":"incremental","slots":4,"workers":[{"id":"chaos-w1","partition":0,"partitions":1,"state":"member","heartbeat_age_ms":12,"slots":[0,1]},{"id":"chaos-w\"2","partition":null,"partitions":1,"state":"joining","heartbeat_age_ms":3,"slots":[2,3]}],"projections":[{"name":"demo_audit","lag_events":5,"lag_seconds":0.25},{"name":"demo_audit_batch","lag_events":0,"lag_seconds":0.0}]}]"#;
        let view = StatusView::parse(text).unwrap();
        assert_eq!(view.generation, 7);
        assert_eq!(view.slots, 4);
        assert_eq!(view.max_lag(), 5);
        assert_eq!(view.members(), vec!["chaos-w1"]);
        assert_eq!(view.workers[1].id, "chaos-w\"2");
        assert_eq!(view.converged(&["chaos-w1".into()]).unwrap_err(), "demo_audit lags 5 events");
        assert!(view.converged(&["chaos-w1".into(), "chaos-w\"2".into()]).is_err());
        assert!(StatusView::parse("[]").is_err());
        assert!(StatusView::parse("replica set main: generation 7").is_err());
    }
}
