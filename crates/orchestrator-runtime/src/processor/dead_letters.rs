//! What the store says of the projections (stops, dead-letter requests), and carrying out a retry
//! or skip of a parked key, as the state machine asks.

use std::collections::BTreeMap;
use std::sync::Arc;

use orchestrator_core::ports::{CheckpointStore, DeadLetterAction, NewDeadLetter};
use orchestrator_core::processing::{Input, Outcome, PolledState, TaskId};
use orchestrator_core::{Epoch, Event, Position, Slot};
use tracing::{info, warn};

use super::batch::{Handled, call_handler, commit, timed_out_error};
use super::{Done, ProcessingStore, Shared};

/// Reads the recorded stops, the pending requests and the dead-letter counts; records the
/// `projection_stopped` and `dead_letters` gauges. `None` when the store failed.
pub(super) async fn poll<S: ProcessingStore>(shared: &Shared<S>) -> Option<PolledState> {
    let (store, rs) = (&shared.store, &shared.replica_set);
    let read = async {
        let stopped = CheckpointStore::stopped_projections(store, rs).await?;
        let requests = store.requests(rs).await?;
        let counts = store.dead_letter_counts(rs).await?;
        Ok::<_, orchestrator_core::ports::StoreError>((stopped, requests, counts))
    };
    let (stopped, requests, counts) = match read.await {
        Ok(read) => read,
        Err(err) => {
            warn!(%err, "Reading stopped projections and dead-letter requests failed");
            return None;
        }
    };
    let number = |name: &str| shared.projections.iter().position(|p| p.name() == name);
    let mut state = PolledState::default();
    for stop in &stopped {
        if let Some(projection) = number(&stop.stop.projection) {
            state.stopped.insert(projection);
        }
    }
    for request in requests {
        if let Some(projection) = number(&request.projection) {
            state.requests.push((projection, request.slot, request.key, request.action));
        }
    }
    for (projection, handler) in shared.projections.iter().enumerate() {
        let letters = counts.get(handler.name()).copied().unwrap_or(0);
        shared.metrics.failures(handler.name(), state.stopped.contains(&projection), letters);
    }
    Some(state)
}

/// A retry or skip to carry out.
pub(super) struct Resolve {
    pub(super) key: String,
    pub(super) action: DeadLetterAction,
    pub(super) checkpoints: BTreeMap<Slot, Position>,
    pub(super) grants: BTreeMap<Slot, Epoch>,
}

/// One fenced transaction: for a retry, the key's parked events through the handler; then the
/// key's letters resolved and the checkpoint (unchanged) committed. A retry whose handler fails
/// parks the events again with the new error, fenced the same way.
pub(super) async fn resolve<S: ProcessingStore>(
    shared: Arc<Shared<S>>,
    task: TaskId,
    projection: usize,
    resolve: Resolve,
) -> Done {
    let started = tokio::time::Instant::now();
    let outcome = run(&shared, projection, &resolve).await;
    (Input::Processed { task, outcome, took: started.elapsed() }, None)
}

async fn run<S: ProcessingStore>(
    shared: &Shared<S>,
    projection: usize,
    resolve: &Resolve,
) -> Outcome {
    let name = shared.projections[projection].name();
    let (store, rs, key) = (&shared.store, &shared.replica_set, resolve.key.as_str());
    let parked = match resolve.action {
        DeadLetterAction::Retry => match store.parked_events(rs, name, key).await {
            Ok(parked) => parked,
            Err(err) => {
                warn!(%err, projection = name, key, "Loading parked events failed; retrying");
                return Outcome::StoreFailed;
            }
        },
        DeadLetterAction::Skip => Vec::new(),
    };
    let events: Vec<Event> = parked.into_iter().map(|(_, event)| event).collect();
    let mut tx = match store.begin().await {
        Ok(tx) => tx,
        Err(err) => {
            warn!(%err, projection = name, "Resolving dead letters failed; retrying");
            return Outcome::StoreFailed;
        }
    };
    if !events.is_empty() {
        let failure = match call_handler(shared, projection, &mut tx, &events).await {
            Handled::Done => None,
            Handled::StoreFailed(error) => {
                warn!(projection = name, %error, "The store failed under the handler; retrying");
                return Outcome::StoreFailed;
            }
            Handled::Failed(failure) => Some(failure.source),
            Handled::TimedOut => Some(timed_out_error(shared.handler_timeout)),
        };
        if let Some(error) = failure {
            drop(tx);
            warn!(projection = name, key, %error, "Retrying dead letters failed; they stay parked");
            return park_again(shared, projection, resolve, &events, &error.to_string()).await;
        }
    }
    let resolved = match store.resolve(&mut tx, rs, name, key, resolve.action).await {
        Ok(resolved) => resolved,
        Err(err) => {
            warn!(%err, projection = name, "Resolving dead letters failed; retrying");
            return Outcome::StoreFailed;
        }
    };
    let outcome = commit(shared, projection, tx, &resolve.checkpoints, &resolve.grants).await;
    if outcome == Outcome::Committed {
        match resolve.action {
            DeadLetterAction::Retry => {
                shared.metrics.batch_committed(name, events.len(), std::time::Duration::ZERO);
                info!(
                    projection = name,
                    key,
                    events = events.len(),
                    "Dead letters retried and applied; the key is unparked"
                );
            }
            DeadLetterAction::Skip => {
                info!(
                    projection = name,
                    key,
                    letters = resolved,
                    "Dead letters skipped (recorded); the key is unparked"
                );
            }
        }
    }
    outcome
}

/// A failed retry: the key's events parked again with the new error and one more attempt, the
/// request cleared, in a fenced transaction of its own.
async fn park_again<S: ProcessingStore>(
    shared: &Shared<S>,
    projection: usize,
    resolve: &Resolve,
    events: &[Event],
    error: &str,
) -> Outcome {
    let name = shared.projections[projection].name();
    let letters: Vec<NewDeadLetter> =
        events.iter().map(|event| NewDeadLetter::of(event, error, 1)).collect();
    let mut tx = match shared.store.begin().await {
        Ok(tx) => tx,
        Err(err) => {
            warn!(%err, projection = name, "Parking events again failed; retrying");
            return Outcome::StoreFailed;
        }
    };
    if let Err(err) = shared.store.park(&mut tx, &shared.replica_set, name, &letters).await {
        warn!(%err, projection = name, "Parking events again failed; retrying");
        return Outcome::StoreFailed;
    }
    match commit(shared, projection, tx, &resolve.checkpoints, &resolve.grants).await {
        Outcome::Committed => {
            Outcome::HandlerFailed { index: None, timed_out: false, permanent: true }
        }
        refused => refused,
    }
}
