//! What an application does with its projections besides running them: rebuild one from the
//! start, forget a retired one, and wait until one has caught up with an append.

use std::time::Duration;

use orchestrator_core::ReplicaSetName;
use orchestrator_core::ports::{Appended, CheckpointStore, StoreError};

use crate::projection::Projection;

/// Rebuilds `projection` from the first event: its [`Projection::reset`] hook (clearing its read
/// model) and the reset of its checkpoints commit in one transaction. Every slot is fenced, so a
/// worker still running it starts over from the first event; stop the workers first unless that
/// is what you want.
pub async fn reset_projection<S, P>(
    store: &S,
    replica_set: &ReplicaSetName,
    projection: &P,
) -> Result<(), ResetError>
where
    S: CheckpointStore,
    P: Projection<S::Tx> + ?Sized,
{
    let mut tx = store.begin().await?;
    projection.reset(&mut tx).await.map_err(ResetError::Hook)?;
    store.reset(tx, replica_set, projection.name()).await?;
    Ok(())
}

/// Why a reset did not happen (nothing was changed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResetError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The projection's reset hook failed.
    #[error("the projection's reset hook failed: {0}")]
    Hook(#[source] orchestrator_core::ports::BoxError),
}

/// Waits until `projection` of `replica_set` has processed every event of `appended` (its
/// checkpoint of the append's slot is at or past the append's last event), checking with growing
/// pauses up to 100 ms; a read-after-write screen or a test calls this right after appending.
/// Fails with [`WaitError::Timeout`] after `timeout`. Store errors are retried until then.
pub async fn wait_for_projection<S: CheckpointStore>(
    store: &S,
    replica_set: &ReplicaSetName,
    projection: &str,
    appended: &Appended,
    timeout: Duration,
) -> Result<(), WaitError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let reached = match store.load(replica_set, projection, &[appended.slot]).await {
            Ok(checkpoints) => {
                checkpoints.get(&appended.slot).is_some_and(|at| *at >= appended.last_position)
            }
            Err(err) if err.is_retryable() => false,
            Err(err) => return Err(WaitError::Store(err)),
        };
        if reached {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(WaitError::Timeout { projection: projection.to_owned(), timeout });
        }
        tokio::time::sleep(pause.min(timeout.saturating_sub(started.elapsed()))).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Why [`wait_for_projection`] returned without the projection having caught up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The projection had not processed the append in time.
    #[error("projection {projection} had not processed the append after {timeout:?}")]
    Timeout {
        /// The projection.
        projection: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// The store refused for good.
    #[error(transparent)]
    Store(StoreError),
}
