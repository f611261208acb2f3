//! The processing task: reads the events of the slots this worker owns, one query per batch and
//! projection, runs the handlers in the store's transaction, and commits under the fence.
//!
//! It takes orders from the coordination task (start a slot under an epoch, stop a slot) only
//! between batches, so a batch in flight always finishes (commits or rolls back) before its slot is
//! reported stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ports::{CheckpointStore, Fence, ReadRequest, StoreError};
use orchestrator_core::{Epoch, Event, Position, ReplicaSetName, Slot, WorkerId};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::Store;
use crate::error::RunError;
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::RetryPolicy;

/// Lag is counted up to this many events per projection: enough for alerts and autoscaling, and
/// the count costs at most this many index entries however far behind the worker is.
pub(crate) const LAG_COUNT_LIMIT: usize = 100_000;

/// Orders from the coordination task.
#[derive(Debug)]
pub(crate) enum Control {
    Start { slot: Slot, epoch: Epoch },
    Stop { slot: Slot },
}

/// What the processor tells the coordination task.
#[derive(Debug)]
pub(crate) enum Report {
    /// The slot is no longer processed; its last batch committed or rolled back.
    Stopped(Slot),
    /// A commit was fenced: the slot belongs to someone else now.
    Lost(Slot),
    /// A projection failed for good; processing stopped.
    Failed(RunError),
}

pub(crate) struct Processor<S: Store> {
    pub(crate) store: S,
    pub(crate) replica_set: ReplicaSetName,
    pub(crate) worker: WorkerId,
    pub(crate) projections: Vec<Arc<dyn Projection<<S as CheckpointStore>::Tx>>>,
    pub(crate) batch_size: usize,
    pub(crate) idle_poll: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) wake: Arc<Notify>,
    pub(crate) metrics: Arc<Metrics>,
    /// How often the lag of the owned slots is measured.
    pub(crate) lag_interval: Duration,
}

/// A slot being processed: its epoch, and per projection the position read up to.
struct OwnedSlot {
    epoch: Epoch,
    cursors: Vec<Position>,
}

/// Projection `index`'s cursor of every owned slot.
fn cursors_of(owned: &BTreeMap<Slot, OwnedSlot>, index: usize) -> Vec<(Slot, Position)> {
    owned.iter().map(|(slot, o)| (*slot, o.cursors[index])).collect()
}

enum BatchOutcome {
    Committed,
    Lost(Slot),
    Failed(RunError),
}

impl<S: Store> Processor<S> {
    pub(crate) async fn run(
        self,
        mut control: mpsc::UnboundedReceiver<Control>,
        reports: mpsc::UnboundedSender<Report>,
    ) {
        let mut owned: BTreeMap<Slot, OwnedSlot> = BTreeMap::new();
        let mut failed = false;
        let mut lag_measured: Option<Instant> = None;
        loop {
            if lag_measured.is_none_or(|at| at.elapsed() >= self.lag_interval) {
                self.measure_lag(&owned).await;
                lag_measured = Some(Instant::now());
            }
            // Apply orders between batches.
            while let Ok(order) = control.try_recv() {
                self.apply(order, &mut owned, &reports).await;
            }
            if owned.is_empty() || failed {
                tokio::select! {
                    // Biased (polled in order), so that runs under a paused clock are repeatable.
                    biased;
                    order = control.recv() => match order {
                        Some(order) => self.apply(order, &mut owned, &reports).await,
                        None => return,
                    },
                    // Keeps the lag (and horizon) figures fresh while nothing is owned.
                    () = tokio::time::sleep(self.lag_interval) => {}
                }
                continue;
            }
            let mut progressed = false;
            for index in 0..self.projections.len() {
                match self.step(index, &mut owned).await {
                    Ok(Some(BatchOutcome::Committed)) => progressed = true,
                    Ok(Some(BatchOutcome::Lost(slot))) => {
                        owned.remove(&slot);
                        let _ = reports.send(Report::Lost(slot));
                        progressed = true;
                        break;
                    }
                    Ok(Some(BatchOutcome::Failed(err))) => {
                        error!(%err, "Projection stopped");
                        let _ = reports.send(Report::Failed(err));
                        failed = true;
                        break;
                    }
                    Ok(None) => {}
                    Err(err) => {
                        warn!(%err, "Event processing failed; retrying");
                        tokio::time::sleep(
                            self.retry.initial_backoff.max(Duration::from_millis(100)),
                        )
                        .await;
                        // A commit that failed may have been written all the same (the connection
                        // dropped after COMMIT): the store's checkpoints say where to go on from,
                        // or the batch would take effect twice.
                        self.reload_cursors(index, &mut owned).await;
                    }
                }
            }
            if !progressed && !failed {
                tokio::select! {
                    biased;
                    order = control.recv() => match order {
                        Some(order) => self.apply(order, &mut owned, &reports).await,
                        None => return,
                    },
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.idle_poll) => {}
                }
            }
        }
    }

    async fn apply(
        &self,
        order: Control,
        owned: &mut BTreeMap<Slot, OwnedSlot>,
        reports: &mpsc::UnboundedSender<Report>,
    ) {
        match order {
            Control::Start { slot, epoch } => {
                let mut cursors = Vec::with_capacity(self.projections.len());
                for projection in &self.projections {
                    cursors.push(self.load_checkpoint(projection.name(), slot).await);
                }
                owned.insert(slot, OwnedSlot { epoch, cursors });
            }
            Control::Stop { slot } => {
                owned.remove(&slot);
                let _ = reports.send(Report::Stopped(slot));
            }
        }
    }

    /// Records each projection's lag over the owned slots, and the read horizon's stall. Failures
    /// only leave the previous figures in place: lag is a measurement, not a reason to stop.
    async fn measure_lag(&self, owned: &BTreeMap<Slot, OwnedSlot>) {
        for (index, projection) in self.projections.iter().enumerate() {
            let request = ReadRequest {
                cursors: cursors_of(owned, index),
                scope: projection.scope(),
                limit: LAG_COUNT_LIMIT,
            };
            match self.store.backlog(&request).await {
                Ok(backlog) => {
                    self.metrics.lag(projection.name(), backlog.events, backlog.oldest_age)
                }
                Err(err) => debug!(%err, projection = projection.name(), "Measuring lag failed"),
            }
        }
        match self.store.read_horizon_stall().await {
            Ok(stall) => self.metrics.horizon_stall(stall.unwrap_or_default()),
            Err(err) => debug!(%err, "Measuring the read horizon failed"),
        }
    }

    /// Replaces projection `index`'s cursors of every owned slot with the stored checkpoints.
    async fn reload_cursors(&self, index: usize, owned: &mut BTreeMap<Slot, OwnedSlot>) {
        let name = self.projections[index].name();
        for (slot, o) in owned.iter_mut() {
            o.cursors[index] = self.load_checkpoint(name, *slot).await;
        }
    }

    /// Loads a checkpoint, retrying transient errors: a slot cannot start without it.
    async fn load_checkpoint(&self, projection: &str, slot: Slot) -> Position {
        let mut attempt = 0;
        loop {
            match self.store.load(&self.replica_set, projection, &[slot]).await {
                Ok(loaded) => return loaded.get(&slot).copied().unwrap_or(Position::START),
                Err(err) => {
                    attempt += 1;
                    warn!(%err, projection, %slot, "Loading a checkpoint failed; retrying");
                    tokio::time::sleep(self.retry.backoff(attempt).max(Duration::from_millis(100)))
                        .await;
                }
            }
        }
    }

    /// Reads and handles one batch for projection `index`; `None` when there was nothing to read.
    async fn step(
        &self,
        index: usize,
        owned: &mut BTreeMap<Slot, OwnedSlot>,
    ) -> Result<Option<BatchOutcome>, StoreError> {
        let projection = &self.projections[index];
        let mut request = ReadRequest {
            cursors: cursors_of(owned, index),
            scope: projection.scope(),
            limit: self.batch_size,
        };
        let events = self.store.read(&request).await?;
        if events.is_empty() {
            return Ok(None);
        }
        let outcome = self.handle_with_retries(projection.as_ref(), index, &events, owned).await?;
        if let BatchOutcome::Committed = outcome {
            request.advance_past(&events);
            for (slot, position) in request.cursors {
                if let Some(o) = owned.get_mut(&slot) {
                    o.cursors[index] = position;
                }
            }
        }
        Ok(Some(outcome))
    }

    async fn handle_with_retries(
        &self,
        projection: &dyn Projection<<S as CheckpointStore>::Tx>,
        index: usize,
        events: &[Event],
        owned: &BTreeMap<Slot, OwnedSlot>,
    ) -> Result<BatchOutcome, StoreError> {
        // The batch is the first events after every owned slot's cursor, so every owned slot whose
        // cursor is not already past it is processed up to the batch's last event: all of them
        // advance to that one position, which stores can record in a single row.
        let last = events.last().expect("a batch is never empty").position;
        let checkpoints: BTreeMap<Slot, Position> = owned
            .iter()
            .filter(|(_, o)| o.cursors[index] <= last)
            .map(|(slot, _)| (*slot, last))
            .collect();
        let fence = Fence {
            replica_set: self.replica_set.clone(),
            worker: self.worker.clone(),
            grants: checkpoints.keys().map(|slot| (*slot, owned[slot].epoch)).collect(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let mut tx = self.store.begin().await?;
            match projection.handle_batch(&mut tx, events).await {
                Ok(()) => {}
                Err(failure) => {
                    drop(tx);
                    self.metrics.handler_failed(projection.name());
                    let event = &events[failure.index.unwrap_or(0).min(events.len() - 1)];
                    warn!(
                        projection = projection.name(),
                        position = %event.position,
                        aggregate = %event.stream,
                        event_type = %event.event_type,
                        attempt,
                        error = %failure.source,
                        "Projection handler failed"
                    );
                    if attempt >= self.retry.max_attempts {
                        return Ok(BatchOutcome::Failed(RunError::ProjectionFailed {
                            projection: projection.name().to_owned(),
                            position: event.position,
                            aggregate: event.stream.to_string(),
                            event_type: event.event_type.clone(),
                            attempts: attempt,
                            source: failure.source,
                        }));
                    }
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    continue;
                }
            }
            return match self.store.commit(tx, &fence, projection.name(), &checkpoints).await {
                Ok(()) => {
                    let took = started.elapsed();
                    self.metrics.batch_committed(projection.name(), events.len(), took);
                    debug!(projection = projection.name(), events = events.len(), elapsed = ?took, "Batch committed");
                    Ok(BatchOutcome::Committed)
                }
                Err(StoreError::Fenced { slot, .. }) => {
                    self.metrics.commit_fenced(projection.name());
                    warn!(projection = projection.name(), %slot, "Commit fenced: the slot has a new owner");
                    Ok(BatchOutcome::Lost(slot))
                }
                Err(StoreError::CheckpointRegression { slot, .. }) => {
                    self.metrics.commit_fenced(projection.name());
                    // Someone else processed this slot further: it is no longer ours to process.
                    warn!(projection = projection.name(), %slot, "Commit refused: the slot's checkpoint is ahead of this worker");
                    Ok(BatchOutcome::Lost(slot))
                }
                Err(err) => Err(err),
            };
        }
    }
}
