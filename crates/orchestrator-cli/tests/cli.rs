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
    refuses(
        &worker(&["--failure-policy", "retry"]),
        1,
        "invalid --failure-policy: \"retry\" is not a failure policy: use stop or park",
    );
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

/// Parks dead letters in the SQLite file at `url` through the store's API, as a worker whose
/// projections use the `park` policy would: `balances` parks acct-1's two events (its key's first
/// failure, then one parked behind it) and acct-2's one (a binary payload), committing its
/// checkpoints; `ledger` parks acct-1's first event in a commit without checkpoints, so it has
/// dead letters but no checkpoint.
async fn park_letters(url: &str) {
    use orchestrator_core::ports::{
        CheckpointStore, CoordinationStore, DeadLetterStore, EventStore, Fence, NewDeadLetter,
        ReadRequest,
    };
    use orchestrator_core::{
        Epoch, EventId, ExpectedVersion, Generation, GenerationPlan, NewEvent, Position,
        ReplicaSetName, Scope, SlotAction, SlotChange, StreamId, TablePrefix, WorkerId,
    };
    use orchestrator_sqlite::SqliteStore;

    let pool = SqliteStore::connect_pool(url, 2).await.unwrap();
    let store = SqliteStore::open(pool, TablePrefix::default()).await.unwrap();
    let event = |n: u128, payload: &[u8]| {
        let mut event =
            NewEvent::new(EventId::from_bytes(n.to_be_bytes()), "Deposited", payload.to_vec());
        event.metadata = r#"{"user":"ann"}"#.to_owned();
        event
    };
    let (one, two) =
        (StreamId::new("bank", "Account", "acct-1"), StreamId::new("bank", "Account", "acct-2"));
    let first = event(1, br#"{"amount":5}"#);
    store
        .append(&one, ExpectedVersion::NoStream, vec![first, event(2, br#"{"amount":7}"#)])
        .await
        .unwrap();
    store
        .append(&two, ExpectedVersion::NoStream, vec![event(3, &[0xff, 0x00, 0x01])])
        .await
        .unwrap();
    let cursors = store.slot_count().all().map(|s| (s, Position::START)).collect();
    let events =
        store.read(&ReadRequest { cursors, scope: Scope::all(), limit: 10 }).await.unwrap();
    assert_eq!(events.len(), 3);

    let rs = ReplicaSetName::new("main-projections").unwrap();
    let w1 = WorkerId::new("w1").unwrap();
    let incarnation = store.register(&rs, store.slot_count(), &w1).await.unwrap();
    store.heartbeat(&rs, &w1, incarnation, Duration::from_secs(60)).await.unwrap();
    let plan = GenerationPlan {
        expected: Generation::ZERO,
        generation: Generation(1),
        leader: w1.clone(),
        leader_incarnation: incarnation,
        members: vec![w1.clone()],
        changes: store
            .slot_count()
            .all()
            .map(|slot| SlotChange {
                slot,
                epoch: Epoch::ZERO,
                action: SlotAction::Grant { to: w1.clone() },
            })
            .collect(),
        evict: Vec::new(),
    };
    store.create_generation(&rs, &plan).await.unwrap();
    let fence = Fence {
        replica_set: rs.clone(),
        worker: w1,
        grants: events.iter().map(|e| (e.slot, Epoch(1))).collect(),
    };
    let letter =
        |e: &orchestrator_core::Event, error: &str, attempts| NewDeadLetter::of(e, error, attempts);
    let letters = [
        letter(&events[0], "insufficient funds", 3),
        letter(&events[1], "parked behind an earlier letter of its key", 0),
        letter(&events[2], "cannot decode the payload", 3),
    ];
    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &rs, "balances", &letters).await.unwrap();
    let last = events.iter().map(|e| e.position).max().unwrap();
    let checkpoints = events.iter().map(|e| (e.slot, last)).collect();
    store.commit(tx, &fence, "balances", &checkpoints).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &rs, "ledger", &letters[..1]).await.unwrap();
    store.commit(tx, &fence, "ledger", &Default::default()).await.unwrap();
    store.pool().close().await;
}

fn stdout(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "stdout: {text} stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[test]
fn dlq_lists_shows_and_marks_dead_letters_and_status_counts_them() {
    let dir = temp_dir("dlq");
    let url = format!("sqlite:{}", dir.join("dlq.db").display());
    let run = |args: &[&str]| {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend_from_slice(args);
        orchestrator(&dir, &all)
    };
    stdout(&run(&["migrate"]));
    assert_eq!(
        stdout(&run(&["dlq", "list"])).trim(),
        "replica set main-projections has no dead letters"
    );
    tokio::runtime::Runtime::new().unwrap().block_on(park_letters(&url));

    // The JSON form: exactly the documented fields, times in RFC 3339 UTC.
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["dlq", "list", "--json"]))).unwrap();
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 4);
    let fields: Vec<&str> = listed[0].as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "id",
        "projection",
        "key",
        "aggregate_id",
        "position",
        "event_type",
        "error",
        "attempts",
        "first_failed_at",
        "last_failed_at",
        "requested",
    ];
    expected.sort();
    let mut fields = fields;
    fields.sort();
    assert_eq!(fields, expected);
    let first =
        listed.iter().find(|l| l["projection"] == "balances" && l["position"] == 1).unwrap();
    assert_eq!(first["key"], "acct-1");
    assert_eq!(first["aggregate_id"], "acct-1");
    assert_eq!(first["event_type"], "Deposited");
    assert_eq!(first["error"], "insufficient funds");
    assert_eq!(first["attempts"], 3);
    assert_eq!(first["requested"], serde_json::Value::Null);
    for time in ["first_failed_at", "last_failed_at"] {
        let text = first[time].as_str().unwrap();
        assert!(text.len() == 24 && text.ends_with('Z') && text.as_bytes()[10] == b'T', "{text}");
        humantime::parse_rfc3339(text).unwrap();
    }
    let id_of = |projection: &str, position: u64| {
        listed.iter().find(|l| l["projection"] == projection && l["position"] == position).unwrap()
            ["id"]
            .as_i64()
            .unwrap()
    };
    let ledger: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["dlq", "list", "--projection", "ledger", "--json"])))
            .unwrap();
    assert_eq!(ledger.as_array().unwrap().len(), 1);

    let table = stdout(&run(&["dlq", "list"]));
    assert!(table.starts_with("    ID  PROJECTION"), "{table}");
    assert!(table.contains("insufficient funds") && table.contains("ledger"), "{table}");
    assert!(table.trim_end().ends_with("4 dead letters of 3 keys"), "{table}");

    // show: every field, the payload as text, or base64 when it is not UTF-8.
    let shown = stdout(&run(&["dlq", "show", &id_of("balances", 1).to_string()]));
    for needle in [
        "insufficient funds",
        "bank/Account/acct-1",
        r#"{"amount":5}"#,
        r#"{"user":"ann"}"#,
        "attempts         3",
    ] {
        assert!(shown.contains(needle), "{needle:?} in {shown}");
    }
    let binary = stdout(&run(&["dlq", "show", &id_of("balances", 3).to_string()]));
    assert!(binary.contains("(base64, 3 bytes) /wAB"), "{binary}");
    refuses(&run(&["dlq", "show", "9999"]), 1, "no dead letter 9999");
    refuses(&run(&["dlq", "show", "seven"]), 2, "seven");

    // retry by id marks the whole key; skip by projection and key; one line each.
    let retried = stdout(&run(&["dlq", "retry", &id_of("balances", 2).to_string()]));
    assert_eq!(retried.lines().count(), 1, "{retried}");
    assert!(
        retried.starts_with("marked 2 dead letters of 1 key (balances) for retry"),
        "{retried}"
    );
    assert!(retried.contains("within a heartbeat interval"), "{retried}");
    let skipped = stdout(&run(&["dlq", "skip", "--projection", "balances", "--key", "acct-2"]));
    assert!(skipped.starts_with("marked 1 dead letter of 1 key (balances) for skip"), "{skipped}");
    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["dlq", "list", "--json"]))).unwrap();
    let requested: Vec<(i64, serde_json::Value)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["position"].as_i64().unwrap() * 10 + i64::from(l["projection"] == "ledger"),
                l["requested"].clone(),
            )
        })
        .collect();
    assert_eq!(
        requested,
        vec![
            (10, "retry".into()),
            (11, serde_json::Value::Null),
            (20, "retry".into()),
            (30, "skip".into())
        ]
    );
    let all = stdout(&run(&["dlq", "retry", "--projection", "ledger"]));
    assert!(all.starts_with("marked 1 dead letter of 1 key (ledger) for retry"), "{all}");

    // Nothing matching: one line and a non-zero exit.
    refuses(&run(&["dlq", "retry", "9999"]), 1, "no dead letter 9999");
    refuses(
        &run(&["dlq", "skip", "--projection", "nope"]),
        1,
        "projection \"nope\" of replica set main-projections has no dead letters",
    );
    refuses(
        &run(&["dlq", "skip", "--projection", "balances", "--key", "nobody"]),
        1,
        "no dead letters of key \"nobody\"",
    );
    refuses(&run(&["dlq", "retry"]), 2, "--projection");
    refuses(&run(&["dlq", "retry", "1", "--projection", "balances"]), 2, "--projection");
    refuses(&run(&["dlq", "skip", "--key", "acct-1"]), 2, "--projection");
    refuses(&run(&["dlq", "list", "--replica-set", "Bad Name"]), 1, "invalid --replica-set");

    // status counts them, also for a projection with dead letters but no checkpoint.
    let table = stdout(&run(&["status"]));
    assert!(table.contains("DEAD LETTERS"), "{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {table}"))
            .to_owned()
    };
    assert!(
        line("balances").split_whitespace().eq(["balances", "0", "0.0", "3", "running"]),
        "{table}"
    );
    assert!(line("ledger").split_whitespace().nth(3) == Some("1"), "{table}");
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["status", "--json"]))).unwrap();
    let projections = status[0]["projections"].as_array().unwrap();
    let count = |name: &str| {
        projections.iter().find(|p| p["name"] == name).unwrap()["dead_letters"].clone()
    };
    assert_eq!((count("balances"), count("ledger")), (3.into(), 1.into()));
}

/// The letters `dlq list --json` prints for `projection`.
fn letters_of(dir: &PathBuf, projection: &str) -> Vec<serde_json::Value> {
    let listed = orchestrator(dir, &["dlq", "list", "--projection", projection, "--json"]);
    let text = stdout(&listed);
    serde_json::from_str::<serde_json::Value>(&text).unwrap().as_array().unwrap().clone()
}

/// Waits up to 20 s for `check` to hold.
fn eventually(what: &str, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let Some(failed) = check() else { return };
        assert!(Instant::now() < deadline, "{what}: {failed}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A real worker with the park policy: the poison aggregate's events become dead letters while
/// the rest is applied; `dlq skip` is carried out by the worker within a heartbeat interval.
#[test]
fn a_parking_worker_fills_the_dead_letters_and_carries_out_a_skip() {
    let dir = temp_dir("dlq-worker");
    let appended = orchestrator(&dir, &["demo", "append", "--events", "20", "--aggregates", "4"]);
    assert!(appended.status.success(), "{appended:?}");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["demo", "worker", "--worker-id", "w1", "--heartbeat-interval", "200ms"])
        .args(["--stale-worker-timeout", "2s", "--registration-wait", "200ms"])
        .args(["--failure-policy", "park", "--fail-on-aggregate", "account-1"])
        .current_dir(&dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap();
    let projection_status = |name: &str| -> Option<serde_json::Value> {
        let status = orchestrator(&dir, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).ok()?;
        status[0]["projections"].as_array()?.iter().find(|p| p["name"] == name).cloned()
    };
    eventually("demo_audit parks account-1's five events and applies the rest", || {
        let letters = letters_of(&dir, "demo_audit");
        let projection = projection_status("demo_audit");
        let done = letters.len() == 5
            && letters.iter().all(|l| l["key"] == "account-1" && l["aggregate_id"] == "account-1")
            && projection.as_ref().is_some_and(|p| {
                p["dead_letters"] == 5 && p["lag_events"] == 0 && p["state"] == "running"
            });
        (!done).then(|| format!("letters {letters:?}, status {projection:?}"))
    });
    let first = letters_of(&dir, "demo_audit")[0].clone();
    assert!(first["error"].as_str().unwrap().contains("--fail-on-aggregate account-1"), "{first}");

    let skipped = stdout(&orchestrator(&dir, &["dlq", "skip", "--projection", "demo_audit"]));
    assert!(
        skipped.starts_with("marked 5 dead letters of 1 key (demo_audit) for skip"),
        "{skipped}"
    );
    eventually("the worker carries out the skip", || {
        let letters = letters_of(&dir, "demo_audit");
        (!letters.is_empty()).then(|| format!("{letters:?}"))
    });
    terminate(&mut worker);
    assert_eq!(projection_status("demo_audit").unwrap()["dead_letters"], 0);
}
