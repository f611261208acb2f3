//! `orchestrator status`: the replica set as the coordination store sees it.

use std::fmt::Write as _;

use anyhow::Result;
use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, EventStore, ReadRequest, StoreError,
};
use orchestrator_core::{Partition, ReplicaSetName, Scope, Slot, Snapshot, Strategy};
use serde::Serialize;

use crate::db::Database;

/// How far one projection is behind, over every slot of the replica set.
struct ProjectionLag {
    name: String,
    events: u64,
    seconds: f64,
}

/// The lag of every projection with checkpoints in the replica set: events after each slot's
/// checkpoint (every event counts: the command does not know the projections' scopes) and the age
/// of the oldest, by the database clock.
async fn lags<S: EventStore + CheckpointStore>(
    store: &S,
    replica_set: &ReplicaSetName,
) -> Result<Vec<ProjectionLag>, StoreError> {
    let slots: Vec<Slot> = store.slot_count().all().collect();
    let mut lags = Vec::new();
    for name in store.projections(replica_set).await? {
        let checkpoints = store.load(replica_set, &name, &slots).await?;
        let request = ReadRequest {
            cursors: checkpoints.into_iter().collect(),
            scope: Scope::all(),
            limit: usize::MAX, // exact: the command runs on demand, unlike the workers' capped measurement
        };
        let backlog = store.backlog(&request).await?;
        lags.push(ProjectionLag {
            name,
            events: backlog.events,
            seconds: backlog.oldest_age.map_or(0.0, |age| age.as_secs_f64()),
        });
    }
    Ok(lags)
}

/// How `status` prints.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Format {
    Table,
    /// JSON, with the strategy configured where the command runs.
    Json(Strategy),
}

pub(crate) async fn print(
    db: &Database,
    replica_set: &ReplicaSetName,
    format: Format,
) -> Result<()> {
    let (snapshot, lags) = match db {
        Database::Postgres(store) => {
            (store.snapshot(replica_set).await, lags(store, replica_set).await?)
        }
        Database::Sqlite(store) => {
            (store.snapshot(replica_set).await, lags(store, replica_set).await?)
        }
    };
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(StoreError::UnknownReplicaSet(_)) => {
            anyhow::bail!(
                "replica set {replica_set} has no workers yet (start one with `orchestrator demo worker`)"
            )
        }
        Err(err) => return Err(err.into()),
    };
    let text = match format {
        Format::Table => render_table(&snapshot, &lags),
        Format::Json(strategy) => render_json(&snapshot, &lags, strategy)?,
    };
    println!("{text}");
    Ok(())
}

/// One line per registered worker.
struct Row {
    id: String,
    partition: Option<Partition>,
    member: bool,
    heartbeat_age_ms: u128,
    slots: Vec<u32>,
}

fn rows(snapshot: &Snapshot) -> Vec<Row> {
    snapshot
        .workers
        .iter()
        .map(|w| Row {
            id: w.id.to_string(),
            partition: snapshot.partition_of(&w.id),
            member: snapshot.members.contains(&w.id),
            heartbeat_age_ms: w.heartbeat_age.as_millis(),
            slots: snapshot.owned_by(&w.id).iter().map(|(s, _)| s.0).collect(),
        })
        .collect()
}

fn state(row: &Row) -> &'static str {
    if row.member { "member" } else { "joining" }
}

fn render_table(snapshot: &Snapshot, lags: &[ProjectionLag]) -> String {
    let mut out = String::new();
    let unowned = snapshot.slots.iter().filter(|s| s.owner.is_none()).count();
    let moving = snapshot.slots.iter().filter(|s| s.next_owner.is_some()).count();
    let _ = writeln!(
        out,
        "replica set {}: generation {}, {} members, {} slots ({} unowned, {} moving)",
        snapshot.replica_set,
        snapshot.generation,
        snapshot.members.len(),
        snapshot.slot_count,
        unowned,
        moving
    );
    let _ = writeln!(
        out,
        "{:<32} {:<10} {:<8} {:>6} {:>14}",
        "WORKER", "PARTITION", "STATE", "SLOTS", "HEARTBEAT AGE"
    );
    for row in rows(snapshot) {
        let partition = row.partition.map_or("-".to_owned(), |p| p.to_string());
        let _ = writeln!(
            out,
            "{:<32} {:<10} {:<8} {:>6} {:>12}ms",
            row.id,
            partition,
            state(&row),
            row.slots.len(),
            row.heartbeat_age_ms
        );
    }
    if !lags.is_empty() {
        let _ = writeln!(out, "\n{:<32} {:>12} {:>12}", "PROJECTION", "LAG EVENTS", "LAG SECONDS");
        for lag in lags {
            let _ = writeln!(out, "{:<32} {:>12} {:>12.1}", lag.name, lag.events, lag.seconds);
        }
    }
    out.trim_end().to_owned()
}

/// One replica set in the stable JSON form (SPEC §7).
#[derive(Debug, Serialize)]
struct ReplicaSetJson<'a> {
    replica_set: &'a str,
    generation: u64,
    /// The strategy as configured where the command runs: the store does not record the
    /// workers' own setting.
    strategy: &'static str,
    slots: u32,
    workers: Vec<WorkerJson>,
    projections: Vec<ProjectionJson<'a>>,
}

#[derive(Debug, Serialize)]
struct WorkerJson {
    id: String,
    /// The worker's index among the members; null while it is joining.
    partition: Option<usize>,
    /// How many members share the slots.
    partitions: usize,
    state: &'static str,
    heartbeat_age_ms: u128,
    slots: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct ProjectionJson<'a> {
    name: &'a str,
    lag_events: u64,
    /// Seconds, to the millisecond.
    lag_seconds: f64,
}

/// The stable JSON form (SPEC §7): an array with one object per replica set shown.
fn render_json(
    snapshot: &Snapshot,
    lags: &[ProjectionLag],
    strategy: Strategy,
) -> serde_json::Result<String> {
    let workers = rows(snapshot)
        .into_iter()
        .map(|row| WorkerJson {
            state: state(&row),
            id: row.id,
            partition: row.partition.map(|p| p.index),
            partitions: snapshot.members.len(),
            heartbeat_age_ms: row.heartbeat_age_ms,
            slots: row.slots,
        })
        .collect();
    let projections = lags
        .iter()
        .map(|lag| ProjectionJson {
            name: &lag.name,
            lag_events: lag.events,
            lag_seconds: (lag.seconds * 1000.0).round() / 1000.0,
        })
        .collect();
    serde_json::to_string(&[ReplicaSetJson {
        replica_set: snapshot.replica_set.as_str(),
        generation: snapshot.generation.0,
        strategy: strategy_name(strategy),
        slots: snapshot.slot_count.get(),
        workers,
        projections,
    }])
}

/// The strategy as `STRATEGY` spells it.
fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Recreate => "recreate",
        Strategy::Incremental => "incremental",
    }
}
