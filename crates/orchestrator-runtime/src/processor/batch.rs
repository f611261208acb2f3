//! One batch of one projection: begin, the handler (bounded by the handler timeout), the fenced
//! commit. Its outcome goes back to the state machine, which decides what follows.

use std::sync::Arc;

use orchestrator_core::ports::{CheckpointStore, Fence, StoreError};
use orchestrator_core::processing::{Batch, Input, Outcome, TaskId};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Done, Shared};
use crate::Store;

pub(super) async fn process<S: Store>(
    shared: Arc<Shared<S>>,
    task: TaskId,
    projection: usize,
    batch: Batch,
) -> Done {
    let (outcome, error) = run(&shared, projection, &batch).await;
    (Input::Processed { task, outcome }, error)
}

async fn run<S: Store>(
    shared: &Shared<S>,
    projection: usize,
    batch: &Batch,
) -> (Outcome, Option<orchestrator_core::ports::BoxError>) {
    let handler = &shared.projections[projection];
    let name = handler.name();
    let metrics = &shared.metrics;
    let started = Instant::now();
    let mut tx = match shared.store.begin().await {
        Ok(tx) => tx,
        Err(err) => {
            warn!(%err, projection = name, "Event processing failed; retrying");
            return (Outcome::StoreFailed, None);
        }
    };
    let events = batch.events.as_slice();
    if !events.is_empty() {
        // A batch with nothing of the projection's scope only moves its checkpoints.
        match tokio::time::timeout(shared.handler_timeout, handler.handle_batch(&mut tx, events))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => {
                drop(tx);
                metrics.handler_failed(name);
                let index = failure.index.map(|i| i.min(events.len() - 1));
                let event = &events[index.unwrap_or(0)];
                warn!(
                    projection = name,
                    position = %event.position,
                    aggregate = %event.stream,
                    event_type = %event.event_type,
                    error = %failure.source,
                    "Projection handler failed"
                );
                return (Outcome::HandlerFailed { index, timed_out: false }, Some(failure.source));
            }
            Err(_) => {
                // Dropping the transaction rolls the batch back; the handler's future is dropped
                // with it, so a hung handler holds no slot past the timeout.
                drop(tx);
                metrics.handler_failed(name);
                metrics.handler_timed_out(name);
                let timeout = shared.handler_timeout;
                warn!(
                    projection = name,
                    position = %events[0].position,
                    events = events.len(),
                    ?timeout,
                    "Projection handler timed out; its batch was rolled back"
                );
                let error = format!("the handler did not return within {timeout:?}");
                return (
                    Outcome::HandlerFailed { index: None, timed_out: true },
                    Some(error.into()),
                );
            }
        }
    }
    let fence = Fence {
        replica_set: shared.replica_set.clone(),
        worker: shared.worker.clone(),
        grants: batch.grants.clone(),
    };
    let committed = {
        let _one_at_a_time = shared.commit_locks[projection].lock().await;
        CheckpointStore::commit(&shared.store, tx, &fence, name, &batch.checkpoints).await
    };
    match committed {
        Ok(()) => {
            let took = started.elapsed();
            metrics.batch_committed(name, events.len(), took);
            debug!(projection = name, events = events.len(), elapsed = ?took, "Batch committed");
            (Outcome::Committed, None)
        }
        Err(StoreError::Fenced { slot, .. }) => {
            metrics.commit_fenced(name);
            warn!(projection = name, %slot, "Commit fenced: the slot has a new owner");
            (Outcome::Fenced { slot }, None)
        }
        Err(StoreError::CheckpointRegression { slot, .. }) => {
            metrics.commit_fenced(name);
            warn!(projection = name, %slot, "Commit refused: the slot's checkpoint is ahead of this worker");
            (Outcome::Regression { slot }, None)
        }
        Err(err) => {
            warn!(%err, projection = name, "Event processing failed; retrying");
            (Outcome::StoreFailed, None)
        }
    }
}
