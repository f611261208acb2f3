//! The in-memory store: events, coordination state, checkpoints and read-model tables.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, Backlog, CheckpointStore, CoordinationStore, EventStore, Fence, HeartbeatAck,
    ProjectionStop, ReadRequest, StoppedProjection, StoreError, StoreResult,
    append_in_unit_of_work,
};
use orchestrator_core::{
    Clock, Epoch, Event, EventId, ExpectedVersion, Generation, GenerationPlan, Incarnation, Lease,
    NewEvent, PROTOCOL_VERSION, PartitionKey, Position, ReplicaSetName, Slot, SlotAction,
    SlotCount, SlotRecord, Snapshot, StreamId, Timestamp, WorkerId, WorkerRecord,
};

/// Every port of the orchestrator, in memory. Cloning shares the same state.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) slot_count: SlotCount,
    /// Streams locked by units of work (and appends, which are units of work of one stream).
    pub(crate) stream_locks: Arc<crate::unit_of_work::StreamLocks>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) events: Vec<Event>,
    /// Indexes into `events`, per slot, in position order.
    pub(crate) events_by_slot: BTreeMap<Slot, Vec<usize>>,
    /// Per stream: its partition key and the indexes of its events in `events`, in version order.
    pub(crate) streams: BTreeMap<StreamId, StreamState>,
    pub(crate) event_ids: BTreeSet<EventId>,
    /// Stopped projections, with when they were stopped.
    stopped: BTreeMap<(ReplicaSetName, String), (ProjectionStop, Timestamp)>,
    replica_sets: BTreeMap<ReplicaSetName, ReplicaSetState>,
    checkpoints: BTreeMap<(ReplicaSetName, String, Slot), Position>,
    tables: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Dead letters, their id sequence and the log of skipped ones.
    pub(crate) dead_letters: crate::dead_letters::Letters,
}

#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) partition_key: String,
    pub(crate) events: Vec<usize>,
}

#[derive(Debug)]
struct ReplicaSetState {
    slot_count: SlotCount,
    generation: Generation,
    members: Vec<WorkerId>,
    lease: Option<LeaseState>,
    last_incarnation: Incarnation,
    workers: BTreeMap<WorkerId, WorkerState>,
    slots: Vec<SlotRecord>,
}

#[derive(Debug, Clone)]
struct LeaseState {
    holder: WorkerId,
    incarnation: Incarnation,
    expires_at: Timestamp,
}

#[derive(Debug, Clone)]
struct WorkerState {
    incarnation: Incarnation,
    registered_at: Timestamp,
    last_heartbeat: Timestamp,
    acked_generation: Generation,
}

impl MemoryStore {
    /// An empty store bucketing events into `slot_count` slots, telling time by `clock`.
    pub fn new(slot_count: SlotCount, clock: Arc<dyn Clock>) -> Self {
        Self { state: Arc::default(), clock, slot_count, stream_locks: Arc::default() }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation completes
        // before the guard drops), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A committed read-model row written through a [`MemoryTx`].
    pub fn read_model_row(&self, table: &str, key: &str) -> Option<Vec<u8>> {
        self.lock().tables.get(table).and_then(|rows| rows.get(key).cloned())
    }

    /// Every committed row of a read-model table, by key.
    pub fn read_model_table(&self, table: &str) -> BTreeMap<String, Vec<u8>> {
        self.lock().tables.get(table).cloned().unwrap_or_default()
    }

    /// A transaction for read-model writes, applied at commit.
    pub(crate) fn transaction(&self) -> MemoryTx {
        MemoryTx { state: Arc::clone(&self.state), writes: Vec::new(), letters: Vec::new() }
    }

    /// Number of events appended.
    pub fn event_count(&self) -> usize {
        self.lock().events.len()
    }
}

impl State {
    /// The stream's events from `from_version` on, in version order.
    pub(crate) fn stream_events(&self, stream: &StreamId, from_version: u64) -> Vec<Event> {
        let Some(state) = self.streams.get(stream) else { return Vec::new() };
        let skip = usize::try_from(from_version.saturating_sub(1)).unwrap_or(usize::MAX);
        state.events.iter().skip(skip).map(|&i| self.events[i].clone()).collect()
    }

    fn replica_set(&mut self, name: &ReplicaSetName) -> StoreResult<&mut ReplicaSetState> {
        self.replica_sets.get_mut(name).ok_or_else(|| StoreError::UnknownReplicaSet(name.clone()))
    }
}

impl ReplicaSetState {
    fn worker(
        &mut self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<&mut WorkerState> {
        self.workers
            .get_mut(worker)
            .filter(|w| w.incarnation == incarnation)
            .ok_or_else(|| StoreError::not_registered(replica_set, worker))
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    fn slot_count(&self) -> SlotCount {
        self.slot_count
    }

    async fn append_with_key<'k>(
        &self,
        stream: &StreamId,
        key: Option<&'k PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        append_in_unit_of_work(self, stream, key, expected, events).await
    }

    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>> {
        Ok(self.lock().stream_events(stream, from_version))
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        let state = self.lock();
        // Merge the per-slot index lists, each from just after its cursor, in position order.
        let mut heads = BinaryHeap::new();
        let mut lists = Vec::new();
        for (slot, after) in &request.cursors {
            let Some(list) = state.events_by_slot.get(slot) else { continue };
            let start = list.partition_point(|&i| state.events[i].position <= *after);
            if start < list.len() {
                heads.push(Reverse((list[start], lists.len(), start)));
            }
            lists.push(list);
        }
        let mut out = Vec::new();
        while out.len() < request.limit {
            let Some(Reverse((index, list_idx, pos))) = heads.pop() else { break };
            let event = &state.events[index];
            if request.scope.includes(&event.stream) {
                out.push(event.clone());
            }
            if let Some(&next) = lists[list_idx].get(pos + 1) {
                heads.push(Reverse((next, list_idx, pos + 1)));
            }
        }
        Ok(out)
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        let now = self.clock.now();
        let state = self.lock();
        let mut backlog = Backlog::default();
        let mut oldest: Option<Timestamp> = None;
        for (slot, after) in &request.cursors {
            let Some(list) = state.events_by_slot.get(slot) else { continue };
            let start = list.partition_point(|&i| state.events[i].position <= *after);
            let mut in_scope = list[start..]
                .iter()
                .map(|&i| &state.events[i])
                .filter(|e| request.scope.includes(&e.stream));
            if let Some(next) = in_scope.next() {
                oldest = Some(oldest.map_or(next.created_at, |o| o.min(next.created_at)));
                backlog.events += 1 + in_scope.count() as u64;
            }
        }
        backlog.events = backlog.events.min(request.limit as u64);
        backlog.oldest_age = oldest.map(|created| now.saturating_since(created));
        Ok(backlog)
    }

    async fn head(&self) -> StoreResult<Option<u64>> {
        Ok(self.lock().events.last().map(|e| e.position.global))
    }
}

#[async_trait]
impl CoordinationStore for MemoryStore {
    async fn register(
        &self,
        replica_set: &ReplicaSetName,
        slot_count: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        let now = self.clock.now();
        let mut state = self.lock();
        let set =
            state.replica_sets.entry(replica_set.clone()).or_insert_with(|| ReplicaSetState {
                slot_count,
                generation: Generation::ZERO,
                members: Vec::new(),
                lease: None,
                last_incarnation: Incarnation::ZERO,
                workers: BTreeMap::new(),
                slots: vec![SlotRecord::default(); slot_count.get() as usize],
            });
        StoreError::check_slot_count(replica_set, u64::from(set.slot_count.get()), slot_count)?;
        set.last_incarnation = set.last_incarnation.next();
        let incarnation = set.last_incarnation;
        set.workers.insert(
            worker.clone(),
            WorkerState {
                incarnation,
                registered_at: now,
                last_heartbeat: now,
                acked_generation: Generation::ZERO,
            },
        );
        for record in set.slots.iter_mut().filter(|r| r.owner.as_ref() == Some(worker)) {
            record.epoch = record.epoch.next();
        }
        Ok(incarnation)
    }

    async fn heartbeat(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck> {
        let now = self.clock.now();
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        set.worker(replica_set, worker, incarnation)?.last_heartbeat = now;
        let takeable = match &set.lease {
            None => true,
            Some(held) => {
                held.expires_at <= now
                    || (&held.holder == worker && held.incarnation == incarnation)
            }
        };
        if takeable {
            set.lease =
                Some(LeaseState { holder: worker.clone(), incarnation, expires_at: now + lease });
        }
        Ok(HeartbeatAck { leader: takeable })
    }

    async fn snapshot(&self, replica_set: &ReplicaSetName) -> StoreResult<Snapshot> {
        let now = self.clock.now();
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        Ok(Snapshot {
            replica_set: replica_set.clone(),
            slot_count: set.slot_count,
            generation: set.generation,
            members: set.members.clone(),
            lease: set.lease.as_ref().map(|lease| Lease {
                holder: lease.holder.clone(),
                incarnation: lease.incarnation,
                remaining: Timestamp(lease.expires_at.as_millis()).saturating_since(now),
            }),
            workers: set
                .workers
                .iter()
                .map(|(id, w)| WorkerRecord {
                    id: id.clone(),
                    incarnation: w.incarnation,
                    heartbeat_age: now.saturating_since(w.last_heartbeat),
                    registered_age: now.saturating_since(w.registered_at),
                    acked_generation: w.acked_generation,
                    protocol: PROTOCOL_VERSION,
                })
                .collect(),
            slots: set.slots.clone(),
        })
    }

    async fn create_generation(
        &self,
        replica_set: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()> {
        let now = self.clock.now();
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        let leads = set.lease.as_ref().is_some_and(|lease| {
            lease.holder == plan.leader
                && lease.incarnation == plan.leader_incarnation
                && lease.expires_at > now
        });
        let epochs_match = plan.changes.iter().all(|change| {
            set.slots.get(change.slot.0 as usize).is_some_and(|r| r.epoch == change.epoch)
        });
        plan.check_applies(replica_set, set.generation, leads && epochs_match)?;
        for change in &plan.changes {
            let record = &mut set.slots[change.slot.0 as usize];
            match &change.action {
                SlotAction::Grant { to } => {
                    record.owner = Some(to.clone());
                    record.next_owner = None;
                    record.epoch = record.epoch.next();
                }
                SlotAction::Handoff { to } => record.next_owner = Some(to.clone()),
                SlotAction::CancelHandoff => record.next_owner = None,
            }
        }
        for evicted in &plan.evict {
            set.workers.remove(evicted);
        }
        set.generation = plan.generation;
        set.members = plan.members.clone();
        Ok(())
    }

    async fn release_slot(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        let fenced = || StoreError::Fenced { worker: worker.clone(), slot };
        let record = set.slots.get_mut(slot.0 as usize).ok_or_else(fenced)?;
        if record.owner.as_ref() != Some(worker) || record.epoch != epoch {
            return Err(fenced());
        }
        let Some(next) = record.next_owner.take() else {
            return Err(fenced());
        };
        record.owner = Some(next);
        record.epoch = record.epoch.next();
        Ok(())
    }

    async fn ack_generation(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        let record = set.worker(replica_set, worker, incarnation)?;
        record.acked_generation = record.acked_generation.max(generation);
        Ok(())
    }

    async fn deregister(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let set = state.replica_set(replica_set)?;
        if set.worker(replica_set, worker, incarnation).is_err() {
            return Ok(());
        }
        set.workers.remove(worker);
        // The leaver's slots go to their pending new owners (or none); handoffs pending to the
        // leaver are cancelled, so no slot is ever handed to a worker that has gone.
        for record in &mut set.slots {
            if record.owner.as_ref() == Some(worker) {
                record.owner = record.next_owner.take();
                record.epoch = record.epoch.next();
            } else if record.next_owner.as_ref() == Some(worker) {
                record.next_owner = None;
            }
        }
        if set.lease.as_ref().is_some_and(|l| &l.holder == worker && l.incarnation == incarnation) {
            set.lease = None;
        }
        Ok(())
    }
}

/// A transaction on the in-memory store: read-model writes (and dead letters parked or resolved)
/// are buffered and applied at commit.
#[derive(Debug)]
pub struct MemoryTx {
    state: Arc<Mutex<State>>,
    writes: Vec<(String, String, Option<Vec<u8>>)>,
    pub(crate) letters: Vec<crate::dead_letters::LetterOp>,
}

impl MemoryTx {
    /// Writes a read-model row (visible to others only after commit).
    pub fn put(&mut self, table: &str, key: &str, value: Vec<u8>) {
        self.writes.push((table.to_owned(), key.to_owned(), Some(value)));
    }

    /// Deletes a read-model row (at commit).
    pub fn delete(&mut self, table: &str, key: &str) {
        self.writes.push((table.to_owned(), key.to_owned(), None));
    }

    /// The committed state, locked (for the dead letters' pending counts).
    pub(crate) fn committed(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads a row as this transaction sees it: its own writes over committed state.
    pub fn get(&self, table: &str, key: &str) -> Option<Vec<u8>> {
        if let Some((_, _, value)) =
            self.writes.iter().rev().find(|(t, k, _)| t == table && k == key)
        {
            return value.clone();
        }
        let state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.tables.get(table).and_then(|rows| rows.get(key).cloned())
    }

    /// Applies the writes to the committed state (the caller holds its lock).
    pub(crate) fn apply_to(self, state: &mut State) {
        for op in self.letters {
            state.dead_letters.apply(op);
        }
        for (table, key, value) in self.writes {
            let rows = state.tables.entry(table).or_default();
            match value {
                Some(value) => rows.insert(key, value),
                None => rows.remove(&key),
            };
        }
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    type Tx = MemoryTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        let state = self.lock();
        Ok(slots
            .iter()
            .map(|slot| {
                let key = (replica_set.clone(), projection.to_owned(), *slot);
                (*slot, state.checkpoints.get(&key).copied().unwrap_or(Position::START))
            })
            .collect())
    }

    async fn begin(&self) -> StoreResult<MemoryTx> {
        Ok(self.transaction())
    }

    async fn commit(
        &self,
        tx: MemoryTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let set = state.replica_set(&fence.replica_set)?;
        for slot in checkpoints.keys() {
            let owned = fence.grants.get(slot).is_some_and(|epoch| {
                set.slots.get(slot.0 as usize).is_some_and(|record| {
                    record.owner.as_ref() == Some(&fence.worker) && record.epoch == *epoch
                })
            });
            if !owned {
                return Err(StoreError::Fenced { worker: fence.worker.clone(), slot: *slot });
            }
        }
        for (slot, position) in checkpoints {
            let key = (fence.replica_set.clone(), projection.to_owned(), *slot);
            if state.checkpoints.get(&key).is_some_and(|stored| stored > position) {
                return Err(StoreError::CheckpointRegression {
                    projection: projection.to_owned(),
                    slot: *slot,
                });
            }
        }
        for (slot, position) in checkpoints {
            state
                .checkpoints
                .insert((fence.replica_set.clone(), projection.to_owned(), *slot), *position);
        }
        tx.apply_to(&mut state);
        Ok(())
    }

    async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>> {
        let state = self.lock();
        let names: BTreeSet<&String> = state
            .checkpoints
            .keys()
            .filter(|(rs, _, _)| rs == replica_set)
            .map(|(_, projection, _)| projection)
            .collect();
        Ok(names.into_iter().cloned().collect())
    }

    async fn reset(
        &self,
        tx: MemoryTx,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        state.checkpoints.retain(|(rs, p, _), _| !(rs == replica_set && p == projection));
        state.stopped.remove(&(replica_set.clone(), projection.to_owned()));
        if let Some(set) = state.replica_sets.get_mut(replica_set) {
            for record in &mut set.slots {
                record.epoch = record.epoch.next();
            }
        }
        tx.apply_to(&mut state);
        // As on the SQL stores, whose reset runs after the transaction's own writes: letters the
        // transaction parked go too. The log of skipped letters stays, as a record.
        state.dead_letters.forget(replica_set, projection, false);
        Ok(())
    }

    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        let mut state = self.lock();
        state.checkpoints.retain(|(rs, p, _), _| !(rs == replica_set && p == projection));
        state.stopped.remove(&(replica_set.clone(), projection.to_owned()));
        state.dead_letters.forget(replica_set, projection, true);
        Ok(())
    }

    async fn stop_projection(
        &self,
        replica_set: &ReplicaSetName,
        stop: &ProjectionStop,
    ) -> StoreResult<()> {
        let now = self.clock.now();
        let key = (replica_set.clone(), stop.projection.clone());
        self.lock().stopped.entry(key).or_insert_with(|| (stop.clone(), now));
        Ok(())
    }

    async fn stopped_projections(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<Vec<StoppedProjection>> {
        let now = self.clock.now();
        Ok(self
            .lock()
            .stopped
            .iter()
            .filter(|((rs, _), _)| rs == replica_set)
            .map(|(_, (stop, at))| StoppedProjection {
                stop: stop.clone(),
                age: now.saturating_since(*at),
            })
            .collect())
    }

    async fn resume_projection(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<bool> {
        Ok(self.lock().stopped.remove(&(replica_set.clone(), projection.to_owned())).is_some())
    }
}
