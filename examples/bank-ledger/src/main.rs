//! A small bank ledger on the orchestrator, on PostgreSQL or SQLite:
//!
//! - `migrate`: the orchestrator's tables and the application's `account_balances`, under one lock;
//! - `worker`: one worker of the `bank` replica set, running the balances projection until
//!   SIGTERM or Ctrl-C (start two and the slots split; stop one and the other takes over);
//!   `worker --diesel` (built with `--features diesel`, PostgreSQL) runs the same projection
//!   written with diesel-async, sharing its checkpoints with the sqlx workers;
//! - `simulate`: concurrent commands (open, deposit, withdraw with no overdraft) that rehydrate
//!   each account from its stream, decide, and append with a retry on version conflicts;
//! - `check`: every balance in the read model equals the sum of its account's events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use orchestrator_core::ports::EventStore;
use orchestrator_core::{ReplicaSetName, SlotCount, TablePrefix, WorkerId};
use orchestrator_postgres::PgStore;
use orchestrator_runtime::{
    Orchestrator, Projection, Server, Settings, Telemetry, shutdown_signal,
};
use orchestrator_sqlite::SqliteStore;
use rand::RngExt;

use bank_ledger::account::Command as AccountCommand;
use bank_ledger::balances::{Balances, SCHEMA};
use bank_ledger::commands::{Outcome, handle, load};

#[cfg(feature = "diesel")]
mod diesel_worker;

#[derive(Debug, Parser)]
#[command(name = "bank-ledger", about = "A bank ledger on the projection orchestrator")]
struct Cli {
    /// postgres://... or sqlite:FILE.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:bank-ledger.db", global = true)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the orchestrator's tables and the application's.
    Migrate,
    /// Run one worker of the balances projection until SIGTERM or Ctrl-C.
    Worker {
        /// This worker's id (the pod name in Kubernetes); random when not given.
        #[arg(long, env = "WORKER_ID")]
        worker_id: Option<String>,
        /// Serve /metrics, /healthz and /readyz here.
        #[arg(long, env = "METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Run the balances projection written with diesel-async (PostgreSQL only).
        #[cfg(feature = "diesel")]
        #[arg(long)]
        diesel: bool,
    },
    /// Open accounts, then deposit and withdraw at random from several tasks at once.
    Simulate {
        /// Accounts acct-0 .. acct-(N-1).
        #[arg(long, default_value_t = 20)]
        accounts: u32,
        /// Deposits and withdrawals in all.
        #[arg(long, default_value_t = 500)]
        operations: u32,
        /// Tasks issuing commands at once.
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
    },
    /// Check that every balance equals the sum of its account's events (waits for the workers).
    Check {
        /// Accounts acct-0 .. acct-(N-1).
        #[arg(long, default_value_t = 20)]
        accounts: u32,
        /// How long to wait for the projection to catch up.
        #[arg(long, default_value = "60s", value_parser = orchestrator_runtime::parse_duration)]
        timeout: Duration,
    },
}

/// The store behind `--database-url`.
#[derive(Clone)]
enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

const SLOTS: u64 = 256;

async fn open(url: &str) -> Result<Store> {
    let prefix = TablePrefix::default();
    let slots = SlotCount::new(SLOTS)?;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = PgStore::connect_pool(url, 10).await?;
        orchestrator_postgres::migrate_with(&pool, &prefix, slots, SCHEMA).await?;
        Ok(Store::Postgres(PgStore::open(pool, prefix).await?))
    } else if url.starts_with("sqlite:") {
        let pool = SqliteStore::connect_pool(url, 4).await?;
        orchestrator_sqlite::migrate_with(&pool, &prefix, slots, SCHEMA).await?;
        Ok(Store::Sqlite(SqliteStore::open(pool, prefix).await?))
    } else {
        bail!("unknown database URL scheme: use postgres://, postgresql:// or sqlite:")
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // Logs: RUST_LOG=info shows the worker's coordination messages (the seed's log lines).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let store = open(&cli.database_url).await.context("cannot open the database")?;
    match cli.command {
        Command::Migrate => {
            println!("schema ready");
            Ok(())
        }
        #[cfg(feature = "diesel")]
        Command::Worker { worker_id, metrics_addr, diesel: true } => {
            diesel_worker::worker(store, &cli.database_url, worker_id, metrics_addr).await
        }
        Command::Worker { worker_id, metrics_addr, .. } => {
            worker(store, worker_id, metrics_addr).await
        }
        Command::Simulate { accounts, operations, concurrency } => {
            simulate(store, accounts, operations, concurrency).await
        }
        Command::Check { accounts, timeout } => check(store, accounts, timeout).await,
    }
}

/// A worker's settings: the environment's (`Settings::from_env`: `BATCH_SIZE`, timeouts, ...) in
/// the `bank` replica set, under the worker id given, if any.
pub(crate) fn worker_settings(id: Option<String>) -> Result<Settings> {
    let mut settings = Settings::from_env()?;
    settings.replica_set = ReplicaSetName::new("bank")?;
    settings.slots = SlotCount::new(SLOTS)?;
    if let Some(id) = id {
        settings.worker_id = WorkerId::new(id)?;
    }
    Ok(settings)
}

/// The worker's metrics, served on `addr` (`/metrics`, `/healthz`, `/readyz`, the status page)
/// for as long as the returned server is kept.
pub(crate) async fn telemetry(addr: Option<SocketAddr>) -> Result<(Telemetry, Option<Server>)> {
    let telemetry = Telemetry::new()?;
    let server = match addr {
        Some(addr) => Some(telemetry.serve(addr).await?),
        None => None,
    };
    Ok((telemetry, server))
}

async fn worker(store: Store, id: Option<String>, metrics: Option<SocketAddr>) -> Result<()> {
    let settings = worker_settings(id)?;
    let (telemetry, _server) = telemetry(metrics).await?;
    match store {
        Store::Postgres(store) => {
            let feed = store.change_feed().await?;
            let projections: Vec<Arc<dyn Projection<_>>> = vec![Arc::new(Balances)];
            Orchestrator::new(store, settings)?
                .with_change_feed(feed)
                .with_telemetry(&telemetry)
                .run(shutdown_signal(), projections)
                .await?;
        }
        Store::Sqlite(store) => {
            let projections: Vec<Arc<dyn Projection<_>>> = vec![Arc::new(Balances)];
            Orchestrator::new(store, settings)?
                .with_telemetry(&telemetry)
                .run(shutdown_signal(), projections)
                .await?;
        }
    }
    Ok(())
}

async fn simulate(store: Store, accounts: u32, operations: u32, concurrency: u32) -> Result<()> {
    match store {
        Store::Postgres(store) => run_simulation(store, accounts, operations, concurrency).await,
        Store::Sqlite(store) => run_simulation(store, accounts, operations, concurrency).await,
    }
}

async fn run_simulation<S: EventStore + Clone + 'static>(
    store: S,
    accounts: u32,
    operations: u32,
    concurrency: u32,
) -> Result<()> {
    for i in 0..accounts {
        let open = AccountCommand::Open { owner: format!("owner-{i}") };
        handle(&store, &format!("acct-{i}"), &open).await?;
    }
    let mut tasks = Vec::new();
    for task in 0..concurrency.max(1) {
        let store = store.clone();
        let share =
            operations / concurrency.max(1) + u32::from(task < operations % concurrency.max(1));
        tasks.push(tokio::spawn(async move {
            let (mut done, mut refused, mut retries) = (0u32, 0u32, 0u32);
            for _ in 0..share {
                let (account, amount, deposit) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..accounts),
                        rng.random_range(1..=100i64),
                        rng.random_bool(0.6),
                    )
                };
                let command = if deposit {
                    AccountCommand::Deposit { amount }
                } else {
                    AccountCommand::Withdraw { amount }
                };
                match handle(&store, &format!("acct-{account}"), &command).await? {
                    Outcome::Done { retries: r, .. } => {
                        done += 1;
                        retries += r;
                    }
                    Outcome::Refused(_) => refused += 1,
                }
            }
            anyhow::Ok((done, refused, retries))
        }));
    }
    let (mut done, mut refused, mut retries) = (0, 0, 0);
    for task in tasks {
        let (d, r, c) = task.await??;
        (done, refused, retries) = (done + d, refused + r, retries + c);
    }
    println!(
        "{accounts} accounts opened; {done} deposits and withdrawals appended, {refused} refused (overdraft), {retries} version conflicts retried"
    );
    Ok(())
}

async fn check(store: Store, accounts: u32, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (expected, mismatches) = compare(&store, accounts).await?;
        if mismatches.is_empty() {
            println!(
                "PASS: {accounts} accounts; every balance equals the sum of its events (total {expected})"
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            for line in &mismatches {
                eprintln!("{line}");
            }
            bail!("FAIL: {} of {accounts} balances differ from their events", mismatches.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of all balances by their events, and one line per account whose read model differs.
async fn compare(store: &Store, accounts: u32) -> Result<(i64, Vec<String>)> {
    let mut total = 0;
    let mut mismatches = Vec::new();
    for i in 0..accounts {
        let id = format!("acct-{i}");
        let account = match store {
            Store::Postgres(s) => load(s, &id).await?,
            Store::Sqlite(s) => load(s, &id).await?,
        };
        if account.balance < 0 {
            bail!("{id} is overdrawn ({}): the no-overdraft rule was broken", account.balance);
        }
        total += account.balance;
        let row: Option<(i64, i64)> = match store {
            Store::Postgres(s) => {
                sqlx::query_as(
                    "SELECT balance, version FROM account_balances WHERE account_id = $1",
                )
                .bind(&id)
                .fetch_optional(s.pool())
                .await?
            }
            Store::Sqlite(s) => {
                sqlx::query_as(
                    "SELECT balance, version FROM account_balances WHERE account_id = $1",
                )
                .bind(&id)
                .fetch_optional(s.pool())
                .await?
            }
        };
        let expected = (account.balance, account.version as i64);
        if row != Some(expected) {
            mismatches.push(format!(
                "{id}: events say (balance, version) = {expected:?}, the read model {row:?}"
            ));
        }
    }
    Ok((total, mismatches))
}
