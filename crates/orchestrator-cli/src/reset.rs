//! `orchestrator projection reset | remove | resume`: rebuild a projection from the first event,
//! forget a retired one, or start a stopped one again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use orchestrator_core::ports::{CheckpointStore, CoordinationStore, StoreError};
use orchestrator_core::{ReplicaSetName, quote};
use orchestrator_runtime::{Projection, reset_projection};

use crate::db::Database;
use crate::demo::{self, DemoProjections};

/// Workers whose heartbeat is younger than this count as running (the default stale timeout).
const RUNNING: Duration = Duration::from_secs(30);

/// The workers of `replica_set` that heartbeated recently; refuses (naming them) unless `force`.
async fn refuse_while_running(
    db: &Database,
    replica_set: &ReplicaSetName,
    what: &str,
    force: bool,
) -> Result<Vec<String>> {
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
            "replica set {replica_set} has {} running worker(s) ({}); stop them first, or pass --force to {what}",
            running.len(),
            running.join(", ")
        );
    }
    Ok(running)
}

/// Resets `projection` with its reset hook when it is one of the demo `projections`, otherwise
/// its checkpoints alone; whether a hook ran.
async fn reset_one<S: CheckpointStore>(
    store: &S,
    replica_set: &ReplicaSetName,
    projection: &str,
    projections: &[Arc<dyn Projection<S::Tx>>],
) -> Result<bool> {
    let Some(hooked) = projections.iter().find(|p| p.name() == projection) else {
        store.reset(store.begin().await?, replica_set, projection).await?;
        return Ok(false);
    };
    reset_projection(store, replica_set, hooked.as_ref()).await?;
    Ok(true)
}

pub(crate) async fn reset(
    db: &Database,
    replica_set: &ReplicaSetName,
    projection: &str,
    force: bool,
) -> Result<()> {
    let running =
        refuse_while_running(db, replica_set, &format!("have them start {projection} over"), force)
            .await?;
    // A demo projection's reset hook clears its demo_audit rows in the reset's transaction;
    // other projections' read models belong to their applications.
    let hooked = match (db, demo::projections(db, "cli", demo::Aids::default())) {
        (Database::Postgres(store), DemoProjections::Postgres(projections)) => {
            reset_one(store, replica_set, projection, &projections).await?
        }
        (Database::Sqlite(store), DemoProjections::Sqlite(projections)) => {
            reset_one(store, replica_set, projection, &projections).await?
        }
        _ => unreachable!("projections are built for the store they run on"),
    };
    println!(
        "projection {projection} of replica set {replica_set} reset: every slot starts again from the first event"
    );
    if hooked {
        println!("its reset hook ran in the same transaction (its demo_audit rows were deleted)");
    } else {
        println!(
            "only its checkpoints were reset: clear its read model yourself (or give it a reset hook) before workers rebuild it"
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

pub(crate) async fn remove(
    db: &Database,
    replica_set: &ReplicaSetName,
    projection: &str,
    force: bool,
) -> Result<()> {
    let known = match db {
        Database::Postgres(store) => store.projections(replica_set).await?,
        Database::Sqlite(store) => store.projections(replica_set).await?,
    };
    if !known.iter().any(|p| p == projection) {
        bail!(
            "replica set {replica_set} has no projection {}; it has: {}",
            quote(projection),
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        );
    }
    refuse_while_running(
        db,
        replica_set,
        "remove it anyway (a worker still running it records it again)",
        force,
    )
    .await?;
    match db {
        Database::Postgres(store) => store.remove(replica_set, projection).await?,
        Database::Sqlite(store) => store.remove(replica_set, projection).await?,
    }
    println!(
        "projection {projection} of replica set {replica_set} removed: its checkpoints are deleted and status no longer lists it"
    );
    Ok(())
}

pub(crate) async fn resume(
    db: &Database,
    replica_set: &ReplicaSetName,
    projection: &str,
) -> Result<()> {
    let resumed = match db {
        Database::Postgres(store) => store.resume_projection(replica_set, projection).await?,
        Database::Sqlite(store) => store.resume_projection(replica_set, projection).await?,
    };
    if !resumed {
        bail!(
            "projection {} of replica set {replica_set} is not stopped",
            orchestrator_core::quote(projection)
        );
    }
    println!(
        "projection {projection} of replica set {replica_set} resumed: workers process it again from the event it stopped at"
    );
    Ok(())
}
