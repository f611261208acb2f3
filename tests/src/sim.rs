//! A deterministic cluster: several workers' engines driven over one in-memory store and a manual
//! clock, with a simple fenced processor, checking the correctness invariants after every step.
//!
//! Everything runs on the caller's thread; the in-memory store never waits, so its futures complete
//! on their first poll. The same sequence of operations always produces the same trace.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use orchestrator_core::assignment::holdings;
use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, EventStore, Fence, ReadRequest, StoreError,
};
use orchestrator_core::{
    Clock, Command, Engine, EngineConfig, Epoch, EventId, ExpectedVersion, Generation, Input,
    NewEvent, Position, ReplicaSetName, Scope, Slot, SlotCount, Strategy, StreamId, Timing, Uuid,
    WorkerId,
};
use orchestrator_memory::{ManualClock, MemoryStore};

/// The projection the simulated workers run.
pub const PROJECTION: &str = "sim_audit";
const APPLIED: &str = "applied";
const VERSIONS: &str = "versions";

/// Runs a future of the in-memory store, which completes on its first poll.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("the in-memory store never waits"),
    }
}

/// Fast timing so a simulated minute is a few hundred steps.
pub fn sim_timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_millis(500),
        stale_worker_timeout: Duration::from_millis(2_000),
        coordination_timeout: Duration::from_millis(4_000),
        poll_interval: Duration::from_millis(200),
        registration_wait: Duration::from_millis(300),
    }
}

/// What a simulated worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Driven at every step.
    Running,
    /// Frozen (SIGSTOP): keeps its state, does nothing until resumed.
    Paused,
    /// Gone without a word (kill -9).
    Crashed,
    /// Left gracefully.
    Left,
}

/// One simulated worker process.
#[derive(Debug)]
pub struct SimWorker {
    /// Its id.
    pub id: WorkerId,
    /// What it is doing.
    pub status: Status,
    engine: Engine,
    /// Slots its processor runs, with the epoch and the next position to read after.
    processing: BTreeMap<Slot, (Epoch, Position)>,
}

/// A simulated cluster of workers sharing one in-memory store.
#[derive(Debug)]
pub struct Cluster {
    /// The store's clock.
    pub clock: Arc<ManualClock>,
    /// The shared store.
    pub store: MemoryStore,
    /// Every worker ever started, in start order.
    pub workers: Vec<SimWorker>,
    /// What happened, one line per command or notice, for replay comparison and failure reports.
    pub trace: Vec<String>,
    /// Invariant violations seen so far.
    pub violations: Vec<String>,
    replica_set: ReplicaSetName,
    slot_count: SlotCount,
    strategy: Strategy,
    timing: Timing,
    appended: u64,
    highest_generation: Generation,
    batch_size: usize,
}

impl Cluster {
    /// An empty cluster with the fast [`sim_timing`].
    pub fn new(strategy: Strategy, slot_count: SlotCount) -> Self {
        Self::with_timing(strategy, slot_count, sim_timing())
    }

    /// An empty cluster with the given timing.
    pub fn with_timing(strategy: Strategy, slot_count: SlotCount, timing: Timing) -> Self {
        let clock = Arc::new(ManualClock::default());
        let store = MemoryStore::new(slot_count, clock.clone());
        Self {
            clock,
            store,
            workers: Vec::new(),
            trace: Vec::new(),
            violations: Vec::new(),
            replica_set: ReplicaSetName::new("sim").expect("valid name"),
            slot_count,
            strategy,
            timing,
            appended: 0,
            highest_generation: Generation::ZERO,
            batch_size: 10,
        }
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("{:>7} {line}", self.clock.now().as_millis() % 10_000_000));
    }

    /// Starts a new worker; returns its index.
    pub fn join(&mut self) -> usize {
        let index = self.workers.len();
        let id = WorkerId::new(format!("worker-{index}")).expect("valid id");
        let engine = Engine::new(EngineConfig {
            replica_set: self.replica_set.clone(),
            worker_id: id.clone(),
            slot_count: self.slot_count,
            timing: self.timing,
            strategy: self.strategy,
        });
        self.workers.push(SimWorker {
            id,
            status: Status::Running,
            engine,
            processing: BTreeMap::new(),
        });
        self.feed(index, Input::Start);
        index
    }

    /// Asks a running worker to leave gracefully.
    pub fn leave(&mut self, index: usize) {
        if self.workers[index].status == Status::Running {
            self.feed(index, Input::Shutdown);
        }
    }

    /// Kills a worker without letting it say anything.
    pub fn crash(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        if matches!(worker.status, Status::Running | Status::Paused) {
            worker.status = Status::Crashed;
            let id = worker.id.clone();
            self.log(format!("{id} crashed"));
        }
    }

    /// Freezes a worker.
    pub fn pause(&mut self, index: usize) {
        if self.workers[index].status == Status::Running {
            self.workers[index].status = Status::Paused;
            let id = self.workers[index].id.clone();
            self.log(format!("{id} paused"));
        }
    }

    /// Thaws a frozen worker. Like a process after SIGCONT, it first finishes the batch it was in:
    /// it processes its slots before it learns anything new.
    pub fn resume(&mut self, index: usize) {
        if self.workers[index].status == Status::Paused {
            self.workers[index].status = Status::Running;
            let id = self.workers[index].id.clone();
            self.log(format!("{id} resumed"));
            self.process(index);
        }
    }

    /// Appends `n` events spread over a few aggregates.
    pub fn append(&mut self, n: u64) {
        for _ in 0..n {
            self.appended += 1;
            let seq = self.appended;
            let stream = StreamId::new("sim", "Account", format!("acct-{}", seq % 13));
            let event =
                NewEvent::new(EventId(Uuid::from_u64_pair(0, seq)), "Deposited", Vec::new());
            ready(self.store.append(&stream, ExpectedVersion::Any, vec![event]))
                .expect("append to memory");
        }
    }

    /// Lets time pass in steps of at most 100 ms, driving every running worker at each step.
    pub fn advance(&mut self, by: Duration) {
        let step = Duration::from_millis(100);
        let mut left = by;
        while !left.is_zero() {
            let this = left.min(step);
            self.clock.advance(this);
            left -= this;
            for index in 0..self.workers.len() {
                if self.workers[index].status == Status::Running {
                    self.feed(index, Input::Tick);
                    self.process(index);
                }
            }
            self.check_invariants();
        }
    }

    /// Runs one batch of the worker's processor over the slots it processes.
    pub fn process(&mut self, index: usize) {
        if self.workers[index].status != Status::Running
            || self.workers[index].processing.is_empty()
        {
            return;
        }
        let worker = &self.workers[index];
        let request = ReadRequest {
            cursors: worker.processing.iter().map(|(slot, (_, after))| (*slot, *after)).collect(),
            scope: Scope::all(),
            limit: self.batch_size,
        };
        let events = ready(self.store.read(&request)).expect("read memory");
        if events.is_empty() {
            return;
        }
        let fence = Fence {
            replica_set: self.replica_set.clone(),
            worker: worker.id.clone(),
            grants: worker.processing.iter().map(|(slot, (epoch, _))| (*slot, *epoch)).collect(),
        };
        let mut tx = ready(self.store.begin()).expect("begin");
        let mut checkpoints = BTreeMap::new();
        let mut order_errors = Vec::new();
        for event in &events {
            let key = event.position.global.to_string();
            let times = tx.get(APPLIED, &key).map_or(0, |v| v[0]) + 1;
            tx.put(APPLIED, &key, vec![times]);
            let aggregate = &event.stream.aggregate_id;
            let last = tx
                .get(VERSIONS, aggregate)
                .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])));
            if event.aggregate_version != last + 1 {
                order_errors.push(format!(
                    "{aggregate}: version {} applied after {last}",
                    event.aggregate_version
                ));
            }
            tx.put(VERSIONS, aggregate, event.aggregate_version.to_be_bytes().to_vec());
            checkpoints.insert(event.slot, event.position);
        }
        let id = worker.id.clone();
        match ready(self.store.commit(tx, &fence, PROJECTION, &checkpoints)) {
            Ok(()) => {
                self.violations.extend(order_errors);
                let processing = &mut self.workers[index].processing;
                for (slot, position) in &checkpoints {
                    if let Some(entry) = processing.get_mut(slot) {
                        entry.1 = *position;
                    }
                }
                self.log(format!("{id} committed {} events", events.len()));
            }
            Err(StoreError::Fenced { slot, .. }) => {
                // The runtime's reaction: stop processing what it no longer owns; the engine
                // confirms at its next observation.
                self.log(format!("{id} fenced on slot {slot}"));
                self.workers[index].processing.clear();
            }
            Err(err) => self.violations.push(format!("{id}: unexpected commit error {err}")),
        }
    }

    fn feed(&mut self, index: usize, input: Input) {
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let now = self.clock.now();
            let worker = &mut self.workers[index];
            worker.engine.handle(now, input);
            let commands = worker.engine.take_commands();
            let notices = worker.engine.take_notices();
            let id = worker.id.clone();
            for notice in notices {
                self.log(format!("{id} notice {notice:?}"));
            }
            let mut results = Vec::new();
            for command in commands {
                self.log(format!("{id} {command:?}"));
                results.extend(self.execute(index, command));
            }
            // Results are fed in the order the commands ran.
            queue.extend(results.into_iter().rev());
        }
    }

    fn execute(&mut self, index: usize, command: Command) -> Option<Input> {
        let rs = self.replica_set.clone();
        let worker = &mut self.workers[index];
        let id = worker.id.clone();
        let store = &self.store;
        match command {
            Command::Register => {
                let incarnation =
                    ready(store.register(&rs, self.slot_count, &id)).expect("register");
                Some(Input::Registered(incarnation))
            }
            Command::Heartbeat { incarnation, .. } => {
                match ready(store.heartbeat(
                    &rs,
                    &id,
                    incarnation,
                    self.timing.stale_worker_timeout,
                )) {
                    Ok(_) => Some(Input::HeartbeatAcked),
                    Err(StoreError::NotRegistered { .. }) => Some(Input::NotRegistered),
                    Err(err) => panic!("heartbeat: {err}"),
                }
            }
            Command::Observe => {
                let snapshot = ready(store.snapshot(&rs)).expect("snapshot");
                if snapshot.generation < self.highest_generation {
                    self.violations.push(format!(
                        "generation went back from {} to {}",
                        self.highest_generation, snapshot.generation
                    ));
                }
                self.highest_generation = self.highest_generation.max(snapshot.generation);
                Some(Input::Observed(snapshot))
            }
            Command::CreateGeneration(plan) => {
                let _ = ready(store.create_generation(&rs, &plan));
                None
            }
            Command::StartSlot { slot, epoch } => {
                let loaded = ready(store.load(&rs, PROJECTION, &[slot])).expect("load checkpoint");
                worker.processing.insert(slot, (epoch, loaded[&slot]));
                None
            }
            Command::StopSlot { slot } => {
                worker.processing.remove(&slot);
                Some(Input::SlotStopped(slot))
            }
            Command::ReleaseSlot { slot, epoch } => {
                let _ = ready(store.release_slot(&rs, &id, slot, epoch));
                None
            }
            Command::AckGeneration { incarnation, generation } => {
                match ready(store.ack_generation(&rs, &id, incarnation, generation)) {
                    Err(StoreError::NotRegistered { .. }) => Some(Input::NotRegistered),
                    _ => None,
                }
            }
            Command::Deregister { incarnation } => {
                ready(store.deregister(&rs, &id, incarnation)).expect("deregister");
                worker.status = Status::Left;
                Some(Input::Deregistered)
            }
        }
    }

    /// Checks the invariants that must hold after every step:
    /// at most one worker processes a slot under its current epoch, and that worker owns it;
    /// no committed event took effect twice.
    pub fn check_invariants(&mut self) {
        if !self.violations.is_empty() {
            return; // the first report is the useful one
        }
        let Ok(snapshot) = ready(self.store.snapshot(&self.replica_set)) else { return };
        for slot in self.slot_count.all() {
            let record = snapshot.slot(slot);
            let current: Vec<&SimWorker> = self
                .workers
                .iter()
                .filter(|w| matches!(w.status, Status::Running | Status::Paused))
                .filter(|w| w.processing.get(&slot).is_some_and(|(e, _)| *e == record.epoch))
                .collect();
            if current.len() > 1
                || current.first().is_some_and(|w| record.owner.as_ref() != Some(&w.id))
            {
                let ids: Vec<_> = current.iter().map(|w| w.id.to_string()).collect();
                self.violations.push(format!(
                    "slot {slot} processed at epoch {} by {ids:?}, owner {:?}",
                    record.epoch, record.owner
                ));
            }
        }
        for (key, times) in self.store.read_model_table(APPLIED) {
            if times[0] != 1 {
                self.violations.push(format!("event {key} applied {} times", times[0]));
            }
        }
    }

    /// Resumes paused workers and lets the cluster run with no further faults until every event is
    /// processed and ownership is settled, or `limit` of simulated time passed.
    pub fn quiesce(&mut self, limit: Duration) {
        for index in 0..self.workers.len() {
            self.resume(index);
        }
        let step = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while waited < limit {
            self.advance(step);
            waited += step;
            if self.settled() && self.all_applied() {
                break;
            }
        }
    }

    /// Ids of the running workers, sorted like generation members.
    fn live_ids(&self) -> Vec<WorkerId> {
        let mut live: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|w| w.status == Status::Running)
            .map(|w| w.id.clone())
            .collect();
        live.sort();
        live
    }

    /// Whether every slot is owned and processed by a live member, members are exactly the live
    /// workers, and the assignment is balanced.
    pub fn settled(&self) -> bool {
        let Ok(snapshot) = ready(self.store.snapshot(&self.replica_set)) else { return false };
        let live = self.live_ids();
        if live.is_empty() || snapshot.members != live {
            return false;
        }
        let mut owners = Vec::new();
        for slot in self.slot_count.all() {
            let record = snapshot.slot(slot);
            let Some(owner) = record.owner.clone() else { return false };
            let processed = self.workers.iter().any(|w| {
                w.id == owner
                    && w.status == Status::Running
                    && w.processing.get(&slot).is_some_and(|(e, _)| *e == record.epoch)
            });
            if record.next_owner.is_some() || !processed {
                return false;
            }
            owners.push(owner);
        }
        let counts = holdings(&owners);
        let (lo, hi) = (counts.values().min().copied(), counts.values().max().copied());
        let balanced = lo.zip(hi).is_some_and(|(lo, hi)| hi - lo <= 1);
        balanced && (counts.len() == live.len() || self.slot_count.get() < live.len() as u32)
    }

    /// Whether every appended event has been applied exactly once.
    pub fn all_applied(&self) -> bool {
        let applied = self.store.read_model_table(APPLIED);
        applied.len() as u64 == self.appended && applied.values().all(|v| v[0] == 1)
    }

    /// Simulated time since the cluster was created.
    pub fn elapsed(&self) -> Duration {
        self.clock.now().saturating_since(ManualClock::default().now())
    }

    /// Number of events appended.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Members and partitions as the store sees them: `(generation, [(worker, slots)])`.
    pub fn membership(&self) -> (Generation, Vec<(WorkerId, usize)>) {
        let Ok(snapshot) = ready(self.store.snapshot(&self.replica_set)) else {
            return (Generation::ZERO, Vec::new());
        };
        let counts: Vec<_> =
            snapshot.members.iter().map(|m| (m.clone(), snapshot.owned_by(m).len())).collect();
        (snapshot.generation, counts)
    }

    /// Notices of a kind seen in the trace, for reports.
    pub fn count_in_trace(&self, needle: &str) -> usize {
        self.trace.iter().filter(|line| line.contains(needle)).count()
    }
}
