//! Running `orchestrator` commands and worker processes in a directory under target/.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
pub(crate) use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::{cargo, project_root, run_step};

/// Builds the release `orchestrator` binary the process-level commands run.
pub(crate) fn build_orchestrator() -> Result<()> {
    let mut build = cargo();
    build.args(["build", "--quiet", "--release", "-p", "orchestrator-cli"]);
    run_step("build the orchestrator binary", build)
}

/// Runs `orchestrator` commands and processes in one directory under target/.
pub(crate) struct Procs {
    pub(crate) dir: PathBuf,
    binary: PathBuf,
    /// `None`: the embedded default, `orchestrator.db` in `dir`.
    pub(crate) database_url: Option<String>,
    /// `LOG_FORMAT` of the processes (`None`: as in this environment).
    pub(crate) log_format: Option<&'static str>,
}

impl Procs {
    /// A fresh directory `target/<name>` (emptied first).
    pub(crate) fn new(name: &str) -> Result<Self> {
        let procs = Self::existing(name);
        let _ = std::fs::remove_dir_all(&procs.dir);
        std::fs::create_dir_all(&procs.dir)
            .with_context(|| format!("cannot create {}", procs.dir.display()))?;
        Ok(procs)
    }

    /// The directory `target/<name>` as a previous command left it.
    pub(crate) fn existing(name: &str) -> Self {
        Self {
            dir: project_root().join("target").join(name),
            binary: project_root().join("target/release/orchestrator"),
            database_url: None,
            log_format: None,
        }
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(args).current_dir(&self.dir).env("RUST_LOG", "info");
        match &self.database_url {
            Some(url) => command.env("DATABASE_URL", url),
            None => command.env_remove("DATABASE_URL"),
        };
        if let Some(format) = self.log_format {
            command.env("LOG_FORMAT", format);
        }
        command
    }

    /// Starts a demo worker named `id` serving metrics on `metrics`, logging to `<id>.log` in
    /// the work folder, with the short timings of a local cluster (1 s heartbeats, stale after
    /// 5 s, joins gathered for 500 ms).
    pub(crate) fn spawn_demo_worker(&self, id: &str, metrics: &str) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(format!("{id}.log")))?;
        self.command(&[
            "demo",
            "worker",
            "--worker-id",
            id,
            "--metrics-addr",
            metrics,
            "--heartbeat-interval",
            "1s",
            "--stale-worker-timeout",
            "5s",
            "--registration-wait",
            "500ms",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {id}"))
    }

    /// Runs a command to completion, failing with its stderr if it fails.
    pub(crate) fn orchestrator(&self, args: &[&str]) -> Result<String> {
        let output = self.command(args).output().context("cannot run orchestrator")?;
        if !output.status.success() {
            bail!(
                "orchestrator {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    pub(crate) fn spawn(&self, args: &[&str], log: &str) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(log))?;
        Ok(self.command(args).stdout(Stdio::null()).stderr(log).spawn()?)
    }
}

/// Sends `signal` to a child process (std's `Child` can only send SIGKILL).
pub(crate) fn signal(child: &Child, signal: Signal) -> Result<()> {
    signal_pid(child.id(), signal)
}

/// Sends `signal` to process `pid`.
pub(crate) fn signal_pid(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
    nix::sys::signal::kill(Pid::from_raw(raw), signal)
        .with_context(|| format!("cannot send {signal} to pid {pid}"))
}

/// Whether process `pid` exists (signal 0: nothing is sent, the kernel only checks).
pub(crate) fn exists(pid: u32) -> bool {
    i32::try_from(pid)
        .is_ok_and(|raw| raw > 0 && nix::sys::signal::kill(Pid::from_raw(raw), None).is_ok())
}
