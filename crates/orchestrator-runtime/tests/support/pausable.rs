//! A store wrapper that freezes one worker's coordination and commits, like SIGSTOP: calls wait
//! until resumed, then go through with what they carried (a zombie's stale commit included).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, Backlog, CheckpointStore, CoordinationStore, DeadLetter, DeadLetterAction,
    DeadLetterFilter, DeadLetterId, DeadLetterRequest, DeadLetterStore, EventStore, Fence,
    HeartbeatAck, NewDeadLetter, ProjectionStop, ReadRequest, StoppedProjection, StoreResult,
};
use orchestrator_core::{
    Epoch, Event, ExpectedVersion, Generation, GenerationPlan, Incarnation, NewEvent, PartitionKey,
    Position, ReplicaSetName, Slot, SlotCount, Snapshot, StreamId, WorkerId,
};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Pausable<S> {
    inner: S,
    paused: watch::Sender<bool>,
    /// Freeze before opening a transaction rather than before committing one: on SQLite an open
    /// write transaction holds the only write lock, and freezing with it would stop every process.
    freeze_at_begin: bool,
}

impl<S> Pausable<S> {
    pub fn new(inner: S, freeze_at_begin: bool) -> Self {
        Self { inner, paused: watch::Sender::new(false), freeze_at_begin }
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    async fn gate(&self) {
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !p).await;
    }
}

#[async_trait]
impl<S: EventStore> EventStore for Pausable<S> {
    fn slot_count(&self) -> SlotCount {
        self.inner.slot_count()
    }
    async fn append_with_key<'k>(
        &self,
        stream: &StreamId,
        key: Option<&'k PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        self.inner.append_with_key(stream, key, expected, events).await
    }
    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>> {
        self.inner.read_stream(stream, from_version).await
    }
    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        self.inner.read(request).await
    }
    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        self.inner.backlog(request).await
    }
}

#[async_trait]
impl<S: CoordinationStore> CoordinationStore for Pausable<S> {
    async fn register(
        &self,
        rs: &ReplicaSetName,
        slots: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        self.gate().await;
        self.inner.register(rs, slots, worker).await
    }
    async fn heartbeat(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        inc: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck> {
        self.gate().await;
        self.inner.heartbeat(rs, worker, inc, lease).await
    }
    async fn snapshot(&self, rs: &ReplicaSetName) -> StoreResult<Snapshot> {
        self.gate().await;
        self.inner.snapshot(rs).await
    }
    async fn create_generation(
        &self,
        rs: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.create_generation(rs, plan).await
    }
    async fn release_slot(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.release_slot(rs, worker, slot, epoch).await
    }
    async fn ack_generation(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        inc: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.ack_generation(rs, worker, inc, generation).await
    }
    async fn deregister(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        inc: Incarnation,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.deregister(rs, worker, inc).await
    }
}

#[async_trait]
impl<S: CheckpointStore> CheckpointStore for Pausable<S> {
    type Tx = S::Tx;
    async fn load(
        &self,
        rs: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        self.inner.load(rs, projection, slots).await
    }
    async fn begin(&self) -> StoreResult<S::Tx> {
        if self.freeze_at_begin {
            self.gate().await;
        }
        self.inner.begin().await
    }
    async fn commit(
        &self,
        tx: S::Tx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        if !self.freeze_at_begin {
            self.gate().await;
        }
        self.inner.commit(tx, fence, projection, checkpoints).await
    }
    async fn projections(&self, rs: &ReplicaSetName) -> StoreResult<Vec<String>> {
        self.inner.projections(rs).await
    }
    async fn reset(&self, tx: S::Tx, rs: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        self.inner.reset(tx, rs, projection).await
    }
    async fn remove(&self, rs: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        self.inner.remove(rs, projection).await
    }
    async fn stop_projection(&self, rs: &ReplicaSetName, stop: &ProjectionStop) -> StoreResult<()> {
        self.inner.stop_projection(rs, stop).await
    }
    async fn stopped_projections(
        &self,
        rs: &ReplicaSetName,
    ) -> StoreResult<Vec<StoppedProjection>> {
        self.inner.stopped_projections(rs).await
    }
    async fn resume_projection(&self, rs: &ReplicaSetName, projection: &str) -> StoreResult<bool> {
        self.inner.resume_projection(rs, projection).await
    }
}

/// Dead letters go straight through: parking and resolving happen inside a transaction, whose
/// `begin` or `commit` is where a frozen worker waits.
#[async_trait]
impl<S: DeadLetterStore> DeadLetterStore for Pausable<S> {
    async fn park(
        &self,
        tx: &mut S::Tx,
        rs: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        self.inner.park(tx, rs, projection, letters).await
    }
    async fn parked_keys(
        &self,
        rs: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<Vec<(Slot, String)>> {
        self.inner.parked_keys(rs, projection, slots).await
    }
    async fn dead_letters(
        &self,
        rs: &ReplicaSetName,
        filter: &DeadLetterFilter,
    ) -> StoreResult<Vec<DeadLetter>> {
        self.inner.dead_letters(rs, filter).await
    }
    async fn dead_letter_counts(&self, rs: &ReplicaSetName) -> StoreResult<BTreeMap<String, u64>> {
        self.inner.dead_letter_counts(rs).await
    }
    async fn request(
        &self,
        rs: &ReplicaSetName,
        filter: &DeadLetterFilter,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.inner.request(rs, filter, action).await
    }
    async fn requests(&self, rs: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>> {
        self.inner.requests(rs).await
    }
    async fn parked_events(
        &self,
        rs: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>> {
        self.inner.parked_events(rs, projection, key).await
    }
    async fn resolve(
        &self,
        tx: &mut S::Tx,
        rs: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.inner.resolve(tx, rs, projection, key, action).await
    }
}
