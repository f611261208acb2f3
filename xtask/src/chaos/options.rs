//! `cargo xtask chaos` flags, checked before anything starts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};

use super::{APPENDERS, MAX_WORKERS};

/// The store the workers coordinate through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Store {
    #[value(alias = "postgresql")]
    Postgres,
    Sqlite,
}

impl Store {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::Sqlite => "sqlite",
        }
    }
}

/// The workers' rebalancing strategy (`--strategy` of `orchestrator demo worker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Strategy {
    Incremental,
    Recreate,
}

impl Strategy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::Incremental => "incremental",
            Strategy::Recreate => "recreate",
        }
    }
}

/// Real worker processes under seeded faults, then the exactly-once check.
#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// The store: postgres (the server named by ORCH_CHAOS_POSTGRES_URL, default
    /// postgres://postgres@127.0.0.1:5432, in a database of the run's own) or sqlite.
    #[arg(long, value_enum)]
    store: Store,
    /// Workers at the start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=MAX_WORKERS as i64))]
    workers: u8,
    /// Events appended in all, by concurrent appenders.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(APPENDERS..))]
    events: u64,
    /// How long faults are injected, like 60s, 2m or 90 (at least 10s).
    #[arg(long, default_value = "60s", value_parser = run_duration)]
    duration: Duration,
    /// The schedule's seed (default: from the clock, printed for replay).
    #[arg(long)]
    seed: Option<u64>,
    /// The workers' rebalancing strategy.
    #[arg(long, value_enum, default_value_t = Strategy::Incremental)]
    strategy: Strategy,
    /// The workers' PROCESSING_CONCURRENCY: slot groups each worker processes at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    processing_concurrency: u16,
}

/// A run's settings.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) store: Store,
    pub(crate) workers: usize,
    pub(crate) events: u64,
    pub(crate) duration: Duration,
    pub(crate) seed: u64,
    pub(crate) seed_from_clock: bool,
    pub(crate) strategy: Strategy,
    pub(crate) processing_concurrency: u16,
}

impl ChaosArgs {
    pub(crate) fn options(self) -> Options {
        let seed_from_clock = self.seed.is_none();
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
                % 1_000_000
        });
        Options {
            store: self.store,
            workers: usize::from(self.workers),
            events: self.events,
            duration: self.duration,
            seed,
            seed_from_clock,
            strategy: self.strategy,
            processing_concurrency: self.processing_concurrency,
        }
    }
}

impl Options {
    /// The command that replays this run.
    pub(crate) fn replay(&self) -> String {
        let duration = if self.duration.subsec_millis() == 0 {
            format!("{}s", self.duration.as_secs())
        } else {
            format!("{}ms", self.duration.as_millis())
        };
        format!(
            "cargo xtask chaos --store {} --workers {} --events {} --duration {duration} --seed {} --strategy {} --processing-concurrency {}",
            self.store.name(),
            self.workers,
            self.events,
            self.seed,
            self.strategy.name(),
            self.processing_concurrency
        )
    }
}

/// The product's duration forms (`orchestrator_core::parse_duration`), at least 10 s.
fn run_duration(text: &str) -> Result<Duration, String> {
    let duration = orchestrator_core::parse_duration(text).map_err(|e| e.to_string())?;
    if duration < Duration::from_secs(10) {
        return Err("must be at least 10s".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        chaos: ChaosArgs,
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        Cli::try_parse_from(std::iter::once("chaos").chain(args.iter().copied()))
            .map(|cli| cli.chaos.options())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_ci_invocations_parse() {
        let sqlite =
            parse(&["--store", "sqlite", "--duration", "30s", "--events", "4000", "--seed", "1"])
                .unwrap();
        assert_eq!(sqlite.store, Store::Sqlite);
        assert_eq!(sqlite.duration, Duration::from_secs(30));
        assert_eq!((sqlite.events, sqlite.seed, sqlite.workers), (4000, 1, 3));
        assert!(!sqlite.seed_from_clock);
        assert_eq!(sqlite.strategy, Strategy::Incremental);
        assert_eq!(
            sqlite.replay(),
            "cargo xtask chaos --store sqlite --workers 3 --events 4000 --duration 30s --seed 1 --strategy incremental --processing-concurrency 1"
        );
        let postgres =
            parse(&["--store", "postgresql", "--duration", "2m", "--strategy", "recreate"])
                .unwrap();
        assert_eq!(postgres.store, Store::Postgres);
        assert_eq!(postgres.duration, Duration::from_secs(120));
        assert_eq!(postgres.strategy, Strategy::Recreate);
        assert!(postgres.seed_from_clock);
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(parse(&[]).unwrap_err().contains("--store"));
        assert!(parse(&["--store", "mysql"]).unwrap_err().contains("mysql"));
        assert!(parse(&["--store", "sqlite", "--duration", "5s"]).unwrap_err().contains("10s"));
        assert!(parse(&["--store", "sqlite", "--duration", "4x"]).unwrap_err().contains("unit"));
        assert!(parse(&["--store", "sqlite", "--workers", "7"]).is_err());
        assert!(parse(&["--store", "sqlite", "--workers", "0"]).is_err());
        assert!(parse(&["--store", "sqlite", "--events", "3"]).is_err());
        assert!(parse(&["--store", "sqlite", "--strategy", "yolo"]).is_err());
        assert!(parse(&["--store", "sqlite", "--frobnicate", "1"]).is_err());
    }
}
