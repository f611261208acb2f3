//! The `orchestrator` command refuses bad input with one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orch-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn orchestrator(dir: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REPLICA_SET")
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

/// Exits with `code` and exactly one line on stderr containing `needle`.
fn refuses(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line, got: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_flags_and_commands() {
    let dir = temp_dir("flags");
    refuses(&orchestrator(&dir, &["migrate", "--frobnicate"]), 2, "--frobnicate");
    refuses(&orchestrator(&dir, &["teleport"]), 2, "teleport");
    refuses(&orchestrator(&dir, &["demo", "append"]), 2, "--events");
}

#[test]
fn malformed_and_unreachable_databases() {
    let dir = temp_dir("urls");
    refuses(
        &orchestrator(&dir, &["--database-url", "mysql://localhost/db", "migrate"]),
        1,
        "unknown database URL scheme \"mysql\"",
    );
    refuses(
        &orchestrator(&dir, &["--database-url", "postgres://user@host:notaport/db", "migrate"]),
        1,
        "cannot connect to PostgreSQL",
    );
    refuses(
        &orchestrator(
            &dir,
            &["--database-url", "postgres://postgres@127.0.0.1:1/postgres", "migrate"],
        ),
        1,
        "cannot connect to PostgreSQL",
    );
    refuses(
        &orchestrator(&dir, &["--database-url", "sqlite:/nonexistent-dir/x/o.db", "migrate"]),
        1,
        "cannot open the SQLite database",
    );
}

#[test]
fn bad_settings_name_the_setting() {
    let dir = temp_dir("settings");
    let worker = |extra: &[&str]| {
        let mut args = vec!["demo", "worker"];
        args.extend_from_slice(extra);
        orchestrator(&dir, &args)
    };
    refuses(&worker(&["--replica-set", "main projections"]), 1, "invalid --replica-set");
    refuses(&worker(&["--heartbeat-interval", "0s"]), 1, "invalid --heartbeat-interval");
    refuses(&worker(&["--heartbeat-interval", "-5s"]), 1, "invalid --heartbeat-interval");
    refuses(&worker(&["--stale-worker-timeout", "5s"]), 1, "invalid stale_worker_timeout");
    refuses(&worker(&["--batch-size", "0"]), 1, "invalid batch_size");
    refuses(&worker(&["--strategy", "yolo"]), 1, "invalid --strategy");
    refuses(&worker(&["--handler-max-attempts", "0"]), 1, "invalid handler_max_attempts");
    refuses(&worker(&["--processing-concurrency", "0"]), 1, "invalid processing_concurrency");
    refuses(&worker(&["--handler-timeout", "90s"]), 1, "invalid handler_timeout");
    refuses(&worker(&["--database-pool-size", "2"]), 1, "invalid DATABASE_POOL_SIZE");
    refuses(&worker(&["--shared-read-buffer-mb", "0"]), 1, "invalid --shared-read-buffer-mb");
    // PostgreSQL ends a transaction left idle for 60 s: a handler timeout must end first. Checked
    // before connecting.
    refuses(
        &worker(&[
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
            "--coordination-timeout",
            "2m",
            "--handler-timeout",
            "60s",
        ]),
        1,
        "invalid handler_timeout: must be shorter than the store's idle-in-transaction limit (60s)",
    );
    refuses(&orchestrator(&dir, &["--slots", "100", "migrate"]), 1, "invalid --slots");
    refuses(
        &orchestrator(&dir, &["--table-prefix", "x; drop", "migrate"]),
        1,
        "invalid --table-prefix",
    );
    refuses(&orchestrator(&dir, &["demo", "append", "--events", "0"]), 1, "at least 1");
}

#[test]
fn a_different_slot_count_than_the_store_is_refused() {
    let dir = temp_dir("slots");
    let migrated = orchestrator(&dir, &["migrate"]);
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    refuses(&orchestrator(&dir, &["--slots", "128", "demo", "worker"]), 1, "256 slots");
}

#[test]
fn hold_open_needs_postgres() {
    let dir = temp_dir("hold");
    refuses(
        &orchestrator(&dir, &["demo", "append", "--events", "5", "--hold-open", "50"]),
        1,
        "--hold-open needs PostgreSQL",
    );
}

#[test]
fn migrate_and_append_on_the_embedded_default() {
    let dir = temp_dir("default");
    for _ in 0..2 {
        let out = orchestrator(&dir, &["migrate"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = orchestrator(
        &dir,
        &["demo", "append", "--events", "25", "--aggregates", "4", "--concurrency", "2"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "appended 25 events over 4 aggregates");
    assert!(dir.join("orchestrator.db").exists());
}

#[test]
fn bad_metrics_addresses() {
    let dir = temp_dir("metrics-addr");
    refuses(
        &orchestrator(&dir, &["demo", "worker", "--metrics-addr", "nine-thousand"]),
        1,
        "invalid --metrics-addr \"nine-thousand\"",
    );
    // A port already taken: the worker says so and exits instead of running without metrics.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    refuses(
        &orchestrator(&dir, &["demo", "worker", "--metrics-addr", &addr]),
        1,
        &format!("cannot serve metrics on {addr}"),
    );
}

#[test]
fn projection_reset_refuses_while_workers_run_and_resets_when_stopped() {
    let dir = temp_dir("reset");
    refuses(&orchestrator(&dir, &["projection", "reset"]), 2, "<NAME>");
    refuses(&orchestrator(&dir, &["projection", "reset", " "]), 1, "projection name is empty");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["demo", "worker", "--worker-id", "w1", "--heartbeat-interval", "200ms"])
        .args(["--stale-worker-timeout", "2s"])
        .current_dir(&dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap();
    let appended = orchestrator(&dir, &["demo", "append", "--events", "20"]);
    assert!(appended.status.success(), "{appended:?}");
    // Wait for the worker to register and process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = orchestrator(&dir, &["status", "--json"]);
        let out = String::from_utf8_lossy(&status.stdout).to_string();
        if out.contains("\"name\":\"demo_audit\",\"lag_events\":0") && out.contains("\"id\":\"w1\"")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "worker never caught up: {out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    refuses(
        &orchestrator(&dir, &["projection", "reset", "demo_audit"]),
        1,
        "running worker(s) (w1)",
    );
    // SIGTERM: the worker leaves gracefully, so the reset may go ahead at once.
    terminate(&mut worker);
    let reset = orchestrator(&dir, &["projection", "reset", "demo_audit"]);
    assert!(reset.status.success(), "{reset:?}");
    let status = orchestrator(&dir, &["status", "--json"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(out.contains("\"name\":\"demo_audit_batch\",\"lag_events\":0"), "{out}");
    assert!(!out.contains("\"name\":\"demo_audit\","), "demo_audit has no checkpoints left: {out}");
    let verify = orchestrator(&dir, &["demo", "verify", "--json"]);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        report.contains("\"name\":\"demo_audit\",\"applied\":0"),
        "the hook cleared it: {report}"
    );

    // Remove: unknown names are refused, known ones disappear from status.
    refuses(
        &orchestrator(&dir, &["projection", "remove", "nope"]),
        1,
        "has no projection \"nope\"",
    );
    refuses(&orchestrator(&dir, &["projection", "resume", "demo_audit"]), 1, "is not stopped");
    let removed = orchestrator(&dir, &["projection", "remove", "demo_audit_batch"]);
    assert!(removed.status.success(), "{removed:?}");
    let status = orchestrator(&dir, &["status", "--json"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(!out.contains("demo_audit_batch"), "removed: {out}");
}

/// SIGTERM, then waits: the worker must leave gracefully.
fn terminate(worker: &mut Child) {
    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).unwrap();
    assert!(worker.wait().unwrap().success());
}

/// Runs a demo worker with `LOG_FORMAT` = `format` (unset when `None`), its stderr in a file (not
/// a terminal), until it logged `needle`; returns the log.
fn worker_log(dir: &Path, format: Option<&str>, needle: &str) -> String {
    let log = dir.join(format!("worker-{}.log", format.unwrap_or("default")));
    let mut command = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    command
        .args(["demo", "worker", "--worker-id", "w1", "--heartbeat-interval", "200ms"])
        .args(["--stale-worker-timeout", "2s", "--registration-wait", "100ms"])
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("LOG_FORMAT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(format) = format {
        command.env("LOG_FORMAT", format);
    }
    let mut worker = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            break text;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in the log: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    terminate(&mut worker);
    text
}

#[test]
fn logs_have_no_colours_off_a_terminal_and_json_lines_on_request() {
    let dir = temp_dir("logs");
    let plain = worker_log(&dir, None, "Worker registered");
    assert!(!plain.contains("\x1b["), "colour codes in a log file: {plain}");
    let text = worker_log(&dir, Some("text"), "Worker registered");
    assert!(!text.contains("\x1b["), "{text}");

    let json = worker_log(&dir, Some("json"), "Worker registered");
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let registered = lines
        .iter()
        .find(|line| line["message"].as_str().is_some_and(|m| m.starts_with("Worker registered")))
        .unwrap_or_else(|| panic!("no `Worker registered` object: {json}"));
    assert_eq!(registered["level"], "INFO", "{registered}");
    assert_eq!(registered["worker_id"], "w1", "{registered}");
    assert!(registered["timestamp"].is_string(), "{registered}");

    let bad = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("migrate")
        .current_dir(&dir)
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    refuses(&bad, 2, "xml");
    refuses(&orchestrator(&dir, &["--log-format", "yaml", "migrate"]), 2, "yaml");
}

#[test]
fn long_bad_values_are_quoted_briefly() {
    let dir = temp_dir("long-values");
    let long = "x".repeat(5000);
    for args in [
        vec!["demo", "worker", "--replica-set", &long],
        vec!["demo", "worker", "--heartbeat-interval", &long],
        vec!["demo", "worker", "--metrics-addr", &long],
        vec!["--database-url", &long, "migrate"],
        vec!["--log-format", &long, "migrate"],
        vec!["demo", "append", "--events", &long],
        vec!["projection", "remove", &long],
    ] {
        let output = orchestrator(&dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let shown: Vec<&str> =
            args.iter().map(|a| if a.len() > 40 { "<5000 x>" } else { a }).collect();
        assert!(!output.status.success(), "{shown:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{shown:?}: {stderr}");
        assert!(stderr.contains("… (5000 characters)"), "{shown:?}: {stderr}");
        assert!(stderr.len() < 400, "{shown:?}: {stderr}");
    }
}
