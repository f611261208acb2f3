//! `cargo xtask browser`: the status page checked in a real browser.
//!
//! Starts three demo workers on SQLite and `orchestrator status --serve`, then runs
//! `tests/browser/check.mjs` (playwright-core driving Debian's Chromium headless; the package and
//! the browser are installed when missing). The script checks the slot map against
//! `orchestrator status --json`, asks for the cluster to be scaled to two workers (a `SCALE 2` line;
//! this command answers `scaled` once the worker has left) and checks that the open page redrew
//! by itself, then loads the page on a worker's metrics address and checks how moving slots and
//! stopped projections are drawn. Screenshots are left in `target/browser-check/` (a CI artifact).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::fleet::{Fleet, ensure_installed, stop};
use crate::procs::{Procs, build_orchestrator};
use crate::{project_root, run_step};

#[derive(Debug, Args)]
pub(crate) struct BrowserArgs {
    /// The Chromium binary (default: Debian's /usr/bin/chromium, installed when missing).
    #[arg(long, env = "CHROMIUM")]
    chromium: Option<PathBuf>,
}

pub(crate) fn browser(args: BrowserArgs) -> Result<()> {
    let started = Instant::now();
    let chromium = match args.chromium {
        Some(path) => path,
        None => ensure_installed("/usr/bin/chromium", &["chromium", "chromium-driver"])?,
    };
    let scripts = project_root().join("tests/browser");
    if !scripts.join("node_modules/playwright-core").is_dir() {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&scripts);
        run_step("npm ci (playwright-core, for tests/browser)", npm)?;
    }
    build_orchestrator()?;
    let procs = Procs::new("browser-check")?;
    eprintln!("==> browser check in {}", procs.dir.display());
    procs.orchestrator(&["migrate"])?;
    procs.orchestrator(&["demo", "append", "--events", "2000", "--aggregates", "40"])?;
    let mut fleet = Fleet::new(&procs);
    for _ in 0..3 {
        fleet.start()?;
        // Apart, so the page has a few generations of history to show.
        std::thread::sleep(Duration::from_millis(1500));
    }
    fleet.wait_ready(Duration::from_secs(30))?;

    // The page from the database, on a port of its choosing (it prints the address).
    let mut serve = procs
        .command(&["status", "--serve", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(procs.dir.join("status-serve.log"))?)
        .spawn()
        .context("cannot start orchestrator status --serve")?;
    let mut first = String::new();
    BufReader::new(serve.stdout.take().context("no stdout")?).read_line(&mut first)?;
    let Some(page_url) = first.split_whitespace().last().filter(|u| u.starts_with("http://"))
    else {
        stop(&mut serve, Duration::from_secs(5));
        bail!("orchestrator status --serve printed {first:?}, not its address");
    };
    eprintln!("    status page: {page_url}");
    let worker_url = format!("http://{}/", fleet.workers()[0].addr);

    let shots = project_root().join("target/browser-check");
    let mut node = Command::new("node");
    node.arg(scripts.join("check.mjs"))
        .current_dir(&scripts)
        .env("PAGE_URL", page_url)
        .env("WORKER_PAGE_URL", &worker_url)
        .env("ORCHESTRATOR", project_root().join("target/release/orchestrator"))
        .env("STATUS_CWD", &procs.dir)
        .env("CHROMIUM", &chromium)
        .env("SHOTS", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    match &procs.database_url {
        Some(url) => node.env("DATABASE_URL", url),
        None => node.env_remove("DATABASE_URL"),
    };
    let mut child = node.spawn().context("cannot run node (Node.js 20 or later is needed)")?;
    let mut answers = child.stdin.take().context("no stdin")?;
    let lines = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut outcome = Ok(());
    for line in lines.lines() {
        let line = line?;
        match line.strip_prefix("SCALE ").map(str::parse::<usize>) {
            Some(Ok(n)) => {
                eprintln!("    scaling to {n} workers (the page stays open)");
                let answer = match fleet.scale(n) {
                    Ok(()) => "scaled".to_owned(),
                    Err(err) => {
                        outcome = Err(err);
                        "failed".to_owned()
                    }
                };
                writeln!(answers, "{answer}")?;
            }
            _ => eprintln!("{line}"),
        }
    }
    let status = child.wait()?;
    stop(&mut serve, Duration::from_secs(5));
    drop(fleet);
    outcome?;
    if !status.success() {
        bail!("the browser check failed ({status}); screenshots in {}", shots.display());
    }
    eprintln!(
        "==> browser check passed ({:.0?}); screenshots: {}/status-page-{{3-workers,2-workers,moving}}.png",
        started.elapsed(),
        shots.display()
    );
    Ok(())
}
