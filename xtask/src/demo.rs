//! `cargo xtask demo`, the README's first command.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::procs::{Procs, Signal, build_orchestrator, signal};

/// The README's first command: real `orchestrator` worker processes on an embedded SQLite file,
/// scaling 1 -> 3 -> 2 (one leaves by SIGTERM, one dies by kill -9 and a replacement starts), with
/// events appended throughout, then a check of `demo_audit`. Exits non-zero if the check fails.
pub(crate) fn demo() -> Result<()> {
    build_orchestrator()?;
    let demo = Procs::new("demo")?;
    let started = Instant::now();
    eprintln!("==> demo in {} (SQLite, no server)", demo.dir.display());
    demo.orchestrator(&["migrate"])?;
    demo.orchestrator(&["demo", "append", "--events", "2000", "--aggregates", "50"])?;

    let mut workers = vec![start_worker(&demo, "worker-1")?];
    wait_settled(&demo, &["worker-1"], "one worker processes everything")?;
    let mut appender = demo.spawn(
        &["demo", "append", "--events", "3000", "--aggregates", "50", "--rate", "300"],
        "append.log",
    )?;
    workers.push(start_worker(&demo, "worker-2")?);
    workers.push(start_worker(&demo, "worker-3")?);
    wait_settled(
        &demo,
        &["worker-1", "worker-2", "worker-3"],
        "two more workers joined: the slots split three ways",
    )?;

    eprintln!("--- worker-2 receives SIGTERM");
    signal(&workers[1], Signal::SIGTERM)?;
    let status = workers.remove(1).wait()?;
    eprintln!("    worker-2 exited ({status})");
    wait_settled(
        &demo,
        &["worker-1", "worker-3"],
        "worker-2 left gracefully: its slots were handed over at once",
    )?;

    eprintln!("--- worker-3 is killed with kill -9; worker-4 starts in its place");
    let mut killed = workers.remove(1);
    let killing = killed.kill();
    killed.wait()?;
    killing?;
    workers.push(start_worker(&demo, "worker-4")?);
    wait_settled(
        &demo,
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
    let verdict = wait_verified(&demo, Duration::from_secs(60));
    for worker in &workers {
        let _ = signal(worker, Signal::SIGTERM);
    }
    for mut worker in workers {
        let _ = worker.wait();
    }
    let verdict = verdict?;
    println!("{verdict}");
    eprintln!("==> demo finished in {:.0?}", started.elapsed());
    Ok(())
}

/// A worker with short timings so a crash is noticed within seconds.
pub(crate) fn start_worker(procs: &Procs, id: &str) -> Result<Child> {
    eprintln!("--- {id} starts");
    procs.spawn(
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
pub(crate) fn wait_settled(procs: &Procs, members: &[&str], what: &str) -> Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let status = procs.orchestrator(&["status"]).unwrap_or_default();
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

pub(crate) fn wait_verified(procs: &Procs, within: Duration) -> Result<String> {
    let started = Instant::now();
    loop {
        let output = procs.command(&["demo", "verify"]).output()?;
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
