//! One batch of one projection: begin, the handler (bounded by the handler timeout), the batch's
//! dead letters, the fenced commit. Its outcome goes back to the state machine, which decides
//! what follows.

use std::collections::BTreeMap;
use std::sync::Arc;

use orchestrator_core::ports::{BoxError, CheckpointStore, Fence, NewDeadLetter, StoreError};
use orchestrator_core::processing::{Batch, Input, Outcome, TaskId};
use orchestrator_core::{Epoch, Event, Position, Slot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Done, ProcessingStore, Shared};
use crate::projection::HandlerError;

pub(super) async fn process<S: ProcessingStore>(
    shared: Arc<Shared<S>>,
    task: TaskId,
    projection: usize,
    batch: Batch,
    letters: Vec<NewDeadLetter>,
) -> Done {
    let started = Instant::now();
    let (outcome, error) = run(&shared, projection, &batch, &letters, started).await;
    (Input::Processed { task, outcome, took: started.elapsed() }, error)
}

async fn run<S: ProcessingStore>(
    shared: &Shared<S>,
    projection: usize,
    batch: &Batch,
    letters: &[NewDeadLetter],
    started: Instant,
) -> (Outcome, Option<BoxError>) {
    let name = shared.projections[projection].name();
    let metrics = &shared.metrics;
    let mut tx = match shared.store.begin().await {
        Ok(tx) => tx,
        Err(err) => {
            warn!(%err, projection = name, "Event processing failed; retrying");
            return (Outcome::StoreFailed, None);
        }
    };
    // A batch with nothing of the projection's scope only moves its checkpoints. A batch of
    // several shared reads calls the handler once per read, each call bounded by the timeout.
    let mut offset = 0;
    for events in batch.events.parts() {
        match call_handler(shared, projection, &mut tx, events).await {
            Handled::Done => offset += events.len(),
            Handled::StoreFailed(error) => {
                drop(tx);
                warn!(projection = name, %error, "The store failed under the handler; retrying");
                return (Outcome::StoreFailed, None);
            }
            Handled::Failed(failure) => {
                drop(tx);
                let permanent = failure.is_permanent();
                let index = failure.index.map(|i| i.min(events.len() - 1));
                let event = &events[index.unwrap_or(0)];
                warn!(
                    projection = name,
                    position = %event.position,
                    aggregate = %event.stream,
                    event_type = %event.event_type,
                    error = %failure.source,
                    permanent,
                    "Projection handler failed"
                );
                let index = index.map(|i| offset + i);
                let outcome = Outcome::HandlerFailed { index, timed_out: false, permanent };
                return (outcome, Some(failure.source));
            }
            Handled::TimedOut => {
                drop(tx);
                let timeout = shared.handler_timeout;
                warn!(
                    projection = name,
                    position = %events[0].position,
                    events = events.len(),
                    ?timeout,
                    "Projection handler timed out; its batch was rolled back"
                );
                return (
                    Outcome::HandlerFailed { index: None, timed_out: true, permanent: false },
                    Some(timed_out_error(timeout)),
                );
            }
        }
    }
    if !letters.is_empty()
        && let Err(err) = shared.store.park(&mut tx, &shared.replica_set, name, letters).await
    {
        warn!(%err, projection = name, "Parking events failed; retrying");
        return (Outcome::StoreFailed, None);
    }
    match commit(shared, projection, tx, &batch.checkpoints, &batch.grants).await {
        Outcome::Committed => {
            let took = started.elapsed();
            metrics.batch_committed(name, batch.events.len(), took);
            if !letters.is_empty() {
                metrics.parked(name, letters.len());
                for letter in letters {
                    warn!(
                        projection = name,
                        position = %letter.position,
                        key = %letter.key,
                        aggregate = %letter.stream,
                        event_type = %letter.event_type,
                        error = %letter.error,
                        "Event parked as a dead letter (failure policy park); see `orchestrator dlq list`"
                    );
                }
            }
            debug!(projection = name, events = batch.events.len(), elapsed = ?took, "Batch committed");
            (Outcome::Committed, None)
        }
        refused => (refused, None),
    }
}

/// How a handler's run on a batch ended.
pub(super) enum Handled {
    Done,
    /// The handler's own query met the store's trouble: not the handler's fault, so not an
    /// attempt.
    StoreFailed(BoxError),
    Failed(HandlerError),
    /// The handler timeout expired; the handler's future was dropped.
    TimedOut,
}

/// Runs `projection`'s handler on `events` in `tx`, bounded by the handler timeout, and counts
/// its failures and timeouts. The caller rolls `tx` back unless it is `Done`; dropping the
/// handler's future with the timeout means a hung handler holds no slot past it.
pub(super) async fn call_handler<S: ProcessingStore>(
    shared: &Shared<S>,
    projection: usize,
    tx: &mut <S as CheckpointStore>::Tx,
    events: &[Event],
) -> Handled {
    let handler = &shared.projections[projection];
    let handled = tokio::time::timeout(shared.handler_timeout, handler.handle_batch(tx, events));
    match handled.await {
        Ok(Ok(())) => Handled::Done,
        Ok(Err(failure)) if shared.store.is_store_failure(&*failure.source) => {
            Handled::StoreFailed(failure.source)
        }
        Ok(Err(failure)) => {
            shared.metrics.handler_failed(handler.name());
            Handled::Failed(failure)
        }
        Err(_) => {
            shared.metrics.handler_failed(handler.name());
            shared.metrics.handler_timed_out(handler.name());
            Handled::TimedOut
        }
    }
}

/// The error a timed-out batch is recorded with.
pub(super) fn timed_out_error(timeout: std::time::Duration) -> BoxError {
    format!("the handler did not return within {timeout:?}").into()
}

/// Commits `tx` with `checkpoints` under the fence of `grants`: `Committed`, or why not.
pub(super) async fn commit<S: ProcessingStore>(
    shared: &Shared<S>,
    projection: usize,
    tx: <S as CheckpointStore>::Tx,
    checkpoints: &BTreeMap<Slot, Position>,
    grants: &BTreeMap<Slot, Epoch>,
) -> Outcome {
    let name = shared.projections[projection].name();
    let fence = Fence {
        replica_set: shared.replica_set.clone(),
        worker: shared.worker.clone(),
        grants: grants.clone(),
    };
    let committed = {
        let _one_at_a_time = shared.commit_locks[projection].lock().await;
        CheckpointStore::commit(&shared.store, tx, &fence, name, checkpoints).await
    };
    match committed {
        Ok(()) => Outcome::Committed,
        Err(StoreError::Fenced { slot, .. }) => {
            shared.metrics.commit_fenced(name);
            warn!(projection = name, %slot, "Commit fenced: the slot has a new owner");
            Outcome::Fenced { slot }
        }
        Err(StoreError::CheckpointRegression { slot, .. }) => {
            shared.metrics.commit_fenced(name);
            warn!(projection = name, %slot, "Commit refused: the slot's checkpoint is ahead of this worker");
            Outcome::Regression { slot }
        }
        Err(err) => {
            warn!(%err, projection = name, "Event processing failed; retrying");
            Outcome::StoreFailed
        }
    }
}
