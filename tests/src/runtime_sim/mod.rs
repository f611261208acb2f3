//! The deterministic simulation of a whole cluster: real [`Orchestrator`] workers (the core engine
//! and the runtime's coordination and processing loops) over one in-memory store, on a paused
//! tokio clock, with a seeded fault injector. The same seed replays the same run, step for step.
//!
//! Faults: workers join, leave gracefully, crash (kill -9) and freeze past the stale timeout then
//! resume (SIGSTOP/SIGCONT) at random moments; heartbeats are lost or delayed; commits fail, are
//! delayed, or are written but reported as failed; other store calls fail; events are appended
//! concurrently throughout. Each worker runs five projections of different speeds, scopes and
//! failure policies (`audit.rs`) with its own `PROCESSING_CONCURRENCY` (1 to 4) and batch size, so
//! projections leave and rejoin the shared read, and slot groups commit side by side. One of them
//! fails for good on poison events and parks their keys. After every step the invariants of
//! docs/ARCHITECTURE.md are checked, and that no parked event was applied; at the end, with the
//! poison gone and every parked key retried, that every event took effect exactly once per
//! projection, in per-aggregate order.

mod audit;
pub mod faults;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_core::ports::{
    CoordinationStore, DeadLetterAction, DeadLetterFilter, DeadLetterStore, EventStore,
};
use orchestrator_core::{
    Clock, EventId, ExpectedVersion, NewEvent, ReplicaSetName, SlotCount, Strategy, StreamId,
    Timestamp, Timing, Uuid, WorkerId,
};
use orchestrator_memory::MemoryStore;
use orchestrator_runtime::{Orchestrator, RunError, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::audit::{Audit, CARDS, Expected, PARKING};
use self::faults::{FaultRates, Faulty, Injector, Rng};

pub use self::audit::PROJECTIONS;

pub(crate) const REPLICA_SET: &str = "main-projections";
const AGGREGATES: u64 = 24;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds every random choice.
    pub seed: u64,
    /// Rebalancing strategy of every worker.
    pub strategy: Strategy,
    /// Random steps (each a fault, a membership change or an append burst) before winding down.
    pub steps: usize,
    /// Slots of the replica set.
    pub slots: u64,
    /// Fault rates of store calls.
    pub rates: FaultRates,
}

impl SimConfig {
    /// The standard run for a seed: 60 steps, 32 slots, standard fault rates, the strategy picked
    /// by the seed.
    pub fn standard(seed: u64) -> Self {
        let strategy =
            if seed.is_multiple_of(2) { Strategy::Incremental } else { Strategy::Recreate };
        Self { seed, strategy, steps: 60, slots: 32, rates: FaultRates::standard() }
    }
}

/// What a run did and whether it kept every invariant.
#[derive(Debug)]
pub struct SimReport {
    /// The configuration it ran.
    pub config: SimConfig,
    /// Every step, with its simulated time.
    pub trace: Vec<String>,
    /// Events appended.
    pub events: u64,
    /// Faults injected by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// The last generation.
    pub generations: u64,
    /// Simulated time the run took.
    pub simulated: Duration,
    /// The first invariant broken, if any.
    pub violation: Option<String>,
}

impl SimReport {
    /// A one-line summary.
    pub fn summary(&self) -> String {
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        format!(
            "seed {} ({:?}): {} events, {} generations, {:.0?} simulated, faults [{}]: {}",
            self.config.seed,
            self.config.strategy,
            self.events,
            self.generations,
            self.simulated,
            faults.join(", "),
            self.violation.as_deref().unwrap_or("PASS")
        )
    }

    /// The trace, one step per line.
    pub fn trace_text(&self) -> String {
        let mut out = String::new();
        for line in &self.trace {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// Simulated wall time, read off tokio's (paused) clock.
#[derive(Debug)]
struct SimClock {
    started: Instant,
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_000_000) + self.started.elapsed()
    }
}

fn timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_millis(500),
        stale_worker_timeout: Duration::from_millis(2_000),
        coordination_timeout: Duration::from_millis(4_000),
        poll_interval: Duration::from_millis(200),
        registration_wait: Duration::from_millis(300),
    }
}

/// A simulated worker process.
struct Process {
    id: WorkerId,
    store: Faulty,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
    /// Frozen until this simulated time.
    frozen_until: Option<Instant>,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    store: MemoryStore,
    injector: Injector,
    started: Instant,
    processes: Vec<Process>,
    next_worker: u32,
    appended: Arc<Mutex<Expected>>,
    appenders: Vec<JoinHandle<()>>,
    trace: Vec<String>,
    last_generation: u64,
    /// Whether the parking projection still fails on its poison events (until wind-down).
    poisoned: Arc<AtomicBool>,
}

/// Runs one seed to completion on a fresh single-threaded runtime with a paused clock.
pub fn run(config: SimConfig) -> SimReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    runtime.block_on(simulate(config))
}

async fn simulate(config: SimConfig) -> SimReport {
    let started = Instant::now();
    let clock = Arc::new(SimClock { started });
    let slots = SlotCount::new(config.slots).expect("a power of two");
    let store = MemoryStore::new(slots, clock);
    let mut rng = Rng::new(config.seed);
    let injector = Injector {
        rng: Arc::new(Mutex::new(Rng::new(rng.next_u64()))),
        rates: config.rates,
        calm: Arc::new(AtomicBool::new(false)),
        counts: Arc::default(),
    };
    let mut sim = Sim {
        config,
        rng,
        store,
        injector,
        started,
        processes: Vec::new(),
        next_worker: 1,
        appended: Arc::default(),
        appenders: Vec::new(),
        trace: Vec::new(),
        last_generation: 0,
        poisoned: Arc::new(AtomicBool::new(true)),
    };
    let violation = sim.drive().await.err();
    sim.report(violation)
}

impl Sim {
    fn log(&mut self, what: impl AsRef<str>) {
        let at = self.started.elapsed().as_secs_f64();
        self.trace.push(format!("[{at:>7.2}s] {}", what.as_ref()));
    }

    async fn drive(&mut self) -> Result<(), String> {
        let initial = 1 + self.rng.below(3);
        for _ in 0..initial {
            self.join();
        }
        self.append_burst(100);
        for _ in 0..self.config.steps {
            let pause = Duration::from_millis(100 + self.rng.below(1_400));
            tokio::time::sleep(pause).await;
            self.thaw_due();
            self.step();
            self.check().await?;
        }
        self.wind_down().await
    }

    fn running(&self) -> Vec<usize> {
        (0..self.processes.len()).filter(|i| !self.processes[*i].task.is_finished()).collect()
    }

    fn step(&mut self) {
        let running = self.running();
        let active: Vec<usize> =
            running.iter().copied().filter(|i| self.processes[*i].frozen_until.is_none()).collect();
        match self.rng.below(10) {
            0 | 1 if running.len() < 6 => self.join(),
            2 if active.len() > 1 => {
                let victim = active[self.rng.below(active.len() as u64) as usize];
                let process = &mut self.processes[victim];
                if let Some(stop) = process.stop.take() {
                    let _ = stop.send(());
                }
                let id = process.id.clone();
                self.log(format!("SIGTERM {id}: leaves gracefully"));
            }
            3 if active.len() > 1 => {
                let victim = active[self.rng.below(active.len() as u64) as usize];
                self.processes[victim].task.abort();
                let id = self.processes[victim].id.clone();
                self.log(format!("kill -9 {id}"));
            }
            4 if active.len() > 1 => {
                let victim = active[self.rng.below(active.len() as u64) as usize];
                let stale = timing().stale_worker_timeout;
                let frozen_for = stale + Duration::from_millis(200 + self.rng.below(2_500));
                let process = &mut self.processes[victim];
                process.store.freeze();
                process.frozen_until = Some(Instant::now() + frozen_for);
                let id = process.id.clone();
                self.log(format!("SIGSTOP {id} for {frozen_for:?} (stale after {stale:?})"));
            }
            5..=7 => {
                let n = 1 + self.rng.below(60);
                self.append_burst(n);
            }
            _ => {}
        }
    }

    fn thaw_due(&mut self) {
        let now = Instant::now();
        let mut thawed = Vec::new();
        for process in &mut self.processes {
            if process.frozen_until.is_some_and(|until| until <= now) {
                process.frozen_until = None;
                process.store.thaw();
                thawed.push(process.id.clone());
            }
        }
        for id in thawed {
            self.log(format!("SIGCONT {id}"));
        }
    }

    fn join(&mut self) {
        let id = WorkerId::new(format!("w{}", self.next_worker)).expect("a valid id");
        self.next_worker += 1;
        let store = Faulty::new(self.store.clone(), self.injector.clone());
        let mut settings = Settings::new(ReplicaSetName::new(REPLICA_SET).expect("valid"));
        settings.worker_id = id.clone();
        settings.slots = self.store.slot_count();
        settings.timing = timing();
        settings.strategy = self.config.strategy;
        settings.batch_size = 1 + self.rng.below(40) as usize;
        settings.processing_concurrency = 1 + self.rng.below(4) as usize;
        // From a few batches of shared reads kept in memory (slow projections fall out of the
        // shared read and rejoin it) to all of them.
        settings.shared_read_buffer =
            [4 << 10, 16 << 10, 64 << 10, 128 << 20][self.rng.below(4) as usize];
        // The slow projection hangs past it now and then (audit::HANG).
        settings.handler_timeout = Some(Duration::from_millis(1_000));
        settings.idle_poll = Duration::from_millis(50);
        settings.retry.initial_backoff = Duration::from_millis(20);
        settings.retry.max_attempts = 1_000;
        let projections = PROJECTIONS
            .iter()
            .map(|name| Arc::new(Audit::new(name, id.as_str(), self.poisoned.clone())) as _)
            .collect();
        let (stop, stopped) = oneshot::channel::<()>();
        let described = format!(
            "batch {}, concurrency {}, shared read buffer {} KiB",
            settings.batch_size,
            settings.processing_concurrency,
            settings.shared_read_buffer >> 10
        );
        let worker = Orchestrator::new(store.clone(), settings).expect("valid settings");
        let task = tokio::spawn(worker.run(
            async move {
                let _ = stopped.await;
            },
            projections,
        ));
        self.log(format!("start {id} ({described})"));
        self.processes.push(Process { id, store, stop: Some(stop), task, frozen_until: None });
    }

    /// Appends `n` events over a few aggregates, concurrently with everything else.
    fn append_burst(&mut self, n: u64) {
        let store = self.store.clone();
        let appended = self.appended.clone();
        let seed = self.rng.next_u64();
        self.log(format!("append {n} events"));
        self.appenders.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            for _ in 0..n {
                let aggregate = rng.below(AGGREGATES);
                // A quarter of the aggregates are cards, the scoped projection's share.
                let stream = if aggregate.is_multiple_of(4) {
                    StreamId::new("bank", CARDS, format!("card-{aggregate}"))
                } else {
                    StreamId::new("bank", "Account", format!("acct-{aggregate}"))
                };
                let id = {
                    let mut count = appended.lock().unwrap();
                    count.events += 1;
                    if stream.aggregate_type == CARDS {
                        count.cards += 1;
                    }
                    count.events
                };
                let event = NewEvent::new(
                    EventId(Uuid::from_u64_pair(0, id)),
                    "MoneyDeposited",
                    Vec::new(),
                );
                store.append(&stream, ExpectedVersion::Any, vec![event]).await.expect("append");
                if rng.chance(30) {
                    tokio::time::sleep(Duration::from_millis(rng.below(50))).await;
                }
            }
        }));
    }

    /// The invariants that hold at every moment: no event applied twice and every
    /// aggregate in version order in what was committed, generations never going back, every slot
    /// with at most one owner, that owner a registered worker.
    async fn check(&mut self) -> Result<(), String> {
        let rs = ReplicaSetName::new(REPLICA_SET).expect("valid");
        let snapshot = match self.store.snapshot(&rs).await {
            Ok(snapshot) => snapshot,
            Err(_) => return Ok(()), // no worker registered yet
        };
        let generation = snapshot.generation.0;
        if generation < self.last_generation {
            return Err(format!(
                "generation went back from {} to {generation}",
                self.last_generation
            ));
        }
        if generation > self.last_generation {
            self.last_generation = generation;
            let members: Vec<String> = snapshot.members.iter().map(|m| m.to_string()).collect();
            self.log(format!("generation {generation}: members [{}]", members.join(", ")));
        }
        for (index, record) in snapshot.slots.iter().enumerate() {
            if let Some(owner) = &record.owner
                && snapshot.worker(owner).is_none()
                && record.next_owner.is_none()
            {
                // An evicted owner's slots are granted away in the same change that evicts it.
                return Err(format!("slot {index} owned by {owner}, who is not registered"));
            }
        }
        audit::check_parked(&self.store).await?;
        audit::check_committed(&self.store, None)
    }

    async fn wind_down(&mut self) -> Result<(), String> {
        self.injector.calm.store(true, Ordering::Relaxed);
        self.log("faults stop; frozen workers resume");
        for process in &mut self.processes {
            process.frozen_until = None;
            process.store.thaw();
        }
        if self.running().len() < 2 {
            self.join();
        }
        for appender in std::mem::take(&mut self.appenders) {
            appender.await.map_err(|e| format!("appender failed: {e}"))?;
        }
        let appended = *self.appended.lock().unwrap();
        // The fix is deployed; the operator retries every parked key (`dlq retry --projection`).
        self.poisoned.store(false, Ordering::Relaxed);
        let parked = audit::check_parked(&self.store).await?;
        self.log(format!("the poison is gone; {parked} parked events are retried"));
        let rs = ReplicaSetName::new(REPLICA_SET).expect("valid");
        let everything =
            DeadLetterFilter { projection: Some(PARKING.into()), ..Default::default() };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.check().await?;
            // Asked again while letters remain: one parked after the request was made is retried
            // by the next one.
            let _ = self.store.request(&rs, &everything, DeadLetterAction::Retry).await;
            if audit::all_applied(&self.store, appended)
                && audit::check_parked(&self.store).await? == 0
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not every event was applied within 120 s of simulated time after the faults stopped: {}",
                    audit::progress(&self.store, appended)
                ));
            }
        }
        self.log("every event applied; workers leave");
        for process in &mut self.processes {
            if let Some(stop) = process.stop.take() {
                let _ = stop.send(());
            }
        }
        for process in std::mem::take(&mut self.processes) {
            match process.task.await {
                Ok(Ok(())) => {}
                Err(join) if join.is_cancelled() => {} // killed
                Ok(Err(err)) => return Err(format!("worker {} failed: {err}", process.id)),
                Err(join) => return Err(format!("worker {} panicked: {join}", process.id)),
            }
        }
        self.check().await?;
        audit::check_committed(&self.store, Some(appended))
    }

    fn report(self, violation: Option<String>) -> SimReport {
        let faults = self.injector.counts.lock().unwrap().clone();
        let events = self.appended.lock().unwrap().events;
        SimReport {
            simulated: self.started.elapsed(),
            generations: self.last_generation,
            config: self.config,
            trace: self.trace,
            events,
            faults,
            violation,
        }
    }
}
