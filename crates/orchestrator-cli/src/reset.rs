//! `orchestrator projection reset`: rebuild a projection from the first event.

use std::time::Duration;

use anyhow::{Result, bail};
use orchestrator_core::ReplicaSetName;
use orchestrator_core::ports::{CheckpointStore, CoordinationStore, StoreError};

use crate::db::Database;
use crate::demo::PROJECTIONS;

/// Workers whose heartbeat is younger than this count as running (the default stale timeout).
const RUNNING: Duration = Duration::from_secs(30);

pub(crate) async fn reset(
    db: &Database,
    replica_set: &ReplicaSetName,
    projection: &str,
    force: bool,
) -> Result<()> {
    let snapshot = match db {
        Database::Postgres(store) => store.snapshot(replica_set).await,
        Database::Sqlite(store) => store.snapshot(replica_set).await,
    };
    let running: Vec<String> = match snapshot {
        Ok(snapshot) => snapshot
            .workers
            .iter()
            .filter(|w| w.heartbeat_age < RUNNING)
            .map(|w| w.id.to_string())
            .collect(),
        Err(StoreError::UnknownReplicaSet(_)) => Vec::new(),
        Err(err) => return Err(err.into()),
    };
    if !running.is_empty() && !force {
        bail!(
            "replica set {replica_set} has {} running worker(s) ({}); stop them first, or pass --force to have them start {projection} over",
            running.len(),
            running.join(", ")
        );
    }
    // The demo read model is cleared in the same transaction; other projections' read models
    // belong to their applications.
    let demo = PROJECTIONS.contains(&projection);
    match db {
        Database::Postgres(store) => {
            let mut tx = store.begin().await?;
            if demo {
                sqlx::query("DELETE FROM demo_audit WHERE projection = $1")
                    .bind(projection)
                    .execute(&mut *tx)
                    .await?;
            }
            store.reset(tx, replica_set, projection).await?;
        }
        Database::Sqlite(store) => {
            let mut tx = store.begin().await?;
            if demo {
                sqlx::query("DELETE FROM demo_audit WHERE projection = ?")
                    .bind(projection)
                    .execute(&mut *tx)
                    .await?;
            }
            store.reset(tx, replica_set, projection).await?;
        }
    }
    println!(
        "projection {projection} of replica set {replica_set} reset: every slot starts again from the first event"
    );
    if demo {
        println!("its demo_audit rows were deleted in the same transaction");
    } else {
        println!(
            "only its checkpoints were reset: clear its read model yourself before workers rebuild it"
        );
    }
    if !running.is_empty() {
        println!(
            "running workers were fenced and reload their checkpoints: {}",
            running.join(", ")
        );
    }
    Ok(())
}
