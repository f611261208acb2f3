//! The concurrent `demo append` processes: planned over the run, started on time, and started
//! again for the rest of their window when they fail (a terminated connection or a server
//! restart ends them).

use std::process::{Child, ExitStatus};
use std::time::Duration;

use anyhow::Result;

use super::options::{Options, Store};
use super::run::Chaos;
use super::{AGGREGATES, APPENDERS};

/// One stream of appends.
pub(super) struct Appender {
    number: u64,
    start_at: Duration,
    end_at: Duration,
    events: u64,
    /// Events per second wanted.
    per_second: f64,
    /// `--rate` that gives about `per_second`.
    rate: Option<u64>,
    pub(super) child: Option<Child>,
    /// Processes started so far.
    pub(super) runs: u32,
    /// Processes that failed.
    pub(super) failures: u32,
    exit: Option<ExitStatus>,
}

/// Appenders of `events` in all, starting at 2%, 12%, 22%, 32% of the run, each spread over 60%
/// of it. `--rate` makes each of its tasks sleep 1/rate after every append, on top of the append
/// itself (and on PostgreSQL up to 20 ms held open); the rate passed makes up for that.
pub(super) fn plan_appenders(options: &Options) -> Vec<Appender> {
    let run = options.duration.as_secs_f64();
    let (concurrency, per_append_ms) = match options.store {
        Store::Postgres => (4.0, 14.0),
        Store::Sqlite => (2.0, 2.0),
    };
    (0..APPENDERS)
        .map(|i| {
            let events = options.events / APPENDERS + u64::from(i < options.events % APPENDERS);
            let per_second = events as f64 / (run * 0.6);
            let sleep_ms = concurrency * 1000.0 / per_second - per_append_ms;
            let rate = (sleep_ms >= 1.0).then(|| (concurrency * 1000.0 / sleep_ms).ceil() as u64);
            let start = run * (0.02 + 0.1 * i as f64);
            Appender {
                number: i + 1,
                start_at: Duration::from_secs_f64(start),
                end_at: Duration::from_secs_f64(start + run * 0.6),
                events,
                per_second,
                rate,
                child: None,
                runs: 0,
                failures: 0,
                exit: None,
            }
        })
        .collect()
}

impl Chaos<'_> {
    fn spawn_appender(&mut self, index: usize, events: u64) -> Result<String> {
        let appender = &self.appenders[index];
        let events = events.to_string();
        let rate = appender.rate.map(|r| r.to_string());
        let mut args = vec!["demo", "append", "--events", &events, "--aggregates", AGGREGATES];
        if let Some(rate) = &rate {
            args.extend(["--rate", rate]);
        }
        match self.options.store {
            Store::Postgres => args.extend(["--concurrency", "4", "--hold-open", "20"]),
            Store::Sqlite => args.extend(["--concurrency", "2"]),
        }
        let log = match appender.runs {
            0 => format!("append-{}.log", appender.number),
            runs => format!("append-{}.{}.log", appender.number, runs + 1),
        };
        let child = self.procs.spawn(&args, &log)?;
        let message = format!("(pid {}, log {log}): {}", child.id(), args.join(" "));
        let appender = &mut self.appenders[index];
        appender.child = Some(child);
        appender.runs += 1;
        Ok(message)
    }

    /// Starts appenders whose moment came; notices those that finished; starts a failed one
    /// again for the rest of its window (the events that exist are what `demo verify` counts).
    pub(super) fn appenders(&mut self) -> Result<()> {
        let elapsed = self.started.elapsed();
        for index in 0..self.appenders.len() {
            let appender = &mut self.appenders[index];
            let number = appender.number;
            if appender.exit.is_some() {
                continue;
            }
            let Some(child) = &mut appender.child else {
                if elapsed >= appender.start_at {
                    let events = appender.events;
                    let started = self.spawn_appender(index, events)?;
                    self.log(&format!("appender {number} starts {started}"));
                }
                continue;
            };
            let Some(status) = child.try_wait()? else { continue };
            appender.child = None;
            if status.success() {
                appender.exit = Some(status);
                self.log(&format!("appender {number} finished"));
                continue;
            }
            appender.failures += 1;
            let left = appender.end_at.saturating_sub(elapsed);
            if left < Duration::from_secs(1) {
                appender.exit = Some(status);
                self.log(&format!("appender {number} failed ({status}): tolerated"));
                continue;
            }
            let events = (appender.per_second * left.as_secs_f64()).ceil() as u64;
            let started = self.spawn_appender(index, events.max(1))?;
            self.log(&format!(
                "appender {number} failed ({status}; tolerated): again for the {:.1}s left {started}",
                left.as_secs_f64()
            ));
        }
        Ok(())
    }

    pub(super) fn appending(&self) -> bool {
        self.appenders.iter().any(|a| a.exit.is_none())
    }

    /// Kills the appenders still running.
    pub(super) fn stop_appenders(&mut self) -> Result<()> {
        for appender in &mut self.appenders {
            if let (Some(child), None) = (&mut appender.child, appender.exit) {
                let _ = child.kill();
                appender.exit = Some(child.wait()?);
            }
        }
        Ok(())
    }
}
