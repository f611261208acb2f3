//! The processing task: the executor of [`orchestrator_core::processing::Processing`].
//!
//! The state machine decides (which slots and projections a read serves, what each commit
//! checkpoints, when a lagging projection joins the shared read, what follows a failure); this
//! task executes its commands, each one a spawned task (a checkpoint load, a read, one batch of one
//! projection: begin, handler, fenced commit, or a backoff wait), and feeds every outcome back.
//! Batches of different projections and of different slot groups run at the same time, so a slow,
//! retrying or stopped projection never holds the others back.
//!
//! Orders from the coordination task (start a slot under an epoch, stop a slot) go to the state
//! machine, which answers `SlotStopped` only once no batch in flight covers the slot.

mod batch;
mod dead_letters;
mod lag;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ports::{
    BoxError, CheckpointStore, DeadLetterStore, EventStore, NewDeadLetter, ProjectionStop,
};
use orchestrator_core::processing::{
    Command, FailurePolicy, Input, Outcome, ParkCause, Processing, ProcessingConfig, RetryPolicy,
    TaskId,
};
use orchestrator_core::{Epoch, Position, ReplicaSetName, Slot, WorkerId};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::projection::Projection;

pub(crate) use self::lag::LAG_COUNT_LIMIT;

/// The ports the processor works through: events, checkpoints and dead letters. Coordination
/// is the driver's (`worker.rs`); the processor never calls it.
pub(crate) trait ProcessingStore:
    EventStore + DeadLetterStore + Send + Sync + 'static
{
}

impl<T> ProcessingStore for T where T: EventStore + DeadLetterStore + Send + Sync + 'static {}

/// Orders from the coordination task.
#[derive(Debug)]
pub(crate) enum Control {
    Start { slot: Slot, epoch: Epoch },
    Stop { slot: Slot },
}

/// What the processor tells the coordination task.
#[derive(Debug)]
pub(crate) enum Report {
    /// The slot is no longer processed; its last batch of every projection committed or rolled
    /// back.
    Stopped(Slot),
    /// A commit was refused: the slot belongs to someone else now (or was processed further).
    Lost(Slot),
}

/// The processing task's settings and store.
pub(crate) struct Processor<S: ProcessingStore> {
    pub(crate) store: S,
    pub(crate) replica_set: ReplicaSetName,
    pub(crate) worker: WorkerId,
    pub(crate) projections:
        Vec<Arc<dyn Projection<<S as orchestrator_core::ports::CheckpointStore>::Tx>>>,
    pub(crate) batch_size: usize,
    pub(crate) idle_poll: Duration,
    pub(crate) retry: RetryPolicy,
    /// The worker's `FAILURE_POLICY`, for projections that do not say otherwise.
    pub(crate) failure_policy: FailurePolicy,
    pub(crate) wake: Arc<Notify>,
    pub(crate) metrics: Arc<Metrics>,
    /// How often the lag of the owned slots is measured.
    pub(crate) lag_interval: Duration,
    /// Disjoint groups of slots processed at once (`PROCESSING_CONCURRENCY`).
    pub(crate) concurrency: usize,
    /// How long a handler may take on one batch (`HANDLER_TIMEOUT`).
    pub(crate) handler_timeout: Duration,
    /// Memory for shared batches, over all groups (`SHARED_READ_BUFFER_MB`).
    pub(crate) read_buffer_bytes: usize,
}

/// What every spawned task shares.
pub(crate) struct Shared<S: ProcessingStore> {
    pub(crate) store: S,
    pub(crate) replica_set: ReplicaSetName,
    pub(crate) worker: WorkerId,
    pub(crate) projections:
        Vec<Arc<dyn Projection<<S as orchestrator_core::ports::CheckpointStore>::Tx>>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handler_timeout: Duration,
    /// One per projection: its commits go one at a time (the batches themselves do not), so two
    /// groups of one projection never race on the store's per-worker progress row.
    pub(crate) commit_locks: Vec<tokio::sync::Mutex<()>>,
}

/// What a spawned task ran, to answer for it if it panicked.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Load,
    Read,
    Process,
    Wait,
    Poll,
    Record,
}

/// A finished task: the input for the state machine, and the handler's error if it failed.
type Done = (Input, Option<BoxError>);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S: ProcessingStore> Processor<S> {
    pub(crate) async fn run(
        self,
        mut control: mpsc::UnboundedReceiver<Control>,
        reports: mpsc::UnboundedSender<Report>,
    ) {
        let mut machine = Processing::new(ProcessingConfig {
            scopes: self.projections.iter().map(|p| p.scope()).collect(),
            batch_size: self.batch_size,
            groups: self.concurrency,
            window_bytes: self.read_buffer_bytes / self.concurrency.max(1),
            retry: self.retry,
            policies: self
                .projections
                .iter()
                .map(|p| p.failure_policy().unwrap_or(self.failure_policy))
                .collect(),
            slot_count: self.store.slot_count(),
        });
        let shared = Arc::new(Shared {
            commit_locks: self.projections.iter().map(|_| tokio::sync::Mutex::new(())).collect(),
            store: self.store,
            replica_set: self.replica_set,
            worker: self.worker,
            projections: self.projections,
            metrics: self.metrics,
            handler_timeout: self.handler_timeout,
        });
        let mut executor = Executor {
            shared,
            tasks: JoinSet::new(),
            running: BTreeMap::new(),
            errors: BTreeMap::new(),
            stop_errors: BTreeMap::new(),
            reports,
        };
        let mut lag_at = Instant::now();
        let mut measuring: Option<AbortOnDrop> = None;
        let mut poll_at: Option<Instant> = None;
        loop {
            for command in machine.take_commands() {
                executor.execute(command);
            }
            if Instant::now() >= lag_at {
                // Lag (and the horizon stall) is measured on the side, never in the way of a
                // batch; a round is skipped while the previous measurement is still running.
                if measuring.as_ref().is_none_or(|m| m.0.is_finished()) {
                    let queries = machine.lag_queries(LAG_COUNT_LIMIT as usize);
                    let measure = lag::measure(executor.shared.clone(), queries);
                    measuring = Some(AbortOnDrop(tokio::spawn(measure)));
                }
                // Stops recorded by other workers, resumes, and dead-letter requests.
                machine.handle(Input::PollDue);
                lag_at = Instant::now() + self.lag_interval;
                continue;
            }
            if machine.waiting_for_events() {
                poll_at.get_or_insert_with(|| Instant::now() + self.idle_poll);
            } else {
                poll_at = None;
            }
            tokio::select! {
                // Biased (polled in order), so that runs under a paused clock are repeatable.
                biased;
                order = control.recv() => {
                    let Some(order) = order else { return };
                    machine.handle(executor.order(order));
                    // A burst of orders (every slot at start) is planned at once.
                    while let Ok(order) = control.try_recv() {
                        machine.handle(executor.order(order));
                    }
                }
                done = executor.tasks.join_next_with_id(), if !executor.tasks.is_empty() => {
                    let Some(done) = done else { continue };
                    machine.handle(executor.finished(done));
                    while let Some(done) = executor.tasks.try_join_next_with_id() {
                        machine.handle(executor.finished(done));
                    }
                }
                () = self.wake.notified() => {
                    poll_at = None;
                    machine.handle(Input::Wake);
                }
                () = sleep_until(poll_at) => {
                    poll_at = None;
                    machine.handle(Input::Wake);
                }
                () = tokio::time::sleep_until(lag_at) => {}
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the state machine's commands as tasks and turns their ends into inputs.
struct Executor<S: ProcessingStore> {
    shared: Arc<Shared<S>>,
    tasks: JoinSet<Done>,
    running: BTreeMap<tokio::task::Id, (TaskId, Kind)>,
    /// The handler error of each failed batch, until the state machine says whether it stopped
    /// the projection or parked the event.
    errors: BTreeMap<TaskId, BoxError>,
    /// The error of each projection whose stop is being recorded.
    stop_errors: BTreeMap<usize, String>,
    reports: mpsc::UnboundedSender<Report>,
}

impl<S: ProcessingStore> Executor<S> {
    fn order(&self, order: Control) -> Input {
        match order {
            Control::Start { slot, epoch } => Input::Start { slot, epoch },
            Control::Stop { slot } => Input::Stop { slot },
        }
    }

    fn spawn(
        &mut self,
        task: TaskId,
        kind: Kind,
        work: impl std::future::Future<Output = Done> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(work);
        self.running.insert(handle.id(), (task, kind));
    }

    fn execute(&mut self, command: Command) {
        let shared = self.shared.clone();
        match command {
            Command::Load { task, projection, slots } => {
                self.spawn(task, Kind::Load, async move {
                    let name = shared.projections[projection].name();
                    let (store, rs) = (&shared.store, &shared.replica_set);
                    let loaded = match store.load(rs, name, &slots).await {
                        Ok(checkpoints) => {
                            store.parked_keys(rs, name, &slots).await.map(|k| (checkpoints, k))
                        }
                        Err(err) => Err(err),
                    };
                    let (checkpoints, parked) = match loaded {
                        Ok((checkpoints, parked)) => (Some(checkpoints), parked),
                        Err(err) => {
                            warn!(%err, projection = name, "Loading checkpoints failed; retrying");
                            (None, Vec::new())
                        }
                    };
                    (Input::Loaded { task, checkpoints, parked }, None)
                });
            }
            Command::Read { task, request } => {
                self.spawn(task, Kind::Read, async move {
                    let read = shared.store.read(&request).await;
                    if let Err(err) = &read {
                        warn!(%err, "Reading events failed; retrying");
                    }
                    (Input::Read { task, events: read.ok() }, None)
                });
            }
            Command::Process { task, projection, batch } => {
                let letters = self.letters(&batch.park);
                let work = batch::process(shared, task, projection, batch, letters);
                self.spawn(task, Kind::Process, work);
            }
            Command::Resolve { task, projection, key, action, checkpoints, grants } => {
                let resolve = dead_letters::Resolve { key, action, checkpoints, grants };
                let work = dead_letters::resolve(shared, task, projection, resolve);
                self.spawn(task, Kind::Process, work);
            }
            Command::Poll { task } => {
                self.spawn(task, Kind::Poll, async move {
                    let state = dead_letters::poll(&shared).await;
                    (Input::Polled { task, state }, None)
                });
            }
            Command::RecordStop { task, projection, failed, event, attempts } => {
                let error = match self.errors.remove(&failed) {
                    Some(error) => error.to_string(),
                    None => self.stop_errors.get(&projection).cloned().unwrap_or_default(),
                };
                self.stop_errors.insert(projection, error.clone());
                let name = self.shared.projections[projection].name().to_owned();
                let (position, aggregate, event_type) = match event {
                    Some(e) => (e.position, e.stream.to_string(), e.event_type),
                    None => (Default::default(), String::new(), String::new()),
                };
                error!(
                    projection = %name,
                    %position,
                    %aggregate,
                    %event_type,
                    attempts,
                    %error,
                    "Projection stopped on every worker (failure policy stop); the workers go on with the others. Fix the cause, then run `orchestrator projection resume {name}`"
                );
                self.spawn(task, Kind::Record, async move {
                    let stop = ProjectionStop { projection: name, position, aggregate, event_type, error };
                    let recorded =
                        CheckpointStore::stop_projection(&shared.store, &shared.replica_set, &stop)
                            .await;
                    if let Err(err) = &recorded {
                        warn!(%err, projection = %stop.projection, "Recording the stop failed; retrying");
                    }
                    (Input::Recorded { task, ok: recorded.is_ok() }, None)
                });
            }
            Command::ProjectionStopped { projection } => {
                let name = self.shared.projections[projection].name();
                info!(projection = name, "Projection stopped in this worker");
            }
            Command::ProjectionResumed { projection } => {
                self.stop_errors.remove(&projection);
                let name = self.shared.projections[projection].name();
                info!(projection = name, "Projection resumed: going on from its checkpoints");
            }
            Command::Wait { task, delay } => {
                self.spawn(task, Kind::Wait, async move {
                    tokio::time::sleep(delay).await;
                    (Input::Elapsed { task }, None)
                });
            }
            Command::SlotStopped(slot) => {
                let _ = self.reports.send(Report::Stopped(slot));
            }
            Command::SlotLost(slot) => {
                let _ = self.reports.send(Report::Lost(slot));
            }
        }
    }

    /// The dead letters of a batch's parked events, with the error each is parked for.
    fn letters(&self, park: &[orchestrator_core::processing::ParkedEvent]) -> Vec<NewDeadLetter> {
        park.iter()
            .map(|parked| {
                let event = &parked.event;
                let (error, attempts) = match parked.cause {
                    ParkCause::Failed { task, attempts } => (
                        self.errors
                            .get(&task)
                            .map_or_else(|| "the handler failed".to_owned(), ToString::to_string),
                        attempts,
                    ),
                    ParkCause::Behind { since } if since == Position::START => {
                        ("parked behind an earlier dead letter of its partition key".to_owned(), 0)
                    }
                    ParkCause::Behind { since } => (
                        format!(
                            "parked behind the event at position {} of its partition key",
                            since.global
                        ),
                        0,
                    ),
                };
                NewDeadLetter::of(event, error, attempts)
            })
            .collect()
    }

    /// The input a finished task answers with; a panicked one counts as failed.
    fn finished(&mut self, done: Result<(tokio::task::Id, Done), tokio::task::JoinError>) -> Input {
        let (id, result) = match done {
            Ok((id, done)) => (id, Ok(done)),
            Err(err) => (err.id(), Err(err)),
        };
        let (task, kind) = self.running.remove(&id).expect("every task is registered");
        let (input, error) = match result {
            Ok(done) => done,
            Err(err) => {
                error!(%err, "A processing task panicked; counted as a failed attempt");
                let input = match kind {
                    Kind::Load => Input::Loaded { task, checkpoints: None, parked: Vec::new() },
                    Kind::Read => Input::Read { task, events: None },
                    Kind::Wait => Input::Elapsed { task },
                    Kind::Poll => Input::Polled { task, state: None },
                    Kind::Record => Input::Recorded { task, ok: false },
                    Kind::Process => Input::Processed {
                        task,
                        took: std::time::Duration::ZERO,
                        outcome: Outcome::HandlerFailed {
                            index: None,
                            timed_out: false,
                            permanent: false,
                        },
                    },
                };
                (input, Some(format!("the handler panicked: {err}").into()))
            }
        };
        if let Some(error) = error {
            // Only the latest failure of a lane can stop its projection; keep a few.
            self.errors.insert(task, error);
            while self.errors.len() > 64 {
                self.errors.pop_first();
            }
        }
        input
    }
}
