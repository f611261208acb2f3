//! `cargo xtask cluster up|scale N|status|down`: a local cluster of `orchestrator demo worker`
//! processes that outlives the command, against SQLite (default) or PostgreSQL.
//!
//! State lives in `target/cluster/`: `cluster.env` (the database URL), one `worker-N.pid` and
//! `worker-N.log` per worker. Worker N serves metrics on 127.0.0.1:(9100 + N).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::procs::{Procs, Signal, build_orchestrator, exists, signal_pid};

const METRICS_BASE_PORT: u16 = 9100;
/// Most workers `up` and `scale` start (each gets a metrics port of its own).
const MAX_WORKERS: u32 = 100;

#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Migrate, append demo events and start workers.
    Up {
        /// Workers to start.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=MAX_WORKERS as i64))]
        workers: u32,
        /// postgres://... or sqlite:FILE (default: target/cluster/orchestrator.db).
        #[arg(long)]
        database_url: Option<String>,
        /// Demo events appended before the workers start.
        #[arg(long, default_value_t = 1000)]
        events: u64,
    },
    /// Start or stop (SIGTERM, newest first) workers until N run.
    Scale {
        #[arg(value_parser = clap::value_parser!(u32).range(0..=MAX_WORKERS as i64))]
        n: u32,
    },
    /// The workers' processes and `orchestrator status`.
    Status,
    /// SIGTERM every worker; the data stays.
    Down,
}

pub(crate) fn cluster(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCommand::Up { workers, database_url, events } => up(workers, database_url, events),
        ClusterCommand::Scale { n } => {
            let procs = load()?;
            scale(&procs, n)?;
            status(&procs)
        }
        ClusterCommand::Status => status(&load()?),
        ClusterCommand::Down => down(&load()?),
    }
}

fn up(workers: u32, database_url: Option<String>, events: u64) -> Result<()> {
    if let Ok(existing) = load()
        && !running(&existing).is_empty()
    {
        bail!("a cluster is already up (see `cargo xtask cluster status`); `down` it first");
    }
    build_orchestrator()?;
    let mut procs = Procs::new("cluster")?;
    procs.database_url = database_url;
    std::fs::write(procs.dir.join("cluster.env"), procs.database_url.clone().unwrap_or_default())?;
    procs.orchestrator(&["migrate"])?;
    if events > 0 {
        let events = events.to_string();
        println!("{}", procs.orchestrator(&["demo", "append", "--events", &events])?);
    }
    scale(&procs, workers)?;
    status(&procs)
}

/// The cluster `up` created.
fn load() -> Result<Procs> {
    let mut procs = Procs::existing("cluster");
    let url = std::fs::read_to_string(procs.dir.join("cluster.env"))
        .context("no cluster here: start one with `cargo xtask cluster up`")?;
    procs.database_url = Some(url.trim().to_owned()).filter(|u| !u.is_empty());
    Ok(procs)
}

fn pid_file(procs: &Procs, n: u32) -> PathBuf {
    procs.dir.join(format!("worker-{n}.pid"))
}

/// Workers whose process is alive, as (number, pid), by number.
fn running(procs: &Procs) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&procs.dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix("worker-").and_then(|s| s.strip_suffix(".pid")) else {
            continue;
        };
        let (Ok(n), Some(pid)) = (
            n.parse::<u32>(),
            std::fs::read_to_string(entry.path()).ok().and_then(|p| p.trim().parse::<u32>().ok()),
        ) else {
            continue;
        };
        if alive(pid) {
            found.push((n, pid));
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    found.sort_unstable();
    found
}

/// Whether process `pid` still exists. The workers are not this command's children (the `up`
/// that started them has exited), so their exit is reaped by init and a gone worker's pid no
/// longer exists; a pid file is deleted as soon as its process is seen gone.
fn alive(pid: u32) -> bool {
    exists(pid)
}

fn scale(procs: &Procs, target: u32) -> Result<()> {
    let current = running(procs);
    if (current.len() as u32) < target {
        let first = current.last().map_or(1, |(n, _)| n + 1);
        for n in first..first + (target - current.len() as u32) {
            start(procs, n)?;
        }
    } else {
        // Stop the newest first, gracefully.
        let stopping: Vec<_> = current.iter().rev().take(current.len() - target as usize).collect();
        for (n, pid) in &stopping {
            println!("worker-{n}: SIGTERM (graceful leave)");
            kill(Signal::SIGTERM, *pid);
        }
        wait_gone(
            &stopping.iter().map(|(_, pid)| *pid).collect::<Vec<_>>(),
            Duration::from_secs(30),
        );
    }
    Ok(())
}

fn start(procs: &Procs, n: u32) -> Result<()> {
    let id = format!("worker-{n}");
    let port = METRICS_BASE_PORT + n as u16;
    let metrics = format!("127.0.0.1:{port}");
    let child = procs.spawn_demo_worker(&id, &metrics)?;
    std::fs::write(pid_file(procs, n), child.id().to_string())?;
    println!("{id}: started (pid {}, metrics http://{metrics}/metrics)", child.id());
    Ok(())
}

fn kill(signal: Signal, pid: u32) {
    if let Err(err) = signal_pid(pid, signal) {
        println!("{err:#}");
    }
}

fn wait_gone(pids: &[u32], within: Duration) {
    let started = Instant::now();
    while pids.iter().any(|pid| alive(*pid)) && started.elapsed() < within {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.iter().filter(|pid| alive(**pid)) {
        println!("pid {pid} did not leave within {within:?}: SIGKILL");
        kill(Signal::SIGKILL, *pid);
    }
}

fn status(procs: &Procs) -> Result<()> {
    // Give workers just started a moment to register before showing the picture.
    std::thread::sleep(Duration::from_millis(1500));
    let database = procs.database_url.as_deref().unwrap_or("sqlite:target/cluster/orchestrator.db");
    println!("database: {database}");
    for (n, pid) in running(procs) {
        println!(
            "worker-{n}: pid {pid}, log target/cluster/worker-{n}.log, metrics http://127.0.0.1:{}/metrics",
            METRICS_BASE_PORT + n as u16
        );
    }
    match procs.orchestrator(&["status"]) {
        Ok(table) => println!("{table}"),
        Err(err) => println!("{err:#}"),
    }
    Ok(())
}

fn down(procs: &Procs) -> Result<()> {
    let workers = running(procs);
    for (n, pid) in &workers {
        println!("worker-{n}: SIGTERM");
        kill(Signal::SIGTERM, *pid);
    }
    wait_gone(&workers.iter().map(|(_, pid)| *pid).collect::<Vec<_>>(), Duration::from_secs(30));
    println!("cluster down ({} workers stopped); data kept in target/cluster", workers.len());
    Ok(())
}
