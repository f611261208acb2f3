//! `cargo xtask example --store sqlite|postgres [--diesel]`: the example application run as a user
//! would, with two worker processes, concurrent commands, one worker stopped by SIGTERM midway, and
//! the check that every balance equals the sum of its account's events. With `--diesel` the second
//! worker runs the read model written with diesel-async (built with the example's `diesel`
//! feature), sharing the projection with the first (sqlx) and taking over its slots.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::procs::{Signal, signal};
use crate::{cargo, project_root, run_step};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Store {
    Sqlite,
    Postgres,
}

#[derive(Debug, Args)]
pub(crate) struct ExampleArgs {
    /// Which store the example runs on.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: Store,
    /// PostgreSQL server (a database of its own is created on it).
    #[arg(
        long,
        env = "ORCH_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Worker-b runs the read model written with diesel-async (needs `--store postgres`).
    #[arg(long)]
    diesel: bool,
}

pub(crate) fn example(args: ExampleArgs) -> Result<()> {
    let mut build = cargo();
    build.args(["build", "--quiet", "-p", "bank-ledger"]);
    if args.diesel {
        if args.store != Store::Postgres {
            bail!("--diesel needs --store postgres");
        }
        build.args(["--features", "diesel"]);
    }
    run_step("build the example", build)?;
    let dir = project_root().join("target/example");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = match args.store {
        Store::Sqlite => "sqlite:ledger.db".to_owned(),
        Store::Postgres => {
            let mut url = url::Url::parse(&args.postgres_url).context("invalid --postgres-url")?;
            let admin = url.to_string();
            psql(&admin, "DROP DATABASE IF EXISTS orch_example WITH (FORCE)")?;
            psql(&admin, "CREATE DATABASE orch_example")?;
            url.set_path("/orch_example");
            url.to_string()
        }
    };
    let ledger = |args: &[&str]| {
        let mut command = Command::new(project_root().join("target/debug/bank-ledger"));
        command
            .args(args)
            .current_dir(&dir)
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "info,sqlx=warn")
            .env("HEARTBEAT_INTERVAL", "500ms")
            .env("STALE_WORKER_TIMEOUT", "3s");
        command
    };
    let run = |args: &[&str]| -> Result<String> {
        let output = ledger(args).output().context("cannot run bank-ledger")?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() {
            bail!(
                "bank-ledger {} failed: {stdout} {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(stdout)
    };
    let spawn = |args: &[&str], log: &str| -> Result<Child> {
        let log = std::fs::File::create(dir.join(log))?;
        Ok(ledger(args).stdout(log.try_clone()?).stderr(log).spawn()?)
    };

    println!(
        "==> bank-ledger on {:?}: migrate, two workers, commands, SIGTERM one midway, check",
        args.store
    );
    run(&["migrate"])?;
    let mut a = spawn(&["worker", "--worker-id", "worker-a"], "worker-a.log")?;
    let mut b_args = vec!["worker", "--worker-id", "worker-b", "--metrics-addr", "127.0.0.1:0"];
    if args.diesel {
        b_args.push("--diesel");
        println!("worker-b runs the read model written with diesel-async; worker-a the sqlx one");
    }
    let mut b = spawn(&b_args, "worker-b.log")?;
    let mut simulate = spawn(
        &["simulate", "--accounts", "40", "--operations", "1500", "--concurrency", "4"],
        "simulate.log",
    )?;
    std::thread::sleep(Duration::from_secs(3));
    signal(&a, Signal::SIGTERM)?;
    let left =
        wait(&mut a, Duration::from_secs(30)).context("worker-a did not leave after SIGTERM")?;
    if !left {
        bail!(
            "worker-a exited with an error after SIGTERM: see {}",
            dir.join("worker-a.log").display()
        );
    }
    println!("worker-a left by SIGTERM; worker-b takes its slots");
    if !wait(&mut simulate, Duration::from_secs(300))? {
        bail!("the simulation failed: see {}", dir.join("simulate.log").display());
    }
    let summary = std::fs::read_to_string(dir.join("simulate.log"))?;
    if let Some(line) = summary.lines().rev().find(|l| l.contains("accounts opened")) {
        println!("{line}");
    }
    let checked = run(&["check", "--accounts", "40", "--timeout", "60s"]);
    signal(&b, Signal::SIGTERM)?;
    let b_left = wait(&mut b, Duration::from_secs(30))?;
    println!("{}", checked?);
    if !b_left {
        bail!("worker-b exited with an error: see {}", dir.join("worker-b.log").display());
    }
    if args.diesel
        && !std::fs::read_to_string(dir.join("worker-b.log"))?.contains("runs on diesel-async")
    {
        bail!(
            "worker-b did not run the diesel read model: see {}",
            dir.join("worker-b.log").display()
        );
    }
    Ok(())
}

/// Waits for `child` to exit: whether it succeeded; an error after `within`.
fn wait(child: &mut Child, within: Duration) -> Result<bool> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process {} still running after {within:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn psql(url: &str, sql: &str) -> Result<()> {
    let output =
        Command::new("psql").args([url, "-q", "-c", sql]).output().context("cannot run psql")?;
    if !output.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
