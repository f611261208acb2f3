//! Processing decisions of one worker: which slots and projections a read serves, what a commit
//! checkpoints, when a lagging projection joins the shared read, and what follows a failure.
//!
//! [`Processing`] is a deterministic state machine, like the coordination [`Engine`](crate::Engine):
//! the runtime's processor feeds it orders and results ([`Input`]), takes the [`Command`]s it asks
//! for (load checkpoints, read, process a batch, wait, report) and executes each one (one port call
//! or one handler run), concurrently, feeding every outcome back. No IO, no clock: backoffs are
//! durations the runtime waits.
//!
//! The owned slots are split into `groups` disjoint groups (`PROCESSING_CONCURRENCY`); a slot
//! stays in the group it started in. In each group every projection has a *lane* that handles one
//! batch at a time. One *shared stream* per group reads the group's slots once for every lane that
//! stands at its position, in the covering scope of all projections, and keeps the batches its
//! slowest lane has not taken yet, up to a memory budget (`window_bytes`), so lanes of different
//! speeds keep sharing; a lane further behind reads alone and rejoins through cursor equality (docs/ARCHITECTURE.md, "The processing model", states the
//! invariants this module keeps).

mod batch_events;
mod failure;
mod group;
mod lag;

use std::collections::BTreeMap;
use std::time::Duration;

pub use self::batch_events::BatchEvents;
pub use self::failure::{
    AfterFailure, Failure, FailurePolicy, MAX_STORE_BACKOFF, RetryPolicy, after_failure,
};
pub use self::lag::{Density, LAG_COUNT_LIMIT, LagEstimate, LagPart, estimate_lag};

use self::group::{Group, Out, StopInfo, Task};
use crate::event::{Event, Position, Scope, StreamId};
use crate::ids::Epoch;
use crate::ports::{DeadLetterAction, ReadRequest};
use crate::slot::{Slot, SlotCount};

/// Identifies one command the runtime executes, and the input that answers it.
pub type TaskId = u64;

/// Shared batches a lane takes in one transaction at most, when that many wait for it.
///
/// Each costs a transaction and a fenced commit less; the bound keeps a transaction's length
/// (and the locks its handler's writes hold) to a few handler calls.
pub const MAX_SHARED_PER_BATCH: usize = 4;

/// The time a lane's batch of shared batches taken together is meant to stay within, judged by
/// its last committed batch: a lane whose batch of one read took longer takes one read at a
/// time.
///
/// Taking reads together saves a transaction's cost (about a millisecond) per read, which only
/// matters while a read's handling is short; past that it would only hold a transaction's locks
/// longer (SQLite's one write lock, read-model rows, a slot being handed over).
pub const SHARED_BATCH_BUDGET: Duration = Duration::from_millis(25);

/// Memory a worker gives its shared batches by default, over all its groups: 128 MiB.
pub const DEFAULT_WINDOW_BYTES: usize = 128 << 20;

/// What an event is taken to weigh in memory, for the shared window's budget: the struct and
/// what its strings and payload hold.
pub fn event_size(event: &Event) -> usize {
    let tracing =
        [&event.tracing.causation_id, &event.tracing.correlation_id, &event.tracing.trace_id]
            .iter()
            .map(|s| s.as_ref().map_or(0, String::len))
            .sum::<usize>();
    std::mem::size_of::<Event>()
        + event.payload.len()
        + event.metadata.len()
        + event.stream.bounded_context.len()
        + event.stream.aggregate_type.len()
        + event.stream.aggregate_id.len()
        + event.partition_key.len()
        + event.event_type.len()
        + tracing
}

/// What the state machine needs to know, fixed for a worker's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessingConfig {
    /// Each projection's scope, in the order the runtime numbers them.
    pub scopes: Vec<Scope>,
    /// Events per read.
    pub batch_size: usize,
    /// Disjoint groups of slots handled at once (at least 1).
    pub groups: usize,
    /// Memory each group may hold in shared batches that lanes still have to take (by
    /// [`event_size`]); past it the slowest lanes are left to read alone.
    pub window_bytes: usize,
    /// Handler retries and backoffs.
    pub retry: RetryPolicy,
    /// Each projection's failure policy, in the order of `scopes` (missing: `stop`).
    pub policies: Vec<FailurePolicy>,
    /// Slot count of the replica set.
    pub slot_count: SlotCount,
}

/// Something that happened, fed to [`Processing::handle`].
#[derive(Debug)]
pub enum Input {
    /// The coordination task started a slot under an epoch.
    Start {
        /// The slot.
        slot: Slot,
        /// The epoch every commit of it is fenced with.
        epoch: Epoch,
    },
    /// The coordination task stops a slot; [`Command::SlotStopped`] answers once its last batch
    /// of every projection committed or rolled back.
    Stop {
        /// The slot.
        slot: Slot,
    },
    /// A [`Command::Load`] returned (`None`: it failed).
    Loaded {
        /// The command's task.
        task: TaskId,
        /// The checkpoint of each requested slot.
        checkpoints: Option<BTreeMap<Slot, Position>>,
        /// The partition keys of those slots with dead letters of the projection (ignored when
        /// `checkpoints` is `None`).
        parked: Vec<(Slot, String)>,
    },
    /// A [`Command::Read`] returned (`None`: it failed).
    Read {
        /// The command's task.
        task: TaskId,
        /// The events read.
        events: Option<Vec<Event>>,
    },
    /// A [`Command::Process`] (or [`Command::Resolve`]) finished.
    Processed {
        /// The command's task.
        task: TaskId,
        /// How it ended.
        outcome: Outcome,
        /// How long it took, from `begin` to the commit's answer: a committed batch's time sets
        /// how many shared batches its lane takes together next ([`SHARED_BATCH_BUDGET`]).
        took: Duration,
    },
    /// A [`Command::Wait`] elapsed.
    Elapsed {
        /// The command's task.
        task: TaskId,
    },
    /// New events may have been appended (a notification, or the poll interval passed): readers
    /// that had reached the end read again.
    Wake,
    /// Time to look at what the store says of the projections (every heartbeat interval):
    /// answered by a [`Command::Poll`] unless one is in flight.
    PollDue,
    /// A [`Command::Poll`] returned (`None`: it failed; the next one is due at the next interval).
    Polled {
        /// The command's task.
        task: TaskId,
        /// What the store says.
        state: Option<PolledState>,
    },
    /// A [`Command::RecordStop`] returned.
    Recorded {
        /// The command's task.
        task: TaskId,
        /// Whether the store has the record.
        ok: bool,
    },
}

/// What the store says of a worker's projections, read by a [`Command::Poll`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolledState {
    /// The projections recorded as stopped (by number).
    pub stopped: std::collections::BTreeSet<usize>,
    /// Retries and skips of parked keys asked for: (projection, the key's slot, key, action).
    pub requests: Vec<(usize, Slot, String, DeadLetterAction)>,
}

/// How a [`Command::Process`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler's writes and the checkpoints committed.
    Committed,
    /// The handler failed on the event at `index` (if known), or did not return in time; the
    /// transaction was rolled back. For a [`Command::Resolve`] retry, the runtime has parked the
    /// key's events again with the new error.
    HandlerFailed {
        /// Index in the batch of the failing event.
        index: Option<usize>,
        /// Whether the handler timeout expired.
        timed_out: bool,
        /// The handler said the error is permanent: no retry helps.
        permanent: bool,
    },
    /// The commit was refused: `slot` is someone else's.
    Fenced {
        /// The slot.
        slot: Slot,
    },
    /// The commit was refused: `slot`'s stored checkpoint is ahead.
    Regression {
        /// The slot.
        slot: Slot,
    },
    /// A store call (begin, commit) failed; whether the commit was written is unknown.
    StoreFailed,
}

/// One batch for one projection: handle `events` in a transaction, park `park` in it, then commit
/// `checkpoints` under the fence of `grants`.
///
/// A lane behind its shared read takes the shared batches waiting for it together (up to
/// [`MAX_SHARED_PER_BATCH`]): one transaction and one commit for all of them, the handler called
/// once per part of `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The events to apply, in order (empty: nothing to apply; commit the checkpoints (and park
    /// `park`) only, without calling the handler).
    pub events: BatchEvents,
    /// Events of parked keys, to write as dead letters in the same transaction.
    pub park: Vec<ParkedEvent>,
    /// Every slot the batch advances, with its new checkpoint.
    pub checkpoints: BTreeMap<Slot, Position>,
    /// The epoch of each slot in `checkpoints`, as granted when the batch was handed out.
    pub grants: BTreeMap<Slot, Epoch>,
}

/// An event to park, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// The event.
    pub event: Event,
    /// Why it is parked.
    pub cause: ParkCause,
}

/// Why an event is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkCause {
    /// Its handler gave up on it: the error is the one of this [`Command::Process`].
    Failed {
        /// The failed command (the runtime kept its error).
        task: TaskId,
        /// Attempts made.
        attempts: u32,
    },
    /// An earlier event of its key is parked (at `since`, or already in the store when
    /// `since` is [`Position::START`]).
    Behind {
        /// Where its key was parked.
        since: Position,
    },
}

/// The event a projection stopped at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEvent {
    /// Its position.
    pub position: Position,
    /// Its stream.
    pub stream: StreamId,
    /// Its type.
    pub event_type: String,
}

/// What the runtime is asked to do. Every command with a task is answered by one input with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Load a projection's checkpoints of some slots: [`Input::Loaded`].
    Load {
        /// Answer with this task.
        task: TaskId,
        /// The projection's number.
        projection: usize,
        /// The slots.
        slots: Vec<Slot>,
    },
    /// Read events: [`Input::Read`].
    Read {
        /// Answer with this task.
        task: TaskId,
        /// What to read.
        request: ReadRequest,
    },
    /// Begin a transaction, run the projection's handler on the batch (bounded by the handler
    /// timeout), commit the checkpoints under the fence: [`Input::Processed`].
    Process {
        /// Answer with this task.
        task: TaskId,
        /// The projection's number.
        projection: usize,
        /// The batch.
        batch: Batch,
    },
    /// Wait, then answer [`Input::Elapsed`].
    Wait {
        /// Answer with this task.
        task: TaskId,
        /// How long.
        delay: Duration,
    },
    /// A stopped slot's last batch of every projection committed or rolled back.
    SlotStopped(Slot),
    /// A commit was refused for this slot; nothing covers it any more.
    SlotLost(Slot),
    /// A projection gave up on an event under the `stop` policy: record the stop in the store
    /// ([`CheckpointStore::stop_projection`](crate::ports::CheckpointStore::stop_projection)),
    /// so that every worker stops it; answered by [`Input::Recorded`].
    RecordStop {
        /// Answer with this task.
        task: TaskId,
        /// The projection's number.
        projection: usize,
        /// The [`Command::Process`] whose failure stopped it (the runtime kept its error).
        failed: TaskId,
        /// The event it failed on (the first of the batch when the handler did not say).
        event: Option<FailedEvent>,
        /// Attempts made.
        attempts: u32,
    },
    /// Read the recorded stops and the pending dead-letter requests: [`Input::Polled`].
    Poll {
        /// Answer with this task.
        task: TaskId,
    },
    /// Carry out a retry or skip of a parked key in one fenced transaction: for a retry, load the
    /// key's parked events, run the handler on them; then resolve the key's letters and commit
    /// `checkpoints` (unchanged positions) under `grants`: [`Input::Processed`]. When a retry's
    /// handler fails, park the events again with the new error (in a transaction of its own,
    /// fenced the same way) and answer `HandlerFailed`.
    Resolve {
        /// Answer with this task.
        task: TaskId,
        /// The projection's number.
        projection: usize,
        /// The key.
        key: String,
        /// What to do.
        action: DeadLetterAction,
        /// The key's slot at the lane's cursor.
        checkpoints: BTreeMap<Slot, Position>,
        /// The slot's epoch.
        grants: BTreeMap<Slot, Epoch>,
    },
    /// A projection stopped in this worker (it gave up on an event, or the store says it
    /// stopped elsewhere): its lanes stop at their next batch boundary.
    ProjectionStopped {
        /// The projection's number.
        projection: usize,
    },
    /// A stopped projection was resumed (its stop record is gone): its lanes reload their
    /// checkpoints and go on from the failing event.
    ProjectionResumed {
        /// The projection's number.
        projection: usize,
    },
}

/// One lag count that serves one or more projections (those with the same cursors and scope).
#[derive(Debug, Clone, PartialEq)]
pub struct LagQuery {
    /// The count to ask `backlog` for (its limit is the count limit).
    pub request: ReadRequest,
    /// Every lane it covers was at least a batch behind at its last read: a count would only
    /// reach the limit, so with the store's last position known the count can be skipped (asked
    /// with limit 0, for the age alone) and the estimate used.
    pub behind: bool,
    /// Each projection it serves, with its per-group parts for the estimate above the limit.
    pub projections: Vec<(usize, Vec<LagPart>)>,
}

/// The covering scope of several: a scope that includes every event any of them includes
/// (an over-approximation: a shared read filters per projection afterwards).
pub fn covering_scope(scopes: &[Scope]) -> Scope {
    fn union(lists: Vec<&Vec<String>>) -> Vec<String> {
        if lists.is_empty() || lists.iter().any(|list| list.is_empty()) {
            return Vec::new();
        }
        let mut all: Vec<String> = lists.into_iter().flatten().cloned().collect();
        all.sort();
        all.dedup();
        all
    }
    Scope {
        aggregate_types: union(scopes.iter().map(|s| &s.aggregate_types).collect()),
        bounded_contexts: union(scopes.iter().map(|s| &s.bounded_contexts).collect()),
    }
}

/// The configuration with what every group derives from it.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) scopes: Vec<Scope>,
    pub(crate) covering: Scope,
    /// Whether a projection's scope is the covering scope (its batches need no filtering).
    pub(crate) unfiltered: Vec<bool>,
    pub(crate) batch_size: usize,
    pub(crate) window_bytes: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) policies: Vec<FailurePolicy>,
    pub(crate) slot_count: SlotCount,
}

/// Where a projection stands in this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopState {
    Running,
    /// It gave up on an event; the stop is being recorded in the store.
    Recording {
        task: TaskId,
        failed: TaskId,
        attempts: u32,
    },
    /// Stopped, as the store says (or this worker recorded) since completion `since`.
    Stopped {
        since: u64,
    },
}

/// The processing state machine of one worker (see the module docs).
#[derive(Debug)]
pub struct Processing {
    config: Config,
    groups: Vec<Group>,
    slot_group: BTreeMap<Slot, usize>,
    tasks: BTreeMap<TaskId, Task>,
    next_task: TaskId,
    commands: Vec<Command>,
    stopped: Vec<StopState>,
    /// The event of each projection's pending stop record.
    stop_events: BTreeMap<usize, Option<FailedEvent>>,
    /// Counts store writes that change what a poll reads (stop records, resolved keys): a poll
    /// issued before one of them completed cannot undo it.
    completions: u64,
    /// The poll in flight, with the completion count when it was issued.
    polling: Option<(TaskId, u64)>,
    /// Store errors in a row, whatever the call: the next wait after one grows with it
    /// ([`RetryPolicy::store_backoff`]); any store answer resets it.
    store_failures: u32,
}

impl Processing {
    /// A worker processing nothing yet.
    pub fn new(config: ProcessingConfig) -> Self {
        let covering = covering_scope(&config.scopes);
        let projections = config.scopes.len();
        let groups = config.groups.max(1);
        let config = Config {
            unfiltered: config.scopes.iter().map(|s| *s == covering).collect(),
            covering,
            scopes: config.scopes,
            batch_size: config.batch_size.max(1),
            window_bytes: config.window_bytes,
            retry: config.retry,
            policies: (0..projections)
                .map(|p| config.policies.get(p).copied().unwrap_or_default())
                .collect(),
            slot_count: config.slot_count,
        };
        Self {
            groups: (0..groups).map(|g| Group::new(g, projections)).collect(),
            config,
            slot_group: BTreeMap::new(),
            tasks: BTreeMap::new(),
            next_task: 1,
            commands: Vec::new(),
            stopped: vec![StopState::Running; projections],
            stop_events: BTreeMap::new(),
            completions: 0,
            polling: None,
            store_failures: 0,
        }
    }

    /// Feeds one input; [`Processing::take_commands`] then says what follows.
    pub fn handle(&mut self, input: Input) {
        self.count_store_answer(&input);
        let mut stops = Vec::new();
        let mut out = Out {
            next_task: &mut self.next_task,
            tasks: &mut self.tasks,
            commands: &mut self.commands,
            completions: &mut self.completions,
            store_failures: self.store_failures,
        };
        match input {
            Input::Start { slot, epoch } => {
                let group = match self.slot_group.get(&slot) {
                    Some(group) => *group,
                    None => {
                        let group = (0..self.groups.len())
                            .min_by_key(|g| (self.groups[*g].load(), *g))
                            .expect("at least one group");
                        self.slot_group.insert(slot, group);
                        group
                    }
                };
                self.groups[group].start(slot, epoch);
            }
            Input::Stop { slot } => match self.slot_group.get(&slot).copied() {
                Some(group) => {
                    if self.groups[group].stop(slot, &mut out) {
                        self.slot_group.remove(&slot);
                    }
                }
                None => out.emit(Command::SlotStopped(slot)),
            },
            Input::Wake => {
                for group in &mut self.groups {
                    group.wake();
                }
            }
            Input::Loaded { task, checkpoints, parked } => match out.tasks.remove(&task) {
                Some(Task::PendingLoad { group, projection }) => self.groups[group]
                    .on_pending_loaded(
                        projection,
                        task,
                        checkpoints,
                        parked,
                        &self.config,
                        &mut out,
                    ),
                Some(Task::Reload { group, lane }) => {
                    stops.extend(self.groups[group].on_reloaded(
                        lane,
                        task,
                        checkpoints,
                        parked,
                        &self.config,
                        &mut out,
                    ));
                }
                _ => {}
            },
            Input::PollDue => {
                if self.polling.is_none() {
                    let task = out.task(Task::Poll);
                    out.emit(Command::Poll { task });
                    self.polling = Some((task, *out.completions));
                }
            }
            Input::Polled { task, state } => {
                out.tasks.remove(&task);
                if let Some((current, issued)) = self.polling
                    && current == task
                {
                    self.polling = None;
                    if let Some(state) = state {
                        self.on_polled(state, issued);
                    }
                }
            }
            Input::Recorded { task, ok } => {
                out.tasks.remove(&task);
                self.on_recorded(task, ok);
            }
            Input::Read { task, events } => match out.tasks.remove(&task) {
                Some(Task::SharedRead { group }) => {
                    self.groups[group].on_shared_read(task, events, &self.config, &mut out)
                }
                Some(Task::SoloRead { group, lane }) => {
                    stops.extend(self.groups[group].on_solo_read(
                        lane,
                        task,
                        events,
                        &self.config,
                        &mut out,
                    ));
                }
                _ => {}
            },
            Input::Processed { task, outcome, took } => {
                if let Some(Task::Process { group, lane }) = out.tasks.remove(&task) {
                    stops.extend(self.groups[group].on_processed(
                        lane,
                        task,
                        outcome,
                        took,
                        &self.config,
                        &mut out,
                    ));
                }
            }
            Input::Elapsed { task } => match out.tasks.remove(&task) {
                Some(Task::PendingLoadWait { group, projection }) => {
                    self.groups[group].on_load_wait_elapsed(projection, task)
                }
                Some(Task::SharedWait { group }) => self.groups[group].on_shared_wait_elapsed(task),
                Some(Task::LaneWait { group, lane }) => {
                    self.groups[group].on_lane_wait_elapsed(lane, task, &mut out)
                }
                Some(Task::RecordWait { projection }) => self.retry_record(projection),
                _ => {}
            },
        }
        for stop in stops {
            self.stop_projection(stop);
        }
    }

    /// Works out what follows the inputs handled since the last call and returns the commands,
    /// in order. Feeding every input at hand before calling it (a burst of slot starts, say) lets
    /// one command serve them all (one checkpoint load for every slot started together).
    pub fn take_commands(&mut self) -> Vec<Command> {
        self.poll();
        std::mem::take(&mut self.commands)
    }

    /// Whether some reader reached the end of the events and waits for [`Input::Wake`].
    pub fn waiting_for_events(&self) -> bool {
        self.groups.iter().any(Group::waiting_for_events)
    }

    /// Commands handed out and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Whether a projection is stopped in this worker (or its stop is being recorded).
    pub fn is_stopped(&self, projection: usize) -> bool {
        self.stopped.get(projection).is_some_and(|s| *s != StopState::Running)
    }

    /// The slots being processed (started, checkpoints loaded), by group.
    pub fn groups(&self) -> Vec<Vec<Slot>> {
        self.groups.iter().map(Group::active_slots).collect()
    }

    /// A projection's cursors over every processed slot.
    pub fn cursors(&self, projection: usize) -> BTreeMap<Slot, Position> {
        self.groups.iter().flat_map(|g| g.lane_cursors(projection)).collect()
    }

    /// The lag counts to make, one per distinct (cursors, scope), with `limit` as their limit.
    pub fn lag_queries(&self, limit: usize) -> Vec<LagQuery> {
        let mut queries: Vec<LagQuery> = Vec::new();
        for projection in 0..self.config.scopes.len() {
            let mut cursors: Vec<(Slot, Position)> = Vec::new();
            let mut parts = Vec::new();
            let mut behind = true;
            for group in &self.groups {
                behind &= group.lane_behind(projection);
                if let Some((group_cursors, part)) = group.lag_part(projection, &self.config) {
                    cursors.extend(group_cursors);
                    parts.push(part);
                }
            }
            cursors.sort();
            let request =
                ReadRequest { cursors, scope: self.config.scopes[projection].clone(), limit };
            match queries.iter_mut().find(|q| q.request == request) {
                Some(query) => {
                    query.behind &= behind;
                    query.projections.push((projection, parts));
                }
                None => queries.push(LagQuery {
                    request,
                    behind,
                    projections: vec![(projection, parts)],
                }),
            }
        }
        queries
    }

    /// A lane gave up under the `stop` policy: every lane of the projection stops, and the stop
    /// is recorded so that every worker stops it.
    fn stop_projection(&mut self, stop: StopInfo) {
        if self.stopped[stop.projection] != StopState::Running {
            return;
        }
        self.halt(stop.projection);
        self.stop_events.insert(stop.projection, stop.event);
        self.record_stop(stop.projection, stop.task, stop.attempts);
    }

    fn record_stop(&mut self, projection: usize, failed: TaskId, attempts: u32) {
        let task = self.next_task;
        self.next_task += 1;
        self.tasks.insert(task, Task::Record);
        self.stopped[projection] = StopState::Recording { task, failed, attempts };
        self.commands.push(Command::RecordStop {
            task,
            projection,
            failed,
            event: self.stop_events.get(&projection).cloned().flatten(),
            attempts,
        });
    }

    fn halt(&mut self, projection: usize) {
        self.commands.push(Command::ProjectionStopped { projection });
        for group in &mut self.groups {
            group.stop_lane(projection);
        }
    }

    fn on_recorded(&mut self, task: TaskId, ok: bool) {
        let Some(projection) = self.stopped.iter().position(
            |s| matches!(s, StopState::Recording { task: current, .. } if *current == task),
        ) else {
            return;
        };
        let StopState::Recording { failed, attempts, .. } = self.stopped[projection] else {
            unreachable!("found above")
        };
        if ok {
            self.completions += 1;
            self.stopped[projection] = StopState::Stopped { since: self.completions };
            self.stop_events.remove(&projection);
        } else {
            // The store is unreachable: ask again after the store backoff.
            let wait = self.next_task;
            self.next_task += 1;
            self.tasks.insert(wait, Task::RecordWait { projection });
            self.stopped[projection] = StopState::Recording { task: wait, failed, attempts };
            self.commands.push(Command::Wait { task: wait, delay: self.store_backoff() });
        }
    }

    /// Counts a store error in a row, or resets the count when the store answered.
    fn count_store_answer(&mut self, input: &Input) {
        let failed = match input {
            Input::Loaded { checkpoints, .. } => checkpoints.is_none(),
            Input::Read { events, .. } => events.is_none(),
            Input::Processed { outcome, .. } => *outcome == Outcome::StoreFailed,
            Input::Polled { state, .. } => state.is_none(),
            Input::Recorded { ok, .. } => !ok,
            Input::Start { .. }
            | Input::Stop { .. }
            | Input::Elapsed { .. }
            | Input::Wake
            | Input::PollDue => return,
        };
        self.store_failures = if failed { self.store_failures.saturating_add(1) } else { 0 };
    }

    /// The wait before trying the store again, after the store errors in a row so far.
    fn store_backoff(&self) -> Duration {
        self.config.retry.store_backoff(self.store_failures)
    }

    fn retry_record(&mut self, projection: usize) {
        if let StopState::Recording { failed, attempts, .. } = self.stopped[projection] {
            self.record_stop(projection, failed, attempts);
        }
    }

    /// What the store says: stops recorded elsewhere stop here too, a stop gone (resumed) starts
    /// the projection again, and dead-letter requests go to the lanes owning their keys.
    fn on_polled(&mut self, state: PolledState, issued: u64) {
        for projection in 0..self.stopped.len() {
            let recorded = state.stopped.contains(&projection);
            match self.stopped[projection] {
                StopState::Running if recorded => {
                    self.completions += 1;
                    self.stopped[projection] = StopState::Stopped { since: self.completions };
                    self.halt(projection);
                }
                StopState::Stopped { since } if !recorded && since <= issued => {
                    self.stopped[projection] = StopState::Running;
                    self.commands.push(Command::ProjectionResumed { projection });
                    for group in &mut self.groups {
                        group.resume_lane(projection);
                    }
                }
                _ => {}
            }
        }
        for (projection, slot, key, action) in state.requests {
            if self.is_stopped(projection) || projection >= self.stopped.len() {
                continue;
            }
            if let Some(group) = self.slot_group.get(&slot) {
                self.groups[*group].request(projection, slot, key, action, issued);
            }
        }
    }

    fn poll(&mut self) {
        let mut out = Out {
            next_task: &mut self.next_task,
            tasks: &mut self.tasks,
            commands: &mut self.commands,
            completions: &mut self.completions,
            store_failures: self.store_failures,
        };
        for group in &mut self.groups {
            for slot in group.poll(&self.config, &mut out) {
                self.slot_group.remove(&slot);
            }
        }
    }
}
