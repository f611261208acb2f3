//! A fleet of `orchestrator demo worker` processes owned by one command (the Prometheus and
//! browser checks): each serves metrics and the status page on a free loopback port, so checks
//! never collide with a `cargo xtask cluster` or another run; every worker still running when the
//! fleet is dropped is stopped (SIGTERM, then SIGKILL).
//!
//! Also the small helpers these checks share: a free port, an HTTP GET, and installing a Debian
//! package when its command is missing.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procs::{Procs, Signal, signal};

/// One worker process.
pub(crate) struct Worker {
    pub(crate) id: String,
    /// Where it serves `/metrics`, `/healthz`, `/readyz` and the status page.
    pub(crate) addr: SocketAddr,
    child: Child,
}

/// Worker processes started by this command, oldest first.
pub(crate) struct Fleet<'a> {
    procs: &'a Procs,
    workers: Vec<Worker>,
    started: u32,
}

impl<'a> Fleet<'a> {
    pub(crate) fn new(procs: &'a Procs) -> Self {
        Self { procs, workers: Vec::new(), started: 0 }
    }

    pub(crate) fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Starts `worker-N` (N counting up from 1) with short timings, like `cargo xtask cluster`.
    pub(crate) fn start(&mut self) -> Result<&Worker> {
        self.started += 1;
        let id = format!("worker-{}", self.started);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = self.procs.spawn_demo_worker(&id, &addr.to_string())?;
        eprintln!("    {id}: pid {}, http://{addr}/", child.id());
        self.workers.push(Worker { id, addr, child });
        Ok(self.workers.last().expect("just pushed"))
    }

    /// Starts workers, or stops the newest ones gracefully (SIGTERM, waiting for each to exit),
    /// until `n` run.
    pub(crate) fn scale(&mut self, n: usize) -> Result<()> {
        while self.workers.len() < n {
            self.start()?;
        }
        while self.workers.len() > n {
            let mut worker = self.workers.pop().expect("more than n >= 0");
            eprintln!("    {}: SIGTERM (graceful leave)", worker.id);
            stop(&mut worker.child, Duration::from_secs(30));
        }
        Ok(())
    }

    /// Waits until every worker answers `/readyz` with 200 (registered, heartbeats acknowledged).
    pub(crate) fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for worker in &mut self.workers {
            loop {
                if let Ok(Some(status)) = worker.child.try_wait() {
                    bail!(
                        "{} exited ({status}); see {}",
                        worker.id,
                        self.procs.dir.join(format!("{}.log", worker.id)).display()
                    );
                }
                if get(&format!("http://{}/readyz", worker.addr)).is_ok_and(|(code, _)| code == 200)
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} was not ready within {within:?}", worker.id);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }
}

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        for worker in &self.workers {
            let _ = signal(&worker.child, Signal::SIGTERM);
        }
        for worker in &mut self.workers {
            stop(&mut worker.child, Duration::from_secs(15));
        }
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
pub(crate) fn stop(child: &mut Child, grace: Duration) {
    let _ = signal(child, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A loopback port nobody listens on now.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// One HTTP GET with `query` parameters: the status code and the body.
pub(crate) fn get_with(url: &str, query: &[(&str, &str)]) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(url);
    for (key, value) in query {
        request = request.query(*key, *value);
    }
    let mut response = request.call().with_context(|| format!("GET {url} failed"))?;
    let code = response.status().as_u16();
    let body = response.body_mut().read_to_string().with_context(|| format!("GET {url}: body"))?;
    Ok((code, body))
}

/// One HTTP GET: the status code and the body.
pub(crate) fn get(url: &str) -> Result<(u16, String)> {
    get_with(url, &[])
}

/// `path` (a Debian package's binary, like /usr/bin/prometheus), installing Debian's `packages`
/// with apt-get when it is missing (CI runs as root on Debian). Services the packages bring are
/// not started (policy-rc.d).
pub(crate) fn ensure_installed(path: &str, packages: &[&str]) -> Result<PathBuf> {
    let path = PathBuf::from(path);
    if path.is_file() {
        return Ok(path);
    }
    eprintln!("==> {} is missing: apt-get install {}", path.display(), packages.join(" "));
    let policy = PathBuf::from("/usr/sbin/policy-rc.d");
    // Keep packaged daemons (Debian's prometheus starts one) from starting: exit 101 = forbidden.
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(&policy, "#!/bin/sh\nexit 101\n")
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))
            })
            .context("cannot write /usr/sbin/policy-rc.d (not root?)")?;
    }
    let update = Command::new("apt-get").args(["update", "-qq"]).status();
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    if own_policy {
        let _ = std::fs::remove_file(&policy);
    }
    update.context("cannot run apt-get update")?;
    let install = install.context("cannot run apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed ({install})", packages.join(" "));
    }
    if !path.is_file() {
        bail!("{} is still missing after installing {}", path.display(), packages.join(" "));
    }
    Ok(path)
}
