//! The seeded fault injector: a store wrapper, one per simulated worker process, that fails, delays
//! and freezes that worker's calls to the shared in-memory store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, Backlog, CheckpointStore, CoordinationStore, DeadLetter, DeadLetterAction,
    DeadLetterFilter, DeadLetterId, DeadLetterRequest, DeadLetterStore, EventStore, Fence,
    HeartbeatAck, NewDeadLetter, ProjectionStop, ReadRequest, StoppedProjection, StoreError,
    StoreResult,
};
use orchestrator_core::{
    Epoch, Event, ExpectedVersion, Generation, GenerationPlan, Incarnation, NewEvent, PartitionKey,
    Position, ReplicaSetName, Slot, SlotCount, Snapshot, StreamId, WorkerId,
};
use orchestrator_memory::{MemoryStore, MemoryTx};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::Notify;

/// The simulation's seeded generator (rand's `SmallRng`): the same seed gives the same faults.
#[derive(Debug, Clone)]
pub struct Rng(SmallRng);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(SmallRng::seed_from_u64(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.random()
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.0.random_bool(percent.min(100) as f64 / 100.0)
    }

    /// A duration in `0..max`.
    pub fn duration_below(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.below(max.as_millis().max(1) as u64))
    }
}

/// Which faults the injector makes, in percent per call (0 turns one off).
#[derive(Debug, Clone, Copy)]
pub struct FaultRates {
    /// A heartbeat fails (lost on the way).
    pub heartbeat_lost: u64,
    /// A heartbeat is delayed up to `max_delay`.
    pub heartbeat_delayed: u64,
    /// A commit fails before anything is written.
    pub commit_failed: u64,
    /// A commit is written, then reported as failed (the connection dropped after COMMIT).
    pub commit_lost_reply: u64,
    /// A commit is delayed up to `max_delay` (a slow database).
    pub commit_delayed: u64,
    /// Any other call fails.
    pub call_failed: u64,
    /// Upper bound of injected delays.
    pub max_delay: Duration,
}

impl FaultRates {
    /// The rates the simulation uses.
    pub fn standard() -> Self {
        Self {
            heartbeat_lost: 5,
            heartbeat_delayed: 10,
            commit_failed: 4,
            commit_lost_reply: 4,
            commit_delayed: 10,
            call_failed: 3,
            max_delay: Duration::from_millis(400),
        }
    }
}

/// Faults that happened, by kind.
pub type FaultCounts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// Shared between the injectors of every simulated worker.
#[derive(Debug, Clone)]
pub struct Injector {
    pub(crate) rng: Arc<Mutex<Rng>>,
    pub(crate) rates: FaultRates,
    /// Faults stop once the run winds down.
    pub(crate) calm: Arc<AtomicBool>,
    pub(crate) counts: FaultCounts,
}

impl Injector {
    fn roll(&self, percent: u64, kind: &'static str) -> bool {
        if percent == 0 || self.calm.load(Ordering::Relaxed) {
            return false;
        }
        let hit = self.rng.lock().unwrap().chance(percent);
        if hit {
            *self.counts.lock().unwrap().entry(kind).or_default() += 1;
        }
        hit
    }

    async fn maybe_delay(&self, percent: u64, kind: &'static str) {
        if self.roll(percent, kind) {
            let delay = self.rng.lock().unwrap().duration_below(self.rates.max_delay);
            tokio::time::sleep(delay).await;
        }
    }

    fn maybe_fail(&self, percent: u64, kind: &'static str) -> StoreResult<()> {
        if self.roll(percent, kind) {
            return Err(StoreError::Unavailable {
                message: format!("injected: {kind}"),
                source: None,
            });
        }
        Ok(())
    }
}

/// One worker process's view of the store: its calls can fail or be delayed, and the whole process
/// can be frozen (SIGSTOP) and thawed (SIGCONT).
#[derive(Debug, Clone)]
pub struct Faulty {
    inner: MemoryStore,
    injector: Injector,
    frozen: Arc<Frozen>,
}

/// A process's frozen flag. Not a `watch` channel: that one spreads its waiters over shards picked
/// at random, so thawing would wake them in a different order on every run.
#[derive(Debug, Default)]
struct Frozen {
    flag: AtomicBool,
    thawed: Notify,
}

impl Faulty {
    pub(crate) fn new(inner: MemoryStore, injector: Injector) -> Self {
        Self { inner, injector, frozen: Arc::default() }
    }

    /// Freezes every call of this process until [`Faulty::thaw`].
    pub fn freeze(&self) {
        self.frozen.flag.store(true, Ordering::Relaxed);
    }

    /// Lets the frozen calls go on, carrying what they had (a zombie's commit, say).
    pub fn thaw(&self) {
        self.frozen.flag.store(false, Ordering::Relaxed);
        self.frozen.thawed.notify_waiters();
    }

    async fn gate(&self) {
        while self.frozen.flag.load(Ordering::Relaxed) {
            self.frozen.thawed.notified().await;
        }
    }

    async fn call(&self) -> StoreResult<()> {
        self.gate().await;
        self.injector.maybe_fail(self.injector.rates.call_failed, "call failed")
    }
}

#[async_trait]
impl EventStore for Faulty {
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
        self.gate().await;
        self.inner.append_with_key(stream, key, expected, events).await
    }
    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>> {
        self.call().await?;
        self.inner.read_stream(stream, from_version).await
    }
    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        self.call().await?;
        self.inner.read(request).await
    }
    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        self.call().await?;
        self.inner.backlog(request).await
    }
    async fn head(&self) -> StoreResult<Option<u64>> {
        self.call().await?;
        self.inner.head().await
    }
}

#[async_trait]
impl CoordinationStore for Faulty {
    async fn register(
        &self,
        rs: &ReplicaSetName,
        slots: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        self.call().await?;
        self.inner.register(rs, slots, worker).await
    }
    async fn heartbeat(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck> {
        self.gate().await;
        let rates = self.injector.rates;
        self.injector.maybe_delay(rates.heartbeat_delayed, "heartbeat delayed").await;
        self.injector.maybe_fail(rates.heartbeat_lost, "heartbeat lost")?;
        // A heartbeat delayed past a freeze lands after the thaw.
        self.gate().await;
        self.inner.heartbeat(rs, worker, incarnation, lease).await
    }
    async fn snapshot(&self, rs: &ReplicaSetName) -> StoreResult<Snapshot> {
        self.call().await?;
        self.inner.snapshot(rs).await
    }
    async fn create_generation(
        &self,
        rs: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()> {
        self.call().await?;
        self.inner.create_generation(rs, plan).await
    }
    async fn release_slot(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()> {
        self.call().await?;
        self.inner.release_slot(rs, worker, slot, epoch).await
    }
    async fn ack_generation(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        self.call().await?;
        self.inner.ack_generation(rs, worker, incarnation, generation).await
    }
    async fn deregister(
        &self,
        rs: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()> {
        self.call().await?;
        self.inner.deregister(rs, worker, incarnation).await
    }
}

#[async_trait]
impl CheckpointStore for Faulty {
    type Tx = MemoryTx;
    async fn load(
        &self,
        rs: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        self.call().await?;
        self.inner.load(rs, projection, slots).await
    }
    async fn begin(&self) -> StoreResult<MemoryTx> {
        self.call().await?;
        self.inner.begin().await
    }
    async fn commit(
        &self,
        tx: MemoryTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        self.gate().await;
        let rates = self.injector.rates;
        self.injector.maybe_delay(rates.commit_delayed, "commit delayed").await;
        self.injector.maybe_fail(rates.commit_failed, "commit failed")?;
        // Frozen while the commit was on its way: it arrives after the thaw, as a zombie's would.
        self.gate().await;
        self.inner.commit(tx, fence, projection, checkpoints).await?;
        self.injector.maybe_fail(rates.commit_lost_reply, "commit reply lost")
    }
    async fn projections(&self, rs: &ReplicaSetName) -> StoreResult<Vec<String>> {
        self.inner.projections(rs).await
    }
    async fn reset(&self, tx: MemoryTx, rs: &ReplicaSetName, projection: &str) -> StoreResult<()> {
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

/// Dead letters: the worker's reads (`parked_keys`, `requests`, `parked_events`) fail and freeze
/// like `load`; parking and resolving are writes in a transaction whose commit carries the faults;
/// the operator's calls (list, counts, request) are not the worker's and go straight through.
#[async_trait]
impl DeadLetterStore for Faulty {
    async fn park(
        &self,
        tx: &mut MemoryTx,
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
        self.call().await?;
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
        self.call().await?;
        self.inner.requests(rs).await
    }
    async fn parked_events(
        &self,
        rs: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>> {
        self.call().await?;
        self.inner.parked_events(rs, projection, key).await
    }
    async fn resolve(
        &self,
        tx: &mut MemoryTx,
        rs: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.inner.resolve(tx, rs, projection, key, action).await
    }
}
