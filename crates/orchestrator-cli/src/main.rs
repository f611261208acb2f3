//! `orchestrator`: set up the schema, append demo events, run demo workers, inspect and manage projections.
//!
//! Bad input (flags, URLs, settings, an unreachable database) ends with one line on stderr and a
//! non-zero exit code, never a panic.

mod db;
mod demo;
mod dlq;
mod reset;
mod status;
mod verify;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::error::{ContextKind, ContextValue};
use clap::{Args, Parser, Subcommand, ValueEnum};
use orchestrator_core::ports::DeadLetterAction;
use orchestrator_core::{ReplicaSetName, SlotCount, TablePrefix, WorkerId, quote};
use orchestrator_runtime::{
    Orchestrator, Settings, Telemetry, parse_duration, parse_strategy, shutdown_signal,
};

use crate::db::{DEFAULT_URL, Database};
use crate::demo::DemoProjections;

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Scale event-sourcing projections across worker processes"
)]
struct Cli {
    /// Database URL: postgres://..., postgresql://... or sqlite:FILE (default: sqlite:orchestrator.db).
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Prefix of the orchestrator's tables.
    #[arg(long, env = "TABLE_PREFIX", global = true, default_value = "orch_")]
    table_prefix: String,
    /// Slot count of the event store (a power of two; fixed when the store is first migrated).
    #[arg(long, env = "SLOTS", global = true, default_value_t = 256)]
    slots: u64,
    /// Log lines on stderr: text (coloured only on a terminal) or json (one object per line).
    #[arg(
        long,
        env = "LOG_FORMAT",
        global = true,
        value_enum,
        ignore_case = true,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line: timestamp, level, message, the event's fields, target, spans.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade every table; safe to run any number of times, concurrently.
    Migrate,
    /// The demo: append events, run workers of the demo_audit projections.
    #[command(subcommand)]
    Demo(DemoCommand),
    /// The current generation, each worker's partition, slots and heartbeat age, and each
    /// projection's lag.
    Status(StatusArgs),
    /// Manage projections.
    #[command(subcommand)]
    Projection(ProjectionCommand),
    /// Dead letters: events parked by projections whose failure policy is `park`, per partition
    /// key.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List the dead letters (id, projection, key, position, event type, attempts, last failure,
    /// pending request, error).
    List(DlqListArgs),
    /// Every field of one dead letter, and its event's payload and metadata.
    Show(DlqShowArgs),
    /// Apply parked events again, in order: one letter's whole key, or every key of a projection
    /// (or one of its keys). The worker owning each key's slot does it within a heartbeat interval.
    Retry(DlqTargetArgs),
    /// Drop parked events (recorded in the log of skipped letters), whole keys at a time like
    /// retry; the key's later events are then applied normally.
    Skip(DlqTargetArgs),
}

#[derive(Debug, Args)]
struct DlqListArgs {
    /// Only this projection's letters.
    #[arg(long)]
    projection: Option<String>,
    /// Print a JSON array: id, projection, key, aggregate_id, position, event_type, error,
    /// attempts, first_failed_at, last_failed_at (RFC 3339, UTC), requested (null, retry or skip).
    #[arg(long)]
    json: bool,
    /// Replica set the projections run in.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
}

#[derive(Debug, Args)]
struct DlqShowArgs {
    /// The dead letter's id (see `dlq list`).
    id: i64,
    /// Replica set the projections run in.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "projection"])))]
struct DlqTargetArgs {
    /// One dead letter's id: its whole key is marked (a key always moves as a whole).
    id: Option<i64>,
    /// Every key of this projection.
    #[arg(long, conflicts_with = "id")]
    projection: Option<String>,
    /// Only this key of --projection.
    #[arg(long, requires = "projection")]
    key: Option<String>,
    /// Replica set the projections run in.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
}

#[derive(Debug, Subcommand)]
enum ProjectionCommand {
    /// Rebuild a projection from the first event: deletes its checkpoints (and, for the demo
    /// projections, their demo_audit rows, through their reset hook, in the same transaction).
    /// Refuses while workers of the replica set run.
    Reset(ResetArgs),
    /// Forget a retired projection: delete its checkpoints, so status no longer lists it.
    /// Refuses while workers of the replica set run.
    Remove(ResetArgs),
    /// Start a projection stopped by its failure policy again, from the event it failed on
    /// (after a fix). Workers pick it up while running.
    Resume(ResumeArgs),
}

#[derive(Debug, Args)]
struct ResumeArgs {
    /// The projection's name.
    name: String,
    /// Replica set the projection runs in.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
}

#[derive(Debug, Args)]
struct ResetArgs {
    /// The projection's name.
    name: String,
    /// Replica set the projection runs in.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
    /// Reset even while workers run: their slots are fenced and they start the projection over.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Replica set to show.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "serve")]
    json: bool,
    /// Serve the live status page on this address (like 127.0.0.1:8080) until SIGTERM or Ctrl-C:
    /// `/` (the page, refreshing itself) and `/status.json`.
    #[arg(long, value_name = "ADDR")]
    serve: Option<String>,
    /// The strategy the JSON form reports (the store does not record the workers' setting).
    #[arg(long, env = "STRATEGY", default_value = "incremental")]
    strategy: String,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// Print one JSON object: events, projections (applied, exactly_once, duplicates, missing,
    /// order_violations) and verdict (pass or fail).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// Append exactly N demo events over M aggregates, versions in order.
    Append(AppendArgs),
    /// Run one worker of the demo projections until SIGTERM or SIGINT, then leave gracefully.
    Worker(Box<WorkerArgs>),
    /// Check demo_audit: every appended event applied exactly once per projection, each
    /// aggregate's events in version order. Exits 1 on any violation.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct AppendArgs {
    /// Number of events to append.
    #[arg(long)]
    events: u64,
    /// Number of aggregates the events are spread over.
    #[arg(long, default_value_t = 10)]
    aggregates: u64,
    /// Events per second, over all appenders (default: as fast as possible).
    #[arg(long)]
    rate: Option<u64>,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
    /// Keep each append transaction open for a random time up to this many milliseconds before
    /// committing, so later events commit first (PostgreSQL only).
    #[arg(long, default_value_t = 0)]
    hold_open: u64,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Replica set to join.
    #[arg(long, env = "REPLICA_SET", default_value = "main-projections")]
    replica_set: String,
    /// This worker's id (default: host name and process id).
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Heartbeat interval, like 5s or 500ms.
    #[arg(long, env = "HEARTBEAT_INTERVAL", allow_hyphen_values = true)]
    heartbeat_interval: Option<String>,
    /// A worker silent for longer is stale and its slots move.
    #[arg(long, env = "STALE_WORKER_TIMEOUT", allow_hyphen_values = true)]
    stale_worker_timeout: Option<String>,
    /// Bound on every coordination wait.
    #[arg(long, env = "COORDINATION_TIMEOUT", allow_hyphen_values = true)]
    coordination_timeout: Option<String>,
    /// How long an idle worker waits before looking for new events again.
    #[arg(long, env = "POLL_INTERVAL", allow_hyphen_values = true)]
    poll_interval: Option<String>,
    /// Joins within this window of each other make one generation.
    #[arg(long, env = "REGISTRATION_WAIT", allow_hyphen_values = true)]
    registration_wait: Option<String>,
    /// Events per batch.
    #[arg(long, env = "BATCH_SIZE")]
    batch_size: Option<usize>,
    /// incremental (default) or recreate.
    #[arg(long, env = "STRATEGY")]
    strategy: Option<String>,
    /// Attempts of a failing batch before its failure policy applies.
    #[arg(long, env = "HANDLER_MAX_ATTEMPTS")]
    handler_max_attempts: Option<u32>,
    /// What a projection does with an event it fails on for good: stop (the projection stops on
    /// every worker until `projection resume`; the default) or park (the event and the later
    /// events of its partition key become dead letters, see `dlq`).
    #[arg(long, env = "FAILURE_POLICY")]
    failure_policy: Option<String>,
    /// Groups of this worker's slots processed at the same time (default 1); per-key order holds.
    #[arg(long, env = "PROCESSING_CONCURRENCY")]
    processing_concurrency: Option<usize>,
    /// A batch whose handler has not returned after this long is rolled back and counts as a
    /// failed attempt (default 30s, or half of --coordination-timeout when that is under a
    /// minute; shorter than --coordination-timeout, and than 60s on PostgreSQL).
    #[arg(long, env = "HANDLER_TIMEOUT", allow_hyphen_values = true)]
    handler_timeout: Option<String>,
    /// Database connections of this worker (default: what it needs, see docs/configuration.md;
    /// a smaller value is refused).
    #[arg(long, env = "DATABASE_POOL_SIZE")]
    database_pool_size: Option<u32>,
    /// Memory in MiB for shared batches slower projections have not taken yet (default 128).
    #[arg(long, env = "SHARED_READ_BUFFER_MB")]
    shared_read_buffer_mb: Option<usize>,
    /// Demo aid: each batch of the demo_audit_batch projection waits this many milliseconds
    /// before writing (demo_audit is not slowed), to watch one slow projection beside a fast one,
    /// and what PROCESSING_CONCURRENCY does for a slow handler.
    #[arg(long, default_value_t = 0)]
    handler_delay: u64,
    /// Demo aid: both demo projections fail for good (a permanent error) on every event of this
    /// aggregate id, to try the failure policies; demo_audit_batch does not say which event of a
    /// batch failed.
    #[arg(long, value_name = "ID")]
    fail_on_aggregate: Option<String>,
    /// Serve /metrics, /healthz and /readyz on this address, like 0.0.0.0:9090 (default: no server).
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // clap spreads its message over several lines; keep what it says, on one line, with
            // a long bad value quoted briefly.
            let mut text = err.to_string();
            if let Some(ContextValue::String(value)) = err.get(ContextKind::InvalidValue)
                && value.chars().count() > orchestrator_core::quote::QUOTED_CHARS
            {
                text = text.replace(&format!("'{value}'"), &quote(value).to_string());
            }
            let said: Vec<&str> = text
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .map(str::trim)
                .filter(|line| {
                    !line.is_empty()
                        && !line.starts_with("tip:")
                        && !line.starts_with("For more information")
                })
                .collect();
            eprintln!("{} (see --help)", said.join(" "));
            return ExitCode::from(2);
        }
    };
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// Log lines on stderr, filtered by `RUST_LOG` (default `info,sqlx=warn`): text, coloured only
/// when stderr is a terminal (not in a file, a pipe or a container's log), or one JSON object per
/// line with the event's fields at the top level next to `message`.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// The error and its causes on one line.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

async fn run(cli: Cli) -> Result<()> {
    let url = cli.database_url.clone().unwrap_or_else(|| DEFAULT_URL.to_owned());
    db::kind_of(&url)?;
    let prefix = TablePrefix::new(cli.table_prefix.clone())
        .map_err(|e| anyhow::anyhow!("invalid --table-prefix: {e}"))?;
    let slots = SlotCount::new(cli.slots).map_err(|e| anyhow::anyhow!("invalid --slots: {e}"))?;
    match cli.command {
        Command::Migrate => {
            db::open(&url, &prefix, slots).await?;
            println!("schema ready (table prefix \"{prefix}\", {slots} slots)");
            Ok(())
        }
        Command::Demo(DemoCommand::Append(args)) => {
            if args.events == 0 || args.aggregates == 0 || args.concurrency == 0 {
                anyhow::bail!("--events, --aggregates and --concurrency must be at least 1");
            }
            if args.rate == Some(0) {
                anyhow::bail!("--rate must be at least 1 event per second");
            }
            let db = db::open(&url, &prefix, slots).await?;
            let plan = demo::AppendPlan {
                events: args.events,
                aggregates: args.aggregates,
                rate: args.rate,
                concurrency: args.concurrency,
                hold_open_ms: args.hold_open,
            };
            let appended = demo::append(&db, &plan).await?;
            println!("appended {appended} events over {} aggregates", args.aggregates);
            Ok(())
        }
        Command::Status(args) => {
            let replica_set = ReplicaSetName::new(args.replica_set.clone())
                .map_err(|e| anyhow::anyhow!("invalid --replica-set: {e}"))?;
            let strategy = || {
                parse_strategy(&args.strategy)
                    .map_err(|rule| anyhow::anyhow!("invalid --strategy: {rule}"))
            };
            let format = match (&args.serve, args.json) {
                (Some(addr), _) => {
                    status::Format::Serve(parse_listen_addr(addr, "serve")?, strategy()?)
                }
                (None, true) => status::Format::Json(strategy()?),
                (None, false) => status::Format::Table,
            };
            let db = db::open(&url, &prefix, slots).await?;
            status::print(db, &replica_set, format).await
        }
        Command::Demo(DemoCommand::Verify(args)) => {
            let db = db::open(&url, &prefix, slots).await?;
            let report = verify::verify(&db, &prefix).await?;
            if args.json {
                println!("{}", report.to_json()?);
            } else {
                println!("{report}");
            }
            if !report.passed() {
                anyhow::bail!("demo_audit check failed");
            }
            Ok(())
        }
        Command::Dlq(command) => {
            let replica_set = |name: &str| {
                ReplicaSetName::new(name.to_owned())
                    .map_err(|e| anyhow::anyhow!("invalid --replica-set: {e}"))
            };
            match command {
                DlqCommand::List(args) => {
                    let replica_set = replica_set(&args.replica_set)?;
                    let db = db::open(&url, &prefix, slots).await?;
                    dlq::list(&db, &replica_set, args.projection.as_deref(), args.json).await
                }
                DlqCommand::Show(args) => {
                    let replica_set = replica_set(&args.replica_set)?;
                    let db = db::open(&url, &prefix, slots).await?;
                    dlq::show(&db, &replica_set, args.id).await
                }
                DlqCommand::Retry(args) => {
                    let (replica_set, target) =
                        (replica_set(&args.replica_set)?, dlq_target(&args)?);
                    let db = db::open(&url, &prefix, slots).await?;
                    dlq::request(&db, &replica_set, &target, DeadLetterAction::Retry).await
                }
                DlqCommand::Skip(args) => {
                    let (replica_set, target) =
                        (replica_set(&args.replica_set)?, dlq_target(&args)?);
                    let db = db::open(&url, &prefix, slots).await?;
                    dlq::request(&db, &replica_set, &target, DeadLetterAction::Skip).await
                }
            }
        }
        Command::Projection(ProjectionCommand::Resume(args)) => {
            let replica_set = ReplicaSetName::new(args.replica_set.clone())
                .map_err(|e| anyhow::anyhow!("invalid --replica-set: {e}"))?;
            let db = db::open(&url, &prefix, slots).await?;
            reset::resume(&db, &replica_set, &args.name).await
        }
        Command::Projection(command) => {
            let (ProjectionCommand::Reset(args) | ProjectionCommand::Remove(args)) = &command
            else {
                unreachable!("resume is matched above")
            };
            let replica_set = ReplicaSetName::new(args.replica_set.clone())
                .map_err(|e| anyhow::anyhow!("invalid --replica-set: {e}"))?;
            if args.name.trim().is_empty() {
                anyhow::bail!("the projection name is empty");
            }
            let db = db::open(&url, &prefix, slots).await?;
            match command {
                ProjectionCommand::Reset(_) => {
                    reset::reset(&db, &replica_set, &args.name, args.force).await
                }
                ProjectionCommand::Remove(_) => {
                    reset::remove(&db, &replica_set, &args.name, args.force).await
                }
                ProjectionCommand::Resume(_) => unreachable!("resume is matched above"),
            }
        }
        Command::Demo(DemoCommand::Worker(args)) => {
            let settings = worker_settings(&args, prefix.clone(), slots)?;
            // The demo worker runs two projections; on PostgreSQL it also LISTENs, and its handler
            // timeout must end before the server ends an idle transaction.
            let postgres = db::kind_of(&url)? == "postgres";
            settings.check_pool_size(demo::PROJECTIONS.len(), postgres)?;
            if postgres {
                settings
                    .check_transaction_limit(orchestrator_postgres::IDLE_IN_TRANSACTION_LIMIT)?;
            }
            let pool_size = settings.pool_size(demo::PROJECTIONS.len(), postgres);
            let aids = demo::Aids {
                delay: Duration::from_millis(args.handler_delay),
                fail_on_aggregate: args.fail_on_aggregate.clone(),
            };
            let metrics_addr = args
                .metrics_addr
                .as_deref()
                .map(|addr| parse_listen_addr(addr, "metrics-addr"))
                .transpose()?;
            let db = db::open_with_pool(&url, &prefix, slots, Some(pool_size)).await?;
            let telemetry = Telemetry::new()?;
            let _server = match metrics_addr {
                Some(addr) => Some(
                    telemetry
                        .serve(addr)
                        .await
                        .with_context(|| format!("cannot serve metrics on {addr}"))?,
                ),
                None => None,
            };
            run_worker(db, settings, &telemetry, aids).await
        }
    }
}

/// What `dlq retry` or `dlq skip` names: an id, or a projection (and maybe a key).
fn dlq_target(args: &DlqTargetArgs) -> Result<dlq::Target> {
    match (&args.id, &args.projection) {
        (Some(id), _) => Ok(dlq::Target::Id(*id)),
        (None, Some(name)) if name.trim().is_empty() => {
            anyhow::bail!("the projection name is empty")
        }
        (None, Some(name)) => {
            Ok(dlq::Target::Projection { name: name.clone(), key: args.key.clone() })
        }
        (None, None) => anyhow::bail!("name a dead letter by its id, or pass --projection"),
    }
}

fn worker_settings(args: &WorkerArgs, prefix: TablePrefix, slots: SlotCount) -> Result<Settings> {
    let replica_set = ReplicaSetName::new(args.replica_set.clone())
        .map_err(|e| anyhow::anyhow!("invalid --replica-set: {e}"))?;
    let mut settings = Settings::new(replica_set);
    if let Some(id) = &args.worker_id {
        settings.worker_id =
            WorkerId::new(id.clone()).map_err(|e| anyhow::anyhow!("invalid --worker-id: {e}"))?;
    }
    let duration = |flag: &str, value: &Option<String>| -> Result<Option<Duration>> {
        value
            .as_deref()
            .map(|v| parse_duration(v).map_err(|rule| anyhow::anyhow!("invalid --{flag}: {rule}")))
            .transpose()
    };
    if let Some(d) = duration("heartbeat-interval", &args.heartbeat_interval)? {
        settings.timing.heartbeat_interval = d;
    }
    if let Some(d) = duration("stale-worker-timeout", &args.stale_worker_timeout)? {
        settings.timing.stale_worker_timeout = d;
    }
    if let Some(d) = duration("coordination-timeout", &args.coordination_timeout)? {
        settings.timing.coordination_timeout = d;
    }
    if let Some(d) = duration("poll-interval", &args.poll_interval)? {
        settings.idle_poll = d;
    }
    if let Some(d) = duration("registration-wait", &args.registration_wait)? {
        settings.timing.registration_wait = d;
    }
    if let Some(batch) = args.batch_size {
        settings.batch_size = batch;
    }
    if let Some(strategy) = &args.strategy {
        settings.strategy = parse_strategy(strategy)
            .map_err(|rule| anyhow::anyhow!("invalid --strategy: {rule}"))?;
    }
    if let Some(policy) = &args.failure_policy {
        settings.failure_policy = orchestrator_runtime::parse_failure_policy(policy)
            .map_err(|rule| anyhow::anyhow!("invalid --failure-policy: {rule}"))?;
    }
    if let Some(attempts) = args.handler_max_attempts {
        settings.retry.max_attempts = attempts;
    }
    if let Some(concurrency) = args.processing_concurrency {
        settings.processing_concurrency = concurrency;
    }
    if let Some(d) = duration("handler-timeout", &args.handler_timeout)? {
        settings.handler_timeout = Some(d);
    }
    if let Some(size) = args.database_pool_size {
        settings.database_pool_size = Some(size);
    }
    if let Some(mb) = args.shared_read_buffer_mb {
        if mb == 0 || mb > 1 << 20 {
            anyhow::bail!(
                "invalid --shared-read-buffer-mb: must be between 1 and 1048576, got {mb}"
            );
        }
        settings.shared_read_buffer = mb << 20;
    }
    settings.table_prefix = prefix;
    settings.slots = slots;
    settings.validate()?;
    Ok(settings)
}

/// A listening address: `host:port`, or `:port` for every interface.
fn parse_listen_addr(addr: &str, flag: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let full = if addr.starts_with(':') { format!("0.0.0.0{addr}") } else { addr.to_owned() };
    full.to_socket_addrs().ok().and_then(|mut addrs| addrs.next()).ok_or_else(|| {
        anyhow::anyhow!("invalid --{flag} {}: expected host:port, like 0.0.0.0:9090", quote(addr))
    })
}

async fn run_worker(
    db: Database,
    settings: Settings,
    telemetry: &Telemetry,
    aids: demo::Aids,
) -> Result<()> {
    let worker = settings.worker_id.to_string();
    match (demo::projections(&db, &worker, aids), db) {
        (DemoProjections::Postgres(projections), Database::Postgres(store)) => {
            let feed = store.change_feed().await.context("cannot listen for notifications")?;
            Orchestrator::new(store, settings)?
                .with_change_feed(feed)
                .with_telemetry(telemetry)
                .run(shutdown_signal(), projections)
                .await?;
        }
        (DemoProjections::Sqlite(projections), Database::Sqlite(store)) => {
            Orchestrator::new(store, settings)?
                .with_telemetry(telemetry)
                .run(shutdown_signal(), projections)
                .await?;
        }
        _ => unreachable!("projections are built for the store they run on"),
    }
    Ok(())
}
