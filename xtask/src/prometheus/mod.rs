//! `cargo xtask prometheus`: the shipped PromQL checked against a real Prometheus.
//!
//! Starts demo workers with metrics (SQLite by default, events flowing), runs Debian's Prometheus
//! (installed with apt-get when missing) on its own config and data directory under
//! `target/prometheus-check/`, scraping the workers every second with the relabelling the
//! Prometheus Operator applies for `deploy/kubernetes/servicemonitor.yaml` (so series carry
//! `namespace`, `pod`, `service`, `endpoint` and `job` as in a cluster), waits for a few scrapes,
//! and evaluates every expression of the dashboards, the prometheus-adapter rules and the docs
//! (see [`exprs`]) through the HTTP API. Each must return at least one series; the command lists
//! those that do not and fails.

mod exprs;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::fleet::{Fleet, ensure_installed, free_port, get, get_with, stop};
use crate::procs::{Procs, build_orchestrator};
use crate::project_root;
use exprs::{Expr, Scene};

/// The namespace the scrape config gives the workers, as a Kubernetes cluster would.
const NAMESPACE: &str = "projections";
const REPLICA_SET: &str = "main-projections";
/// Scrapes every series must have before the expressions are evaluated (at 1 s intervals), so
/// every `rate()` window holds several samples.
const SCRAPES: u64 = 8;

#[derive(Debug, Args)]
pub(crate) struct PrometheusArgs {
    /// Worker processes to scrape.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    workers: u32,
    /// The workers' database (default: a SQLite file in target/prometheus-check).
    #[arg(long)]
    database_url: Option<String>,
    /// The Prometheus binary (default: Debian's /usr/bin/prometheus, installed when missing).
    #[arg(long, env = "PROMETHEUS")]
    prometheus: Option<PathBuf>,
}

/// Where the expressions live: every dashboard, every manifest (adapter rules, PrometheusRules)
/// and every document.
fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (dir, extensions) in [
        ("deploy/grafana", &["json"][..]),
        ("deploy/kubernetes", &["yaml", "yml"][..]),
        ("docs", &["md"][..]),
    ] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .with_context(|| format!("cannot list {dir}"))?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e))
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    files.push(root.join("README.md"));
    Ok(files)
}

pub(crate) fn prometheus(args: PrometheusArgs) -> Result<()> {
    let started = Instant::now();
    let binary = match args.prometheus {
        Some(path) => path,
        None => ensure_installed("/usr/bin/prometheus", &["prometheus"])?,
    };
    build_orchestrator()?;
    let mut procs = Procs::new("prometheus-check")?;
    procs.database_url = args.database_url;
    eprintln!("==> Prometheus check in {}", procs.dir.display());
    procs.orchestrator(&["migrate"])?;
    procs.orchestrator(&["demo", "append", "--events", "2000", "--aggregates", "40"])?;
    let mut fleet = Fleet::new(&procs);
    for _ in 0..args.workers {
        fleet.start()?;
        // Apart, so each joins in a generation of its own and every worker coordinates.
        std::thread::sleep(Duration::from_millis(700));
    }
    fleet.wait_ready(Duration::from_secs(30))?;
    // Events keep coming while Prometheus scrapes, so rates and lag are not all zero.
    let mut appender = procs.spawn(
        &["demo", "append", "--events", "4000", "--aggregates", "40", "--rate", "100"],
        "append.log",
    )?;

    let pods: Vec<String> = fleet.workers().iter().map(|w| w.id.clone()).collect();
    let config = scrape_config(&fleet);
    let config_file = procs.dir.join("prometheus.yml");
    std::fs::write(&config_file, config)?;
    let port = free_port()?;
    let mut server = start_prometheus(&binary, &procs.dir, &config_file, port)?;
    let result = check(&format!("http://127.0.0.1:{port}"), &pods, args.workers);
    stop(&mut server, Duration::from_secs(10));
    stop(&mut appender, Duration::from_secs(5));
    drop(fleet);
    let checked = result?;
    eprintln!(
        "==> Prometheus check passed: {checked} PromQL expressions return series ({:.0?})",
        started.elapsed()
    );
    Ok(())
}

/// One scrape job per the ServiceMonitor: the targets carry the Kubernetes discovery labels the
/// operator's relabelling turns into `namespace`, `service`, `pod`, `container`, `endpoint` and
/// `job` (the Service's name).
fn scrape_config(fleet: &Fleet<'_>) -> String {
    let mut targets = String::new();
    for worker in fleet.workers() {
        let _ = write!(
            targets,
            r#"
      - targets: ["{addr}"]
        labels:
          __meta_kubernetes_namespace: {NAMESPACE}
          __meta_kubernetes_service_name: orchestrator-worker
          __meta_kubernetes_pod_name: {pod}
          __meta_kubernetes_pod_container_name: worker"#,
            addr = worker.addr,
            pod = worker.id,
        );
    }
    format!(
        r#"# Written by cargo xtask prometheus: the demo workers scraped as deploy/kubernetes/servicemonitor.yaml would be.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: servicemonitor/{NAMESPACE}/orchestrator-worker/0
    metrics_path: /metrics
    static_configs:{targets}
    relabel_configs:
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_service_name]
        target_label: service
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_container_name]
        target_label: container
      - source_labels: [__meta_kubernetes_service_name]
        target_label: job
      - target_label: endpoint
        replacement: metrics
"#
    )
}

fn start_prometheus(binary: &Path, dir: &Path, config: &Path, port: u16) -> Result<Child> {
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let data = dir.join("prometheus-data");
    let mut child = std::process::Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--storage.tsdb.retention.time=1h")
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("Prometheus exited ({status}); see {}", dir.join("prometheus.log").display());
        }
        if get(&format!("http://127.0.0.1:{port}/-/ready")).is_ok_and(|(code, _)| code == 200) {
            break;
        }
        if Instant::now() > deadline {
            stop(&mut child, Duration::from_secs(5));
            bail!("Prometheus was not ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let version = get(&format!("http://127.0.0.1:{port}/api/v1/status/buildinfo"))
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .and_then(|v| v["data"]["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    eprintln!("    Prometheus {version} on http://127.0.0.1:{port}/ (pid {})", child.id());
    Ok(child)
}

/// How many series an instant query returns, or Prometheus's error.
fn series(base: &str, query: &str) -> Result<usize> {
    let (code, body) = get_with(&format!("{base}/api/v1/query"), &[("query", query)])?;
    let answer: Value = serde_json::from_str(&body)
        .with_context(|| format!("HTTP {code}, not JSON: {}", body.trim()))?;
    if answer["status"] != "success" {
        bail!("{}: {}", answer["errorType"].as_str().unwrap_or("error"), answer["error"]);
    }
    Ok(match answer["data"]["resultType"].as_str() {
        Some("vector" | "matrix") => answer["data"]["result"].as_array().map_or(0, Vec::len),
        // A scalar or a string is one value.
        _ => 1,
    })
}

/// Waits for the scrapes, then evaluates every expression; the count checked.
fn check(base: &str, pods: &[String], workers: u32) -> Result<usize> {
    let up = "up{job=\"orchestrator-worker\"}";
    let enough = format!("min(count_over_time({up}[5m])) >= {SCRAPES} and sum({up}) == {workers}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while series(base, &enough).unwrap_or(0) == 0 {
        if Instant::now() > deadline {
            bail!("Prometheus did not get {SCRAPES} scrapes of all {workers} workers within 60 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("    {workers} workers scraped {SCRAPES}+ times");

    let root = project_root();
    let scene = Scene {
        replica_set: REPLICA_SET.to_owned(),
        namespace: NAMESPACE.to_owned(),
        pods: pods.to_vec(),
        rate_interval: "1m".to_owned(),
    };
    let mut expressions: Vec<Expr> = Vec::new();
    let mut per_file = Vec::new();
    for file in sources(&root)? {
        let found = exprs::from_file(&file, &scene)?;
        let relative = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
        if !found.is_empty() {
            per_file.push(format!("{} in {relative}", found.len()));
        }
        expressions.extend(found.into_iter().map(|mut e| {
            e.origin = e.origin.replace(&format!("{}/", root.display()), "");
            e
        }));
    }
    if expressions.is_empty() {
        bail!("found no PromQL expressions to check");
    }

    // Expressions over windows fill as scrapes accumulate: retry the empty ones for a while
    // (not those Prometheus refused: they will not parse any better).
    let mut results: Vec<Result<usize>> = expressions.iter().map(|_| Ok(0)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (expr, result) in expressions.iter().zip(results.iter_mut()) {
            if matches!(result, Ok(0)) {
                *result = series(base, &expr.query);
            }
        }
        let pending = results.iter().filter(|r| matches!(r, Ok(0))).count();
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        eprintln!("    {pending} expressions return nothing yet; waiting for more scrapes");
        std::thread::sleep(Duration::from_secs(3));
    }

    let mut failed = Vec::new();
    for (expr, result) in expressions.iter().zip(&results) {
        match result {
            Ok(n) if *n > 0 => eprintln!("    ok {n:>3} series  {}", expr.origin),
            Ok(_) => failed.push(format!(
                "{}\n        {}\n        returns no series",
                expr.origin, expr.query
            )),
            Err(err) => {
                failed.push(format!("{}\n        {}\n        {err:#}", expr.origin, expr.query))
            }
        }
    }
    eprintln!("    checked {} PromQL expressions: {}", expressions.len(), per_file.join(", "));
    if !failed.is_empty() {
        bail!(
            "{} of {} PromQL expressions return nothing:\n    {}",
            failed.len(),
            expressions.len(),
            failed.join("\n    ")
        );
    }
    Ok(expressions.len())
}
