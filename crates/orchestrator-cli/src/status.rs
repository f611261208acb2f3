//! `orchestrator status`: the replica set as the coordination store sees it, as a table, as JSON,
//! or as the live status page (`--serve`). The picture itself comes from the runtime's status
//! module, which also serves the page on a worker's metrics address.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use orchestrator_core::ports::StoreError;
use orchestrator_core::{ReplicaSetName, Strategy};
use orchestrator_runtime::shutdown_signal;
use orchestrator_runtime::status::{LagCount, ReplicaSetStatus, StatusPage, read_status};

use crate::db::Database;

/// How `status` answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Format {
    Table,
    /// JSON, with the strategy configured where the command runs.
    Json(Strategy),
    /// The status page on this address until SIGTERM or Ctrl-C.
    Serve(SocketAddr, Strategy),
}

pub(crate) async fn print(
    db: Database,
    replica_set: &ReplicaSetName,
    format: Format,
) -> Result<()> {
    let strategy = match format {
        Format::Serve(addr, strategy) => return serve(db, replica_set, addr, strategy).await,
        Format::Json(strategy) => strategy,
        // The table does not show the strategy.
        Format::Table => Strategy::Incremental,
    };
    // Exact: the command runs on demand, unlike the workers' and the page's capped count.
    let status = match &db {
        Database::Postgres(store) => {
            read_status(store, replica_set, strategy, LagCount::Exact).await
        }
        Database::Sqlite(store) => read_status(store, replica_set, strategy, LagCount::Exact).await,
    };
    let status = match status {
        Ok(status) => status,
        Err(StoreError::UnknownReplicaSet(_)) => {
            anyhow::bail!(
                "replica set {replica_set} has no workers yet (start one with `orchestrator demo worker`)"
            )
        }
        Err(err) => return Err(err.into()),
    };
    let text = match format {
        Format::Json(_) => serde_json::to_string(&[status])?,
        _ => render_table(&status),
    };
    println!("{text}");
    Ok(())
}

/// Serves the page (`/`) and its JSON (`/status.json`) for the replica set until SIGTERM or
/// Ctrl-C.
async fn serve(
    db: Database,
    replica_set: &ReplicaSetName,
    addr: SocketAddr,
    strategy: Strategy,
) -> Result<()> {
    let page = StatusPage::new();
    match db {
        Database::Postgres(store) => page.show(store, replica_set.clone(), strategy),
        Database::Sqlite(store) => page.show(store, replica_set.clone(), strategy),
    }
    let server = page.serve(addr).await.with_context(|| format!("cannot serve on {addr}"))?;
    // The address on stdout, so scripts asking for port 0 learn the port.
    println!("status page of {replica_set} on http://{}/", server.local_addr());
    tracing::info!(addr = %server.local_addr(), replica_set = %replica_set, "Serving the status page");
    shutdown_signal().await;
    Ok(())
}

fn render_table(status: &ReplicaSetStatus) -> String {
    let mut out = String::new();
    let unowned = status.slot_map.iter().filter(|s| s.owner.is_none()).count();
    let moving = status.slot_map.iter().filter(|s| s.next_owner.is_some()).count();
    let members = status.workers.iter().filter(|w| w.state == "member").count();
    let _ = writeln!(
        out,
        "replica set {}: generation {}, {} members, {} slots ({} unowned, {} moving)",
        status.replica_set, status.generation, members, status.slots, unowned, moving
    );
    let _ = writeln!(
        out,
        "{:<32} {:<10} {:<8} {:>6} {:>14}",
        "WORKER", "PARTITION", "STATE", "SLOTS", "HEARTBEAT AGE"
    );
    for worker in &status.workers {
        let partition = worker
            .partition
            .map_or("-".to_owned(), |index| format!("{index}/{}", worker.partitions));
        let _ = writeln!(
            out,
            "{:<32} {:<10} {:<8} {:>6} {:>12}ms",
            worker.id,
            partition,
            worker.state,
            worker.slots.len(),
            worker.heartbeat_age_ms
        );
    }
    if !status.projections.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<32} {:>12} {:>12} {:>12}  STATE",
            "PROJECTION", "LAG EVENTS", "LAG SECONDS", "DEAD LETTERS"
        );
        for lag in &status.projections {
            let _ = writeln!(
                out,
                "{:<32} {:>12} {:>12.1} {:>12}  {}",
                lag.name, lag.lag_events, lag.lag_seconds, lag.dead_letters, lag.state
            );
            if let Some(stopped) = &lag.stopped {
                let _ = writeln!(
                    out,
                    "  stopped at position {} ({}, {}): {}",
                    stopped.position, stopped.aggregate, stopped.event_type, stopped.error
                );
            }
        }
    }
    out.trim_end().to_owned()
}
