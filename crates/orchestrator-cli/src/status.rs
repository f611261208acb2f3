//! `orchestrator status`: the replica set as the coordination store sees it.

use std::fmt::Write as _;

use anyhow::Result;
use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, EventStore, ReadRequest, StoreError,
};
use orchestrator_core::{Partition, ReplicaSetName, Scope, Slot, Snapshot};

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

pub(crate) async fn print(db: &Database, replica_set: &ReplicaSetName, json: bool) -> Result<()> {
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
    println!(
        "{}",
        if json { render_json(&snapshot, &lags) } else { render_table(&snapshot, &lags) }
    );
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

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The stable JSON form (SPEC §7). `strategy` is null: it is each worker's setting, not stored.
fn render_json(snapshot: &Snapshot, lags: &[ProjectionLag]) -> String {
    let workers: Vec<String> = rows(snapshot)
        .iter()
        .map(|row| {
            format!(
                "{{\"id\":{},\"partition\":{},\"partitions\":{},\"state\":{},\"heartbeat_age_ms\":{},\"slots\":[{}]}}",
                json_string(&row.id),
                row.partition.map_or("null".to_owned(), |p| p.index.to_string()),
                snapshot.members.len(),
                json_string(state(row)),
                row.heartbeat_age_ms,
                row.slots.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    let projections: Vec<String> = lags
        .iter()
        .map(|lag| {
            format!(
                "{{\"name\":{},\"lag_events\":{},\"lag_seconds\":{:.3}}}",
                json_string(&lag.name),
                lag.events,
                lag.seconds
            )
        })
        .collect();
    format!(
        "[{{\"replica_set\":{},\"generation\":{},\"strategy\":null,\"slots\":{},\"workers\":[{}],\"projections\":[{}]}}]",
        json_string(snapshot.replica_set.as_str()),
        snapshot.generation,
        snapshot.slot_count,
        workers.join(","),
        projections.join(",")
    )
}
