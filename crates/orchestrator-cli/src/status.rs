//! `orchestrator status`: the replica set as the coordination store sees it.

use std::fmt::Write as _;

use anyhow::Result;
use orchestrator_core::ports::{CoordinationStore, StoreError};
use orchestrator_core::{Partition, ReplicaSetName, Snapshot};

use crate::db::Database;

pub(crate) async fn print(db: &Database, replica_set: &ReplicaSetName, json: bool) -> Result<()> {
    let snapshot = match db {
        Database::Postgres(store) => store.snapshot(replica_set).await,
        Database::Sqlite(store) => store.snapshot(replica_set).await,
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
    println!("{}", if json { render_json(&snapshot) } else { render_table(&snapshot) });
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

fn render_table(snapshot: &Snapshot) -> String {
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
/// `projections` is empty until lag is reported (it is not yet).
fn render_json(snapshot: &Snapshot) -> String {
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
    format!(
        "[{{\"replica_set\":{},\"generation\":{},\"strategy\":null,\"slots\":{},\"workers\":[{}],\"projections\":[]}}]",
        json_string(snapshot.replica_set.as_str()),
        snapshot.generation,
        snapshot.slot_count,
        workers.join(",")
    )
}
