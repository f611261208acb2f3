//! One group of slots: its lanes (one per projection) and its shared stream.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::failure::{AfterFailure, Failure, FailurePolicy, after_failure};
use super::lag::{Density, LagPart};
use super::{
    Batch, BatchEvents, Command, Config, FailedEvent, MAX_SHARED_PER_BATCH, Outcome, ParkCause,
    ParkedEvent, SHARED_BATCH_BUDGET, TaskId, event_size,
};
use crate::event::{Event, Position};
use crate::ids::Epoch;
use crate::ports::{DeadLetterAction, ReadRequest};
use crate::slot::Slot;

/// Batches the shared stream reads ahead of its fastest lane: as many as a lane takes in one
/// transaction, so that lanes slower than the read find a full batch's worth waiting.
const READ_AHEAD: u64 = MAX_SHARED_PER_BATCH as u64;

/// What a task id stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Task {
    PendingLoad { group: usize, projection: usize },
    PendingLoadWait { group: usize, projection: usize },
    SharedRead { group: usize },
    SharedWait { group: usize },
    SoloRead { group: usize, lane: usize },
    Process { group: usize, lane: usize },
    LaneWait { group: usize, lane: usize },
    Reload { group: usize, lane: usize },
    Poll,
    Record,
    RecordWait { projection: usize },
}

/// Where commands go, with the task registry.
pub(crate) struct Out<'a> {
    pub(crate) next_task: &'a mut TaskId,
    pub(crate) tasks: &'a mut BTreeMap<TaskId, Task>,
    pub(crate) commands: &'a mut Vec<Command>,
    /// See `Processing::completions`.
    pub(crate) completions: &'a mut u64,
    /// See `Processing::store_failures`.
    pub(crate) store_failures: u32,
}

impl Out<'_> {
    pub(crate) fn task(&mut self, kind: Task) -> TaskId {
        let id = *self.next_task;
        *self.next_task += 1;
        self.tasks.insert(id, kind);
        id
    }

    pub(crate) fn emit(&mut self, command: Command) {
        self.commands.push(command);
    }

    /// The wait before trying the store again, after the store errors in a row so far.
    pub(crate) fn store_backoff(&self, config: &Config) -> Duration {
        config.retry.store_backoff(self.store_failures)
    }
}

/// A batch whose step failed, for what follows.
#[derive(Debug)]
pub(crate) struct FailedBatch {
    task: TaskId,
    /// Index in `applied` of the event the handler failed on, if it said.
    index: Option<usize>,
    events: BatchEvents,
    applied: BatchEvents,
    checkpoints: BTreeMap<Slot, Position>,
}

impl FailedBatch {
    fn failed_event(&self) -> Option<FailedEvent> {
        let event = self.applied.get(self.index.unwrap_or(0).min(self.applied.len().max(1) - 1))?;
        Some(FailedEvent {
            position: event.position,
            stream: event.stream.clone(),
            event_type: event.event_type.clone(),
        })
    }
}

/// A projection stopped: what to report.
#[derive(Debug)]
pub(crate) struct StopInfo {
    pub(crate) projection: usize,
    pub(crate) task: TaskId,
    pub(crate) event: Option<FailedEvent>,
    pub(crate) attempts: u32,
}

/// A slot started, its checkpoints being loaded.
#[derive(Debug)]
struct Pending {
    epoch: Epoch,
    loaded: Vec<Option<Position>>,
    /// Keys of the slot with dead letters, per projection, as loaded with the checkpoints.
    parked: Vec<Vec<String>>,
}

impl Pending {
    fn new(epoch: Epoch, lanes: usize) -> Self {
        Self { epoch, loaded: vec![None; lanes], parked: vec![Vec::new(); lanes] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Idle,
    InFlight(TaskId),
    Waiting(TaskId),
}

/// Why a slot leaves the group once nothing covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropping {
    Stopped,
    Lost,
    /// Started again under another epoch: it re-enters as a new slot.
    Restart(Epoch),
}

/// One batch of the shared stream.
#[derive(Debug)]
struct Shared {
    seq: u64,
    /// The cursors it was read after.
    from: BTreeMap<Slot, Position>,
    /// The batch before it (its seq and last position), where a solo lane may cut its read to
    /// join at this one.
    boundary: Option<(u64, Position)>,
    events: Arc<Vec<Event>>,
    last: Position,
    /// Fewer events than asked: the reader reached the end of what was visible.
    short: bool,
    /// Global positions it spans (for densities).
    span: u64,
    /// What its events weigh ([`event_size`]).
    bytes: usize,
}

#[derive(Debug, Default)]
struct Stream {
    /// The cursors after the newest batch read; `None` until seeded.
    head: Option<BTreeMap<Slot, Position>>,
    /// The newest batch (seq, last position), where a solo lane may cut to join at the head.
    head_boundary: Option<(u64, Position)>,
    window: VecDeque<Shared>,
    /// What the window's batches weigh.
    bytes: usize,
    reading: Option<TaskId>,
    /// A read started before the last reset, not back yet.
    abandoned: Option<TaskId>,
    waiting: Option<TaskId>,
    caught_up: bool,
}

#[derive(Debug)]
enum LaneState {
    Idle,
    Reading {
        task: TaskId,
        request: BTreeMap<Slot, Position>,
        /// The group's next shared seq when the read was issued: batches below it had been read.
        known: u64,
    },
    Busy {
        task: TaskId,
        checkpoints: BTreeMap<Slot, Position>,
        /// Every event of the batch, those being parked included.
        events: BatchEvents,
        /// The events handed to the handler.
        applied: BatchEvents,
        sample: (u64, u64),
        /// Reads it holds (shared batches taken together; 1 otherwise).
        reads: usize,
    },
    /// Retrying or skipping a parked key.
    Resolving {
        task: TaskId,
        slot: Slot,
        key: String,
        action: DeadLetterAction,
    },
    Waiting {
        task: TaskId,
    },
    Reloading {
        task: TaskId,
        slots: BTreeSet<Slot>,
    },
    Stopped,
}

#[derive(Debug)]
struct Lane {
    cursors: BTreeMap<Slot, Position>,
    state: LaneState,
    /// The shared batch this lane takes next (its cursors are that batch's `from`).
    joined: Option<u64>,
    attempts: u32,
    caught_up: bool,
    density: Density,
    /// Its projection stopped: it stops at its next batch boundary.
    stopping: bool,
    /// The last read that served it returned a full batch: at least a batch of events was
    /// ahead, so a lag count would reach its limit and only the estimate says more.
    behind: bool,
    /// Its projection was resumed: it reloads its cursors before going on.
    needs_reload: bool,
    /// Parked partition keys of its slots: key -> (slot, position from which its events are
    /// parked; `START` for keys parked in the store).
    parked: BTreeMap<String, (Slot, Position)>,
    /// Events given up on in the batch being retried, until their park commits: position ->
    /// (the failed command, attempts).
    gave_up: BTreeMap<Position, (TaskId, u32)>,
    /// A batch the handler failed on without saying which event: retried one event at a time.
    isolating: Option<Isolation>,
    /// Time per read of its last committed batch (`None` before the first): how many shared
    /// batches it takes together.
    pace: Option<Duration>,
    /// Retries and skips to carry out: key -> (slot, action).
    requests: BTreeMap<String, (Slot, DeadLetterAction)>,
    /// The completion count when each key was last resolved here (a poll issued before cannot
    /// bring its request back).
    resolved: BTreeMap<String, u64>,
}

/// A failed batch being retried one event at a time to find the event that fails.
#[derive(Debug)]
struct Isolation {
    events: BatchEvents,
    /// The batch's checkpoints, committed once every event is through.
    checkpoints: BTreeMap<Slot, Position>,
}

impl Lane {
    /// Shared batches to take together: as many as fit [`SHARED_BATCH_BUDGET`] at the lane's
    /// pace, at least one and at most [`MAX_SHARED_PER_BATCH`]; one until a batch committed.
    fn reads_per_batch(&self) -> usize {
        match self.pace {
            None => 1,
            Some(pace) if pace.is_zero() => MAX_SHARED_PER_BATCH,
            Some(pace) => {
                let fit = SHARED_BATCH_BUDGET.as_nanos() / pace.as_nanos();
                usize::try_from(fit).unwrap_or(usize::MAX).clamp(1, MAX_SHARED_PER_BATCH)
            }
        }
    }

    fn covers(&self, slot: Slot) -> bool {
        match &self.state {
            LaneState::Busy { checkpoints, .. } => checkpoints.contains_key(&slot),
            LaneState::Resolving { slot: resolving, .. } => *resolving == slot,
            _ => false,
        }
    }

    fn is_idle(&self) -> bool {
        matches!(self.state, LaneState::Idle)
    }
}

#[derive(Debug)]
pub(crate) struct Group {
    index: usize,
    slots: BTreeMap<Slot, Epoch>,
    pending: BTreeMap<Slot, Pending>,
    loading: Vec<Load>,
    dropping: BTreeMap<Slot, Dropping>,
    lanes: Vec<Lane>,
    stream: Stream,
    next_seq: u64,
}

/// Every cursor moved past `to`: `max(cursor, to)`.
fn advance_all(cursors: &BTreeMap<Slot, Position>, to: Position) -> BTreeMap<Slot, Position> {
    cursors.iter().map(|(slot, at)| (*slot, (*at).max(to))).collect()
}

/// The checkpoints of a batch that ends at `to`: every slot whose cursor is not past it.
fn checkpoints_to(cursors: &BTreeMap<Slot, Position>, to: Position) -> BTreeMap<Slot, Position> {
    cursors.iter().filter(|(_, at)| **at <= to).map(|(slot, _)| (*slot, to)).collect()
}

/// Global positions a batch spans.
fn span_of(events: &[Event]) -> u64 {
    let min = events.iter().map(|e| e.position.global).min().unwrap_or(0);
    let max = events.iter().map(|e| e.position.global).max().unwrap_or(0);
    if events.is_empty() { 0 } else { max - min + 1 }
}

impl Group {
    pub(crate) fn new(index: usize, projections: usize) -> Self {
        Self {
            index,
            slots: BTreeMap::new(),
            pending: BTreeMap::new(),
            loading: vec![Load::Idle; projections],
            dropping: BTreeMap::new(),
            lanes: (0..projections)
                .map(|_| Lane {
                    cursors: BTreeMap::new(),
                    state: LaneState::Idle,
                    joined: None,
                    attempts: 0,
                    caught_up: false,
                    density: Density::default(),
                    stopping: false,
                    behind: false,
                    needs_reload: false,
                    parked: BTreeMap::new(),
                    gave_up: BTreeMap::new(),
                    isolating: None,
                    pace: None,
                    requests: BTreeMap::new(),
                    resolved: BTreeMap::new(),
                })
                .collect(),
            stream: Stream::default(),
            next_seq: 0,
        }
    }

    /// Slots this group holds or is taking in, for picking the least loaded group.
    pub(crate) fn load(&self) -> usize {
        self.slots.len() + self.pending.len() + self.dropping.len()
    }

    pub(crate) fn active_slots(&self) -> Vec<Slot> {
        self.slots.keys().copied().collect()
    }

    pub(crate) fn lane_cursors(&self, lane: usize) -> BTreeMap<Slot, Position> {
        self.lanes[lane]
            .cursors
            .iter()
            .filter(|(slot, _)| self.slots.contains_key(slot))
            .map(|(s, p)| (*s, *p))
            .collect()
    }

    pub(crate) fn waiting_for_events(&self) -> bool {
        (self.stream.caught_up && self.stream.head.is_some())
            || self.lanes.iter().any(|l| l.caught_up && !matches!(l.state, LaneState::Stopped))
    }

    /// Whether this group's lane of `projection` is known to be at least a batch behind.
    pub(crate) fn lane_behind(&self, lane: usize) -> bool {
        self.slots.is_empty() || self.lanes[lane].behind
    }

    pub(crate) fn lag_part(
        &self,
        lane: usize,
        config: &Config,
    ) -> Option<(Vec<(Slot, Position)>, LagPart)> {
        if self.slots.is_empty() {
            return None;
        }
        let cursors: Vec<(Slot, Position)> = self
            .slots
            .keys()
            .map(|slot| (*slot, self.lanes[lane].cursors.get(slot).copied().unwrap_or_default()))
            .collect();
        let after_global = cursors.iter().map(|(_, p)| p.global).min().unwrap_or(0);
        let fallback = self.slots.len() as f64 / f64::from(config.slot_count.get());
        let density = self.lanes[lane].density.per_position(fallback);
        Some((cursors, LagPart { after_global, density }))
    }

    pub(crate) fn start(&mut self, slot: Slot, epoch: Epoch) {
        if let Some(pending) = self.pending.get_mut(&slot) {
            pending.epoch = epoch;
            return;
        }
        if let Some(dropping) = self.dropping.get_mut(&slot) {
            *dropping = Dropping::Restart(epoch);
            return;
        }
        match self.slots.get(&slot) {
            Some(current) if *current == epoch => {}
            Some(_) => self.deactivate(slot, Dropping::Restart(epoch)),
            None => {
                self.pending.insert(slot, Pending::new(epoch, self.lanes.len()));
            }
        }
    }

    /// Returns whether the slot left the group at once.
    pub(crate) fn stop(&mut self, slot: Slot, out: &mut Out<'_>) -> bool {
        if self.pending.remove(&slot).is_some() {
            out.emit(Command::SlotStopped(slot));
            return true;
        }
        if let Some(dropping) = self.dropping.get_mut(&slot) {
            *dropping = Dropping::Stopped;
            return false;
        }
        if self.slots.contains_key(&slot) {
            self.deactivate(slot, Dropping::Stopped);
            return false;
        }
        out.emit(Command::SlotStopped(slot));
        true
    }

    pub(crate) fn wake(&mut self) {
        self.stream.caught_up = false;
        for lane in &mut self.lanes {
            lane.caught_up = false;
        }
    }

    pub(crate) fn stop_lane(&mut self, lane: usize) {
        let lane = &mut self.lanes[lane];
        lane.stopping = true;
        lane.joined = None;
        lane.isolating = None;
        lane.requests.clear();
        if lane.is_idle() {
            lane.state = LaneState::Stopped;
        }
    }

    /// The projection runs again: the lane reloads its cursors (the failing event comes first).
    pub(crate) fn resume_lane(&mut self, lane: usize) {
        let lane = &mut self.lanes[lane];
        lane.stopping = false;
        lane.attempts = 0;
        if matches!(lane.state, LaneState::Stopped) {
            lane.state = LaneState::Idle;
            lane.needs_reload = true;
        }
    }

    /// An operator asked to retry or skip a parked key of one of this group's slots.
    pub(crate) fn request(
        &mut self,
        lane: usize,
        slot: Slot,
        key: String,
        action: DeadLetterAction,
        issued: u64,
    ) {
        if !self.slots.contains_key(&slot) {
            return;
        }
        let lane = &mut self.lanes[lane];
        let resolving = matches!(&lane.state, LaneState::Resolving { key: k, .. } if *k == key);
        if resolving || lane.resolved.get(&key).is_some_and(|at| *at > issued) {
            return;
        }
        lane.requests.insert(key, (slot, action));
    }

    /// Takes a slot out of every lane (those with a batch in flight covering it keep it until the
    /// batch ends); it is reported once nothing covers it.
    fn deactivate(&mut self, slot: Slot, why: Dropping) {
        if self.slots.remove(&slot).is_none() {
            return;
        }
        self.dropping.insert(slot, why);
        for lane in &mut self.lanes {
            if !lane.covers(slot) {
                lane.cursors.remove(&slot);
            }
            if let LaneState::Reloading { slots, .. } = &mut lane.state {
                slots.remove(&slot);
            }
            lane.parked.retain(|_, (s, _)| *s != slot);
            lane.requests.retain(|_, (s, _)| *s != slot);
        }
        self.reset_stream();
    }

    fn reset_stream(&mut self) {
        // A read still in flight is abandoned, not forgotten: the next shared read waits for it,
        // so a burst of slot changes never piles reads up on the store.
        let abandoned = self.stream.reading.or(self.stream.abandoned);
        self.stream = Stream { abandoned, ..Stream::default() };
        for lane in &mut self.lanes {
            lane.joined = None;
        }
    }

    pub(crate) fn poll(&mut self, config: &Config, out: &mut Out<'_>) -> Vec<Slot> {
        self.issue_loads(out);
        self.activate_ready();
        let gone = self.settle_drops(out);
        loop {
            for lane in 0..self.lanes.len() {
                self.advance_lane(lane, config, out);
            }
            if !self.read_shared(config, out) {
                break;
            }
        }
        self.collect_window();
        gone
    }

    fn issue_loads(&mut self, out: &mut Out<'_>) {
        for projection in 0..self.lanes.len() {
            if self.loading[projection] != Load::Idle {
                continue;
            }
            let slots: Vec<Slot> = self
                .pending
                .iter()
                .filter(|(_, p)| p.loaded[projection].is_none())
                .map(|(slot, _)| *slot)
                .collect();
            if slots.is_empty() {
                continue;
            }
            let task = out.task(Task::PendingLoad { group: self.index, projection });
            out.emit(Command::Load { task, projection, slots });
            self.loading[projection] = Load::InFlight(task);
        }
    }

    /// Slots whose checkpoints are loaded for every projection join the lanes.
    fn activate_ready(&mut self) {
        let ready: Vec<Slot> = self
            .pending
            .iter()
            .filter(|(_, p)| p.loaded.iter().all(Option::is_some))
            .map(|(slot, _)| *slot)
            .collect();
        if ready.is_empty() {
            return;
        }
        for slot in ready {
            let pending = self.pending.remove(&slot).expect("ready slots are pending");
            self.slots.insert(slot, pending.epoch);
            for ((lane, at), parked) in
                self.lanes.iter_mut().zip(pending.loaded).zip(pending.parked)
            {
                lane.cursors.insert(slot, at.expect("loaded"));
                lane.parked.retain(|_, (s, _)| *s != slot);
                for key in parked {
                    lane.parked.insert(key, (slot, Position::START));
                }
            }
        }
        self.reset_stream();
    }

    /// Reports the slots nothing covers any more; returns those that left the group.
    fn settle_drops(&mut self, out: &mut Out<'_>) -> Vec<Slot> {
        let done: Vec<(Slot, Dropping)> = self
            .dropping
            .iter()
            .filter(|(slot, _)| !self.lanes.iter().any(|lane| lane.covers(**slot)))
            .map(|(slot, why)| (*slot, *why))
            .collect();
        let mut gone = Vec::new();
        for (slot, why) in done {
            self.dropping.remove(&slot);
            for lane in &mut self.lanes {
                lane.cursors.remove(&slot);
            }
            match why {
                Dropping::Stopped => {
                    out.emit(Command::SlotStopped(slot));
                    gone.push(slot);
                }
                Dropping::Lost => {
                    out.emit(Command::SlotLost(slot));
                    gone.push(slot);
                }
                Dropping::Restart(epoch) => {
                    self.pending.insert(slot, Pending::new(epoch, self.lanes.len()));
                }
            }
        }
        if !gone.is_empty() || !self.pending.is_empty() {
            self.issue_loads(out);
        }
        gone
    }

    fn window_index(&self, seq: u64) -> Option<usize> {
        let first = self.stream.window.front()?.seq;
        let index = seq.checked_sub(first)? as usize;
        (index < self.stream.window.len()).then_some(index)
    }

    /// The shared batch (or the head, as the next seq) whose `from` cursors are exactly these.
    fn equal_position(&self, cursors: &BTreeMap<Slot, Position>) -> Option<u64> {
        if let Some(batch) = self.stream.window.iter().find(|b| b.from == *cursors) {
            return Some(batch.seq);
        }
        (self.stream.head.as_ref() == Some(cursors)).then_some(self.next_seq)
    }

    fn any_joined(&self) -> bool {
        self.lanes.iter().any(|l| l.joined.is_some())
    }

    fn advance_lane(&mut self, lane: usize, config: &Config, out: &mut Out<'_>) {
        loop {
            if !self.lanes[lane].is_idle() {
                return;
            }
            if self.lanes[lane].stopping {
                self.lanes[lane].state = LaneState::Stopped;
                self.lanes[lane].joined = None;
                return;
            }
            if std::mem::take(&mut self.lanes[lane].needs_reload) {
                self.lanes[lane].joined = None;
                self.reload(lane, out);
                continue;
            }
            if self.slots.is_empty() {
                return;
            }
            if let Some(key) = self.lanes[lane].requests.keys().next().cloned() {
                self.resolve(lane, key, out);
                return;
            }
            if self.lanes[lane].isolating.is_some() {
                // Off the shared read until the batch is through: its cursors move on their own.
                self.lanes[lane].joined = None;
                if self.isolate_next(lane, out) {
                    return;
                }
                continue;
            }
            if let Some(seq) = self.lanes[lane].joined {
                if let Some(index) = self.window_index(seq) {
                    if self.take_shared(lane, index, config, out) {
                        continue;
                    }
                    return;
                }
                if seq == self.next_seq && self.stream.head.is_some() {
                    return; // waits for the shared read
                }
                self.lanes[lane].joined = None;
            }
            if let Some(seq) = self.equal_position(&self.lanes[lane].cursors) {
                self.lanes[lane].joined = Some(seq);
                continue;
            }
            if (self.stream.head.is_none() || !self.any_joined()) && self.seed() {
                continue;
            }
            if self.lanes[lane].caught_up {
                return;
            }
            self.solo_read(lane, config, out);
            return;
        }
    }

    /// Starts a new shared stream at the position most idle lanes share (ties: the furthest).
    /// Returns whether it did.
    fn seed(&mut self) -> bool {
        let candidates: Vec<usize> = (0..self.lanes.len())
            .filter(|l| {
                let lane = &self.lanes[*l];
                lane.is_idle()
                    && !lane.stopping
                    && lane.isolating.is_none()
                    && lane.joined.is_none()
                    && lane.cursors.len() == self.slots.len()
            })
            .collect();
        let mut best: Option<(usize, &BTreeMap<Slot, Position>)> = None;
        for l in &candidates {
            let cursors = &self.lanes[*l].cursors;
            let count = candidates.iter().filter(|o| self.lanes[**o].cursors == *cursors).count();
            let better = match best {
                None => true,
                Some((best_count, best_cursors)) => {
                    count > best_count || (count == best_count && cursors > best_cursors)
                }
            };
            if better {
                best = Some((count, cursors));
            }
        }
        let Some((_, cursors)) = best else { return false };
        let cursors = cursors.clone();
        self.reset_stream();
        for l in candidates {
            if self.lanes[l].cursors == cursors {
                self.lanes[l].joined = Some(self.next_seq);
            }
        }
        self.stream.head = Some(cursors);
        true
    }

    /// Hands the shared batches from `index` of the window on to an idle lane joined at the first
    /// of them: every batch waiting, up to [`Lane::reads_per_batch`], in one transaction. Returns
    /// whether the lane stays idle (nothing of its scope in batches that need no commit of their
    /// own).
    fn take_shared(
        &mut self,
        lane: usize,
        index: usize,
        config: &Config,
        out: &mut Out<'_>,
    ) -> bool {
        let first = &self.stream.window[index];
        debug_assert_eq!(
            self.lanes[lane].cursors, first.from,
            "a lane takes a shared batch only at its from cursors"
        );
        let mut events = BatchEvents::default();
        let (mut span, mut reads) = (0, 0);
        let mut last = first;
        let take = self.lanes[lane].reads_per_batch();
        for batch in self.stream.window.range(index..).take(take) {
            // Each batch was read from where the one before ended, so together they are what one
            // read from the first's cursors to the last's end returns.
            events.push(batch.events.clone());
            span += batch.span;
            reads += 1;
            last = batch;
        }
        if !config.unfiltered[lane] {
            let scope = &config.scopes[lane];
            events = events.filter(|e| scope.includes(&e.stream));
        }
        let checkpoints = checkpoints_to(&first.from, last.last);
        let (seq, end, short) = (last.seq, last.last, last.short);
        self.lanes[lane].joined = Some(seq + 1);
        self.lanes[lane].behind = !short;
        if events.is_empty() && !short {
            // Nothing of its scope: the cursors move past the batches without a transaction. The
            // stored checkpoint stays behind until the next commit; re-reading the stretch after
            // a failure finds nothing to apply.
            let lane = &mut self.lanes[lane];
            lane.cursors = advance_all(&lane.cursors, end);
            lane.density.record(0, span);
            return true;
        }
        self.dispatch(lane, events, checkpoints, span, reads, out);
        false
    }

    /// Hands a batch to a lane: the events of parked keys go to the dead letters, the others to
    /// the handler, in one transaction with the checkpoints. `span` is the events read for it,
    /// `reads` the reads it holds (its committed time per read sets the lane's pace).
    fn dispatch(
        &mut self,
        lane: usize,
        events: BatchEvents,
        checkpoints: BTreeMap<Slot, Position>,
        span: u64,
        reads: usize,
        out: &mut Out<'_>,
    ) {
        let grants: BTreeMap<Slot, Epoch> =
            checkpoints.keys().map(|slot| (*slot, self.slots[slot])).collect();
        let l = &self.lanes[lane];
        let (applied, park) = if l.parked.is_empty() {
            (events.clone(), Vec::new())
        } else {
            let mut park = Vec::new();
            let applied = events.filter(|event| match l.parked.get(&event.partition_key) {
                Some((_, since)) if event.position >= *since => {
                    let cause = match l.gave_up.get(&event.position) {
                        Some((task, attempts)) => {
                            ParkCause::Failed { task: *task, attempts: *attempts }
                        }
                        None => ParkCause::Behind { since: *since },
                    };
                    park.push(ParkedEvent { event: event.clone(), cause });
                    false
                }
                _ => true,
            });
            (applied, park)
        };
        let task = out.task(Task::Process { group: self.index, lane });
        out.emit(Command::Process {
            task,
            projection: lane,
            batch: Batch {
                events: applied.clone(),
                park,
                checkpoints: checkpoints.clone(),
                grants,
            },
        });
        let sample = (applied.len() as u64, span);
        self.lanes[lane].state =
            LaneState::Busy { task, checkpoints, events, applied, sample, reads };
    }

    /// Carries out an operator's retry or skip of a parked key, as the lane's next step.
    fn resolve(&mut self, lane: usize, key: String, out: &mut Out<'_>) {
        let (slot, action) = self.lanes[lane].requests.remove(&key).expect("requested");
        let Some(epoch) = self.slots.get(&slot).copied() else { return };
        let at = self.lanes[lane].cursors.get(&slot).copied().unwrap_or_default();
        let task = out.task(Task::Process { group: self.index, lane });
        out.emit(Command::Resolve {
            task,
            projection: lane,
            key: key.clone(),
            action,
            checkpoints: BTreeMap::from([(slot, at)]),
            grants: BTreeMap::from([(slot, epoch)]),
        });
        self.lanes[lane].state = LaneState::Resolving { task, slot, key, action };
    }

    /// The next step of a batch retried one event at a time: the first event not through yet,
    /// or, once all are, the batch's own checkpoints. Returns whether it dispatched something.
    fn isolate_next(&mut self, lane: usize, out: &mut Out<'_>) -> bool {
        let l = &self.lanes[lane];
        let isolation = l.isolating.as_ref().expect("isolating");
        let through = |event: &Event| {
            !self.slots.contains_key(&event.slot)
                || l.cursors.get(&event.slot).is_none_or(|at| event.position <= *at)
        };
        let scope: BTreeMap<Slot, Position> = l
            .cursors
            .iter()
            .filter(|(slot, _)| {
                isolation.checkpoints.contains_key(slot) && self.slots.contains_key(slot)
            })
            .map(|(slot, at)| (*slot, *at))
            .collect();
        let next = isolation.events.iter().find(|e| !through(e)).cloned();
        if let Some(event) = next {
            let checkpoints = checkpoints_to(&scope, event.position);
            self.dispatch(lane, BatchEvents::from(vec![event]), checkpoints, 0, 1, out);
            return true;
        }
        let rest: BTreeMap<Slot, Position> = isolation
            .checkpoints
            .iter()
            .filter(|(slot, to)| scope.get(slot).is_some_and(|at| at < to))
            .map(|(slot, to)| (*slot, *to))
            .collect();
        self.lanes[lane].isolating = None;
        if rest.is_empty() {
            return false;
        }
        self.dispatch(lane, BatchEvents::default(), rest, 0, 1, out);
        true
    }

    fn solo_read(&mut self, lane: usize, config: &Config, out: &mut Out<'_>) {
        let task = out.task(Task::SoloRead { group: self.index, lane });
        let cursors = self.lanes[lane].cursors.clone();
        out.emit(Command::Read {
            task,
            request: ReadRequest {
                cursors: cursors.iter().map(|(s, p)| (*s, *p)).collect(),
                scope: config.scopes[lane].clone(),
                limit: config.batch_size,
            },
        });
        self.lanes[lane].state =
            LaneState::Reading { task, request: cursors, known: self.next_seq };
    }

    /// Issues the shared read when the fastest joined lane is about to need it; returns whether
    /// it moved lanes off the stream to make room (they need another look).
    fn read_shared(&mut self, config: &Config, out: &mut Out<'_>) -> bool {
        let stream = &self.stream;
        if stream.head.is_none()
            || stream.reading.is_some()
            || stream.abandoned.is_some()
            || stream.waiting.is_some()
            || stream.caught_up
            || self.slots.is_empty()
        {
            return false;
        }
        let Some(fastest) = self.lanes.iter().filter_map(|l| l.joined).max() else { return false };
        if self.next_seq >= fastest + READ_AHEAD {
            return false;
        }
        let mut detached = false;
        while self.stream.bytes >= config.window_bytes {
            let Some(oldest) = self.stream.window.pop_front() else { break };
            self.stream.bytes -= oldest.bytes;
            for lane in &mut self.lanes {
                if lane.joined == Some(oldest.seq) {
                    lane.joined = None;
                    detached = true;
                }
            }
        }
        let head = self.stream.head.as_ref().expect("checked");
        let task = out.task(Task::SharedRead { group: self.index });
        out.emit(Command::Read {
            task,
            request: ReadRequest {
                cursors: head.iter().map(|(s, p)| (*s, *p)).collect(),
                scope: config.covering.clone(),
                limit: config.batch_size,
            },
        });
        self.stream.reading = Some(task);
        detached
    }

    /// Drops shared batches no joined lane can take any more (keeping one behind the slowest, for
    /// a lane finishing an older batch at the same position).
    fn collect_window(&mut self) {
        let Some(slowest) = self.lanes.iter().filter_map(|l| l.joined).min() else { return };
        while self.stream.window.front().is_some_and(|b| b.seq + 1 < slowest) {
            let dropped = self.stream.window.pop_front().expect("checked");
            self.stream.bytes -= dropped.bytes;
        }
    }

    pub(crate) fn on_pending_loaded(
        &mut self,
        projection: usize,
        task: TaskId,
        checkpoints: Option<BTreeMap<Slot, Position>>,
        parked: Vec<(Slot, String)>,
        config: &Config,
        out: &mut Out<'_>,
    ) {
        if self.loading[projection] != Load::InFlight(task) {
            return;
        }
        match checkpoints {
            Some(checkpoints) => {
                self.loading[projection] = Load::Idle;
                let mut fresh = BTreeSet::new();
                for (slot, at) in checkpoints {
                    if let Some(pending) = self.pending.get_mut(&slot)
                        && pending.loaded[projection].is_none()
                    {
                        pending.loaded[projection] = Some(at);
                        pending.parked[projection].clear();
                        fresh.insert(slot);
                    }
                }
                for (slot, key) in parked {
                    if let Some(pending) = self.pending.get_mut(&slot)
                        && fresh.contains(&slot)
                    {
                        pending.parked[projection].push(key);
                    }
                }
            }
            None => {
                let wait = out.task(Task::PendingLoadWait { group: self.index, projection });
                out.emit(Command::Wait { task: wait, delay: out.store_backoff(config) });
                self.loading[projection] = Load::Waiting(wait);
            }
        }
    }

    pub(crate) fn on_load_wait_elapsed(&mut self, projection: usize, task: TaskId) {
        if self.loading[projection] == Load::Waiting(task) {
            self.loading[projection] = Load::Idle;
        }
    }

    pub(crate) fn on_shared_read(
        &mut self,
        task: TaskId,
        events: Option<Vec<Event>>,
        config: &Config,
        out: &mut Out<'_>,
    ) {
        if self.stream.abandoned == Some(task) {
            self.stream.abandoned = None; // the stream was reset since
            return;
        }
        if self.stream.reading != Some(task) {
            return;
        }
        self.stream.reading = None;
        let Some(events) = events else {
            // No lane's cursors moved: the same read again after a backoff.
            let wait = out.task(Task::SharedWait { group: self.index });
            out.emit(Command::Wait { task: wait, delay: out.store_backoff(config) });
            self.stream.waiting = Some(wait);
            return;
        };
        let Some(last) = events.last().map(|e| e.position) else {
            self.stream.caught_up = true;
            return;
        };
        let head = self.stream.head.take().expect("a read in flight has a head");
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stream.head = Some(advance_all(&head, last));
        let bytes = events.iter().map(event_size).sum();
        self.stream.bytes += bytes;
        self.stream.window.push_back(Shared {
            bytes,
            seq,
            boundary: self.stream.head_boundary,
            from: head,
            short: events.len() < config.batch_size,
            span: span_of(&events),
            events: Arc::new(events),
            last,
        });
        self.stream.head_boundary = Some((seq, last));
    }

    pub(crate) fn on_shared_wait_elapsed(&mut self, task: TaskId) {
        if self.stream.waiting == Some(task) {
            self.stream.waiting = None;
        }
    }

    pub(crate) fn on_solo_read(
        &mut self,
        lane: usize,
        task: TaskId,
        events: Option<Vec<Event>>,
        config: &Config,
        out: &mut Out<'_>,
    ) -> Option<StopInfo> {
        let LaneState::Reading { task: current, request, known } = &self.lanes[lane].state else {
            return None;
        };
        if *current != task {
            return None;
        }
        let (request, known) = (request.clone(), *known);
        self.lanes[lane].state = LaneState::Idle;
        if request != self.lanes[lane].cursors {
            return None; // its slots changed meanwhile: read again
        }
        let Some(events) = events else {
            return self.fail(lane, Failure::Store, None, config, out);
        };
        let end = events.last().map(|e| e.position);
        let short = events.len() < config.batch_size;
        // Where the read may be cut to join the stream: at the boundary before a shared batch
        // (or before the head) whose from cursors the cut gives, if nothing can be skipped.
        let candidates = self.stream.window.iter().map(|b| (b.seq, b.boundary, &b.from)).chain(
            self.stream.head.as_ref().map(|h| (self.next_seq, self.stream.head_boundary, h)),
        );
        let mut cut = None;
        for (seq, boundary, from) in candidates {
            let Some((before, at)) = boundary else { continue };
            let covered = end.is_some_and(|end| end >= at) || (short && before < known);
            if covered && advance_all(&request, at) == *from {
                cut = Some((seq, at));
                break;
            }
        }
        let span = span_of(&events);
        self.lanes[lane].behind = !short;
        match (cut, end) {
            (Some((seq, at)), _) => {
                let events: Vec<Event> = events.into_iter().filter(|e| e.position <= at).collect();
                self.lanes[lane].joined = Some(seq);
                if events.is_empty() {
                    let l = &mut self.lanes[lane];
                    l.cursors = advance_all(&l.cursors, at);
                } else {
                    let checkpoints = checkpoints_to(&request, at);
                    self.dispatch(lane, BatchEvents::from(events), checkpoints, span, 1, out);
                }
            }
            (None, None) => self.lanes[lane].caught_up = true,
            (None, Some(end)) => {
                let checkpoints = checkpoints_to(&request, end);
                self.dispatch(lane, BatchEvents::from(events), checkpoints, span, 1, out);
            }
        }
        None
    }

    pub(crate) fn on_processed(
        &mut self,
        lane: usize,
        task: TaskId,
        outcome: Outcome,
        took: Duration,
        config: &Config,
        out: &mut Out<'_>,
    ) -> Option<StopInfo> {
        match &self.lanes[lane].state {
            LaneState::Busy { task: current, .. } if *current == task => {}
            LaneState::Resolving { task: current, .. } if *current == task => {
                return self.on_resolved(lane, outcome, config, out);
            }
            _ => return None,
        }
        let LaneState::Busy { checkpoints, events, applied, sample, reads, .. } =
            std::mem::replace(&mut self.lanes[lane].state, LaneState::Idle)
        else {
            unreachable!("checked")
        };
        let slots = &self.slots;
        let l = &mut self.lanes[lane];
        if outcome == Outcome::Committed {
            for (slot, at) in checkpoints {
                if slots.contains_key(&slot) {
                    l.cursors.insert(slot, at);
                }
            }
            l.cursors.retain(|slot, _| slots.contains_key(slot));
            l.attempts = 0;
            l.gave_up.clear();
            l.density.record(sample.0, sample.1);
            l.pace = Some(took / reads.max(1) as u32);
            return None;
        }
        l.cursors.retain(|slot, _| slots.contains_key(slot));
        let (failure, index) = match outcome {
            // One event at a time, a failure names its event and is not retried again.
            Outcome::HandlerFailed { timed_out, .. } if l.isolating.is_some() => {
                (Failure::Handler { timed_out, permanent: true }, Some(0))
            }
            Outcome::HandlerFailed { index, timed_out, permanent } => {
                (Failure::Handler { timed_out, permanent }, index)
            }
            Outcome::Fenced { slot } => (Failure::Fenced { slot }, None),
            Outcome::Regression { slot } => (Failure::Regression { slot }, None),
            Outcome::StoreFailed | Outcome::Committed => (Failure::Store, None),
        };
        let batch = FailedBatch { task, index, events, applied, checkpoints };
        self.fail(lane, failure, Some(batch), config, out)
    }

    /// A retry or skip of a parked key ended.
    fn on_resolved(
        &mut self,
        lane: usize,
        outcome: Outcome,
        config: &Config,
        out: &mut Out<'_>,
    ) -> Option<StopInfo> {
        let LaneState::Resolving { slot, key, action, .. } =
            std::mem::replace(&mut self.lanes[lane].state, LaneState::Idle)
        else {
            unreachable!("checked by the caller")
        };
        let slots = &self.slots;
        let l = &mut self.lanes[lane];
        l.cursors.retain(|slot, _| slots.contains_key(slot));
        let failure = match outcome {
            Outcome::Committed => {
                l.parked.remove(&key);
                *out.completions += 1;
                l.resolved.insert(key, *out.completions);
                return None;
            }
            // The runtime parked the events again with the new error; the key stays parked.
            Outcome::HandlerFailed { .. } => {
                *out.completions += 1;
                l.resolved.insert(key, *out.completions);
                return None;
            }
            Outcome::Fenced { slot } => Failure::Fenced { slot },
            Outcome::Regression { slot } => Failure::Regression { slot },
            Outcome::StoreFailed => {
                if self.slots.contains_key(&slot) {
                    l.requests.insert(key, (slot, action));
                }
                Failure::Store
            }
        };
        self.fail(lane, failure, None, config, out)
    }

    /// What follows a failed step of a lane.
    fn fail(
        &mut self,
        lane: usize,
        failure: Failure,
        batch: Option<FailedBatch>,
        config: &Config,
        out: &mut Out<'_>,
    ) -> Option<StopInfo> {
        self.lanes[lane].joined = None;
        match after_failure(failure, self.lanes[lane].attempts, out.store_failures, &config.retry) {
            AfterFailure::Retry { after, attempts } => {
                let task = out.task(Task::LaneWait { group: self.index, lane });
                out.emit(Command::Wait { task, delay: after });
                let l = &mut self.lanes[lane];
                l.attempts = attempts;
                l.state = LaneState::Waiting { task };
                None
            }
            AfterFailure::DropSlot { slot } => {
                self.deactivate(slot, Dropping::Lost);
                self.reload(lane, out);
                None
            }
            AfterFailure::GiveUp { attempts } => {
                let unnamed =
                    batch.as_ref().is_some_and(|b| b.index.is_none() && b.applied.len() > 1);
                if unnamed && let Some(batch) = batch {
                    // The handler did not say which event failed: the batch goes again one event
                    // at a time, so the policy applies to the very event (and the events before
                    // it are not held back).
                    let l = &mut self.lanes[lane];
                    l.attempts = 0;
                    l.isolating =
                        Some(Isolation { events: batch.events, checkpoints: batch.checkpoints });
                    return None;
                }
                if config.policies[lane] == FailurePolicy::Park
                    && let Some(batch) = batch
                {
                    self.park(lane, batch, attempts, out);
                    return None;
                }
                let l = &mut self.lanes[lane];
                l.attempts = attempts;
                l.state = LaneState::Stopped;
                l.stopping = true;
                l.isolating = None;
                let (task, event) = match batch {
                    Some(batch) => (batch.task, batch.failed_event()),
                    None => (0, None),
                };
                Some(StopInfo { projection: lane, task, event, attempts })
            }
        }
    }

    /// The `park` policy: the failing event's key is parked from that event on and the batch goes
    /// again at once (its transaction was rolled back, nothing of it committed), the key's events
    /// to the dead letters.
    fn park(&mut self, lane: usize, batch: FailedBatch, attempts: u32, out: &mut Out<'_>) {
        let l = &mut self.lanes[lane];
        l.attempts = 0;
        if let Some(event) = batch.applied.get(batch.index.unwrap_or(0)) {
            l.parked.entry(event.partition_key.clone()).or_insert((event.slot, event.position));
            l.gave_up.insert(event.position, (batch.task, attempts));
        }
        let slots = &self.slots;
        let checkpoints: BTreeMap<Slot, Position> =
            batch.checkpoints.into_iter().filter(|(slot, _)| slots.contains_key(slot)).collect();
        if checkpoints.is_empty() {
            return;
        }
        let events = batch.events.filter(|e| checkpoints.contains_key(&e.slot));
        self.dispatch(lane, events, checkpoints, 0, 1, out);
    }

    fn reload(&mut self, lane: usize, out: &mut Out<'_>) {
        let slots: BTreeSet<Slot> = self.slots.keys().copied().collect();
        if slots.is_empty() {
            self.lanes[lane].cursors.clear();
            self.lanes[lane].state = LaneState::Idle;
            return;
        }
        let task = out.task(Task::Reload { group: self.index, lane });
        out.emit(Command::Load { task, projection: lane, slots: slots.iter().copied().collect() });
        self.lanes[lane].state = LaneState::Reloading { task, slots };
    }

    pub(crate) fn on_lane_wait_elapsed(&mut self, lane: usize, task: TaskId, out: &mut Out<'_>) {
        if matches!(self.lanes[lane].state, LaneState::Waiting { task: current } if current == task)
        {
            self.reload(lane, out);
        }
    }

    pub(crate) fn on_reloaded(
        &mut self,
        lane: usize,
        task: TaskId,
        checkpoints: Option<BTreeMap<Slot, Position>>,
        parked: Vec<(Slot, String)>,
        config: &Config,
        out: &mut Out<'_>,
    ) -> Option<StopInfo> {
        let LaneState::Reloading { task: current, slots } = &self.lanes[lane].state else {
            return None;
        };
        if *current != task {
            return None;
        }
        let requested = slots.clone();
        self.lanes[lane].state = LaneState::Idle;
        let Some(checkpoints) = checkpoints else {
            return self.fail(lane, Failure::Store, None, config, out);
        };
        let l = &mut self.lanes[lane];
        let mut cursors = BTreeMap::new();
        for slot in self.slots.keys() {
            let at = if requested.contains(slot) {
                checkpoints.get(slot).copied().unwrap_or(Position::START)
            } else {
                l.cursors.get(slot).copied().unwrap_or(Position::START)
            };
            cursors.insert(*slot, at);
        }
        l.cursors = cursors;
        // What the store holds replaces what a failed commit may have parked in memory only.
        l.parked.retain(|_, (slot, _)| !requested.contains(slot));
        for (slot, key) in parked {
            if requested.contains(&slot) {
                l.parked.insert(key, (slot, Position::START));
            }
        }
        l.gave_up.clear();
        None
    }
}
