//! The coordination task: drives the core [`Engine`] with time and store results, executes its
//! commands, and hands slot starts and stops to the processor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ports::{Change, ChangeFeed, CheckpointStore, EventStore, StoreError};
use orchestrator_core::{
    Clock, Command, Engine, EngineConfig, Generation, Input, Notice, Partition, Snapshot, Timestamp,
};
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};

use crate::Store;
use crate::clock::SystemClock;
use crate::error::RunError;
use crate::health::WorkerHealth;
use crate::metrics::{Metrics, WorkerState};
use crate::processor::{Control, Processor, Report};
use crate::projection::Projection;
use crate::settings::Settings;
use crate::telemetry::Telemetry;

/// One worker of a replica set: build it with [`Orchestrator::new`], then [`Orchestrator::run`].
pub struct Orchestrator<S: Store> {
    store: S,
    settings: Settings,
    wake: Arc<Notify>,
    changes: Option<Box<dyn ChangeFeed>>,
    telemetry: Option<Telemetry>,
}

impl<S: Store> std::fmt::Debug for Orchestrator<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl<S: Store> Orchestrator<S> {
    /// A worker on `store` with `settings`, validated now: a bad setting or a slot count that
    /// differs from the event store's is refused before anything starts.
    pub fn new(store: S, settings: Settings) -> Result<Self, RunError> {
        settings.validate()?;
        let stored = EventStore::slot_count(&store);
        if stored != settings.slots {
            return Err(RunError::InvalidSetting(crate::settings::InvalidSetting {
                setting: "slots".to_owned(),
                rule: format!(
                    "the event store buckets events into {stored} slots, the configuration says {}",
                    settings.slots
                ),
            }));
        }
        Ok(Self { store, settings, wake: Arc::new(Notify::new()), changes: None, telemetry: None })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Wakes the worker when the store reports a change (PostgreSQL: LISTEN/NOTIFY), instead of
    /// waiting for the next poll: new events are processed within milliseconds, and joins, leaves
    /// and handoffs are seen at once.
    #[must_use]
    pub fn with_change_feed(mut self, feed: impl ChangeFeed + 'static) -> Self {
        self.changes = Some(Box::new(feed));
        self
    }

    /// Records this worker's metrics and health in `telemetry` (serve it with
    /// [`Telemetry::serve`]) and shows its replica set on the status page served there (`/`);
    /// several workers of one process may share one. Without it, metrics go
    /// to the global opentelemetry meter provider (a no-op unless the application installed one).
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: &Telemetry) -> Self {
        let (replica_set, strategy) = (self.settings.replica_set.clone(), self.settings.strategy);
        telemetry.status_page().show(self.store.clone(), replica_set, strategy);
        self.telemetry = Some(telemetry.clone());
        self
    }

    /// Joins the replica set and processes `projections` until `shutdown` completes, then leaves
    /// gracefully: the batch in flight finishes, the worker deregisters and its slots are handed to
    /// the others at once.
    ///
    /// Database errors and slow coordination are retried forever; the worker only returns early
    /// when the store refuses it for good or a projection fails on an event after its retries.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
        projections: Vec<Arc<dyn Projection<<S as CheckpointStore>::Tx>>>,
    ) -> Result<(), RunError> {
        let settings = self.settings.clone();
        let clock = SystemClock::new();
        let rs = settings.replica_set.as_str();
        let (metrics, health) = match &self.telemetry {
            Some(telemetry) => {
                (Metrics::new(telemetry.meter(), &settings.replica_set), telemetry.health().add(rs))
            }
            None => (
                Metrics::new(&opentelemetry::global::meter("orchestrator"), &settings.replica_set),
                WorkerHealth::detached(rs),
            ),
        };
        let metrics = Arc::new(metrics);
        metrics.zero(&projections.iter().map(|p| p.name()).collect::<Vec<_>>());
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (report_tx, mut report_rx) = mpsc::unbounded_channel();
        let processor = Processor {
            store: self.store.clone(),
            replica_set: settings.replica_set.clone(),
            worker: settings.worker_id.clone(),
            projections,
            batch_size: settings.batch_size,
            idle_poll: settings.idle_poll,
            retry: settings.retry,
            wake: self.wake.clone(),
            metrics: metrics.clone(),
            lag_interval: settings.timing.heartbeat_interval,
        };
        // Aborted if this future is dropped (a crash): no processing may outlive its worker.
        let mut processing = AbortOnDrop(tokio::spawn(processor.run(control_rx, report_tx)));

        let mut driver = Driver {
            store: self.store,
            settings: settings.clone(),
            engine: Engine::new(EngineConfig {
                replica_set: settings.replica_set.clone(),
                worker_id: settings.worker_id.clone(),
                slot_count: settings.slots,
                timing: settings.timing,
                strategy: settings.strategy,
            }),
            control: control_tx,
            outcome: Ok(()),
            announced: false,
            leave_deadline: None,
            metrics: metrics.clone(),
            health: health.clone(),
        };
        let coordination_changed = Arc::new(Notify::new());
        let _listening = self.changes.map(|feed| {
            AbortOnDrop(tokio::spawn(relay_changes(
                feed,
                settings.replica_set.clone(),
                self.wake.clone(),
                coordination_changed.clone(),
            )))
        });
        let mut shutdown = std::pin::pin!(shutdown);
        let mut stopping = false;
        driver.feed(clock.now(), Input::Start).await;
        while !driver.engine.has_left() {
            if driver.outcome.is_err() && !stopping {
                stopping = true;
                driver.begin_leaving(clock.now()).await;
                continue;
            }
            if driver.leave_deadline.is_some_and(|deadline| clock.now() >= deadline) {
                warn!(
                    "Leaving took longer than coordination_timeout; exiting without deregistering"
                );
                break;
            }
            let deadline =
                driver.engine.next_deadline().unwrap_or(clock.now() + Duration::from_millis(100));
            let wait =
                Duration::from_millis(deadline.as_millis().saturating_sub(clock.now().as_millis()));
            tokio::select! {
                // Biased (polled in order), so that runs under a paused clock are repeatable.
                biased;
                () = tokio::time::sleep(wait) => driver.feed(clock.now(), Input::Tick).await,
                report = report_rx.recv() => match report {
                    Some(Report::Stopped(slot)) => driver.feed(clock.now(), Input::SlotStopped(slot)).await,
                    Some(Report::Lost(slot)) => {
                        // The processor dropped the slot; the engine re-starts it (with its
                        // checkpoint reloaded) if the store still says it is ours.
                        tracing::debug!(%slot, "Slot lost; observing the new ownership");
                        driver.feed(clock.now(), Input::SlotStopped(slot)).await;
                        driver.observe(clock.now()).await;
                    }
                    Some(Report::Failed(err)) => driver.outcome = Err(err),
                    None => break,
                },
                () = coordination_changed.notified() => driver.observe(clock.now()).await,
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    driver.begin_leaving(clock.now()).await;
                }
            }
        }
        drop(driver.control);
        let _ = (&mut processing.0).await;
        metrics.state(WorkerState::Stopped);
        health.stopped();
        driver.outcome
    }
}

/// Turns store change hints into wake-ups of the processor and of the coordination loop.
async fn relay_changes(
    mut feed: Box<dyn ChangeFeed>,
    replica_set: orchestrator_core::ReplicaSetName,
    events: Arc<Notify>,
    coordination: Arc<Notify>,
) {
    loop {
        match feed.next_change().await {
            Ok(Change::Events) => events.notify_one(),
            Ok(Change::Coordination(changed)) if changed == replica_set => {
                coordination.notify_one()
            }
            Ok(Change::Coordination(_)) => {}
            Err(err) => {
                // Polling carries on meanwhile; the feed reconnects on the next call.
                warn!(%err, "Change notifications interrupted; polling until they resume");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Driver<S: Store> {
    store: S,
    settings: Settings,
    engine: Engine,
    control: mpsc::UnboundedSender<Control>,
    outcome: Result<(), RunError>,
    announced: bool,
    leave_deadline: Option<Timestamp>,
    metrics: Arc<Metrics>,
    health: Arc<WorkerHealth>,
}

impl<S: Store> Driver<S> {
    async fn begin_leaving(&mut self, now: Timestamp) {
        info!(worker_id = %self.settings.worker_id, "Worker leaving: finishing the batch in flight, then deregistering");
        self.leave_deadline = Some(now + self.settings.timing.coordination_timeout);
        self.metrics.state(WorkerState::Leaving);
        self.health.set_ready(false);
        self.feed(now, Input::Shutdown).await;
    }

    async fn observe(&mut self, now: Timestamp) {
        if let Some(input) = self.execute(Command::Observe).await {
            self.feed(now, input).await;
        }
    }

    /// Feeds an input, then executes the commands it produced, feeding their outcomes back.
    async fn feed(&mut self, now: Timestamp, input: Input) {
        let mut inputs = vec![input];
        while let Some(input) = inputs.pop() {
            let observed = match &input {
                Input::Observed(snapshot) => Some(snapshot.clone()),
                _ => None,
            };
            self.engine.handle(now, input);
            // Slots lost together (a reset fences every slot at once) make one warning, not one
            // per slot.
            let mut lost = Vec::new();
            for notice in self.engine.take_notices() {
                match notice {
                    Notice::OwnershipLost { slot } => lost.push(slot),
                    notice => self.log(&notice, observed.as_ref()),
                }
            }
            if !lost.is_empty() {
                self.log_lost(&lost, observed.as_ref());
            }
            let mut results = Vec::new();
            for command in self.engine.take_commands() {
                if let Some(result) = self.execute(command).await {
                    results.push(result);
                }
            }
            inputs.extend(results.into_iter().rev());
        }
    }

    async fn execute(&mut self, command: Command) -> Option<Input> {
        let rs = &self.settings.replica_set;
        let me = &self.settings.worker_id;
        let timing = self.settings.timing;
        match command {
            Command::Register => Some(self.register().await),
            Command::Heartbeat { incarnation } => {
                let started = tokio::time::Instant::now();
                match self.store.heartbeat(rs, me, incarnation, timing.stale_worker_timeout).await {
                    Ok(_) => {
                        let latency = started.elapsed();
                        tracing::debug!(?latency, "Heartbeat sent");
                        self.metrics.heartbeat(latency);
                        if self.leave_deadline.is_none() {
                            self.health.set_ready(true);
                        }
                        Some(Input::HeartbeatAcked)
                    }
                    Err(StoreError::NotRegistered { .. }) => Some(Input::NotRegistered),
                    Err(err) => {
                        warn!(%err, "Heartbeat failed; retrying at the next interval");
                        None
                    }
                }
            }
            Command::Observe => match self.store.snapshot(rs).await {
                Ok(snapshot) => {
                    let live = snapshot
                        .workers
                        .iter()
                        .filter(|w| w.heartbeat_age <= timing.stale_worker_timeout)
                        .count();
                    self.metrics.observed(snapshot.generation.0, snapshot.members.len(), live);
                    Some(Input::Observed(snapshot))
                }
                Err(err) => {
                    warn!(%err, "Reading the coordination state failed; retrying");
                    None
                }
            },
            Command::CreateGeneration(plan) => {
                match self.store.create_generation(rs, &plan).await {
                    Ok(()) => {
                        self.metrics.generation_created(plan.evict.len());
                        info!(
                            generation = plan.generation.0,
                            total_partitions = plan.members.len(),
                            "Generation created:"
                        );
                        for evicted in &plan.evict {
                            warn!(worker_id = %evicted, "Stale worker cleaned:");
                        }
                    }
                    Err(err) if err.is_conflict() => {
                        tracing::debug!(%err, "Generation plan superseded")
                    }
                    Err(err) => warn!(%err, "Creating a generation failed; retrying"),
                }
                None
            }
            Command::StartSlot { slot, epoch } => {
                let _ = self.control.send(Control::Start { slot, epoch });
                None
            }
            Command::StopSlot { slot } => {
                let _ = self.control.send(Control::Stop { slot });
                None
            }
            Command::ReleaseSlot { slot, epoch } => {
                if let Err(err) = self.store.release_slot(rs, me, slot, epoch).await {
                    tracing::debug!(%err, %slot, "Releasing a slot failed");
                }
                None
            }
            Command::AckGeneration { incarnation, generation } => {
                match self.store.ack_generation(rs, me, incarnation, generation).await {
                    Err(StoreError::NotRegistered { .. }) => Some(Input::NotRegistered),
                    Err(err) => {
                        warn!(%err, "Acknowledging a generation failed; retrying");
                        None
                    }
                    Ok(()) => None,
                }
            }
            Command::Deregister { incarnation } => {
                let mut attempt = 0u32;
                loop {
                    match self.store.deregister(rs, me, incarnation).await {
                        Ok(()) => {
                            info!(worker_id = %me, "Worker deregistered");
                            return Some(Input::Deregistered);
                        }
                        Err(err) if attempt < 5 && err.is_retryable() => {
                            attempt += 1;
                            warn!(%err, "Deregistering failed; retrying");
                            tokio::time::sleep(self.settings.retry.backoff(attempt)).await;
                        }
                        Err(err) => {
                            warn!(%err, "Deregistering failed; the others will take over once this worker is stale");
                            return Some(Input::Deregistered);
                        }
                    }
                }
            }
        }
    }

    /// Registers, retrying transient failures with backoff; a definite refusal ends the worker.
    async fn register(&mut self) -> Input {
        let mut attempt = 0u32;
        loop {
            match self
                .store
                .register(&self.settings.replica_set, self.settings.slots, &self.settings.worker_id)
                .await
            {
                Ok(incarnation) => return Input::Registered(incarnation),
                Err(err) if err.is_retryable() => {
                    attempt += 1;
                    warn!(%err, attempt, "Worker registration failed; retrying");
                    let backoff = Duration::from_millis(200).saturating_mul(1 << attempt.min(6));
                    tokio::time::sleep(backoff.min(self.settings.timing.heartbeat_interval)).await;
                }
                Err(err) => {
                    warn!(%err, "Worker registration failed");
                    self.outcome = Err(RunError::Store(err));
                    // Nothing to deregister: leaving now ends the worker.
                    return Input::Shutdown;
                }
            }
        }
    }

    fn log_lost(&self, slots: &[orchestrator_core::Slot], snapshot: Option<&Snapshot>) {
        let me = &self.settings.worker_id;
        let partition = snapshot.and_then(|s| s.partition_of(me)).map(|p| p.to_string());
        match slots {
            [slot] => {
                warn!(
                    slot = slot.0,
                    ?partition,
                    "Partition assignment mismatch: slot {slot} now belongs to another worker"
                );
            }
            _ => {
                let list: Vec<String> = slots.iter().map(|s| s.0.to_string()).collect();
                warn!(slots = %list.join(","), ?partition, "Partition assignment mismatch: {} slots now belong to another worker or have a new epoch", slots.len());
            }
        }
    }

    fn log(&mut self, notice: &Notice, snapshot: Option<&Snapshot>) {
        let me = &self.settings.worker_id;
        let partition = |snapshot: Option<&Snapshot>| snapshot.and_then(|s| s.partition_of(me));
        match notice {
            Notice::Registered { incarnation } => {
                info!(worker_id = %me, incarnation = incarnation.0, "Worker joined replica set {}", self.settings.replica_set);
                self.announced = false;
                self.metrics.registered();
            }
            Notice::BecameLeader => {
                info!(worker_id = %me, "Worker became the coordinator (leader lease taken)")
            }
            Notice::GenerationPlanned { .. } => {}
            Notice::CoordinationStarted { generation } => {
                self.metrics
                    .coordination_started(generation.0, partition(snapshot).map(|p| p.count));
                info!(generation = generation.0, "Coordination started:")
            }
            Notice::AllCoordinated { generation, duration } => {
                self.metrics.coordinated(*duration);
                info!(generation = generation.0, duration = %format!("{:.1}s", duration.as_secs_f64()), "All workers coordinated:");
            }
            Notice::CoordinationTimeout { generation } => {
                self.metrics.coordination_timed_out();
                warn!(generation = generation.0, "Coordination timeout:");
            }
            Notice::Processing { generation, partition: Some(p), slots } => {
                self.metrics.processing(generation.0, *slots);
                if !self.announced {
                    self.announced = true;
                    info!(worker_id = %me, partition = %p, "Worker registered:");
                }
                log_processing(*generation, *p, *slots);
            }
            Notice::Processing { generation, partition: None, slots } => {
                self.metrics.processing(generation.0, *slots);
                info!(generation = generation.0, slots, "Worker processing (not a member yet):");
            }
            Notice::OwnershipLost { slot } => self.log_lost(&[*slot], snapshot),
            Notice::ContactLost => {
                self.health.set_ready(false);
                warn!("No heartbeat acknowledged within stale_worker_timeout: pausing processing")
            }
            Notice::Superseded => {
                warn!(worker_id = %me, "Worker id registered again by another process: stopping");
                self.outcome = Err(RunError::Superseded(me.clone()));
            }
            Notice::IncompatibleWorkers { workers } => {
                let listed: Vec<String> = workers
                    .iter()
                    .map(|(id, protocol)| format!("{id} (protocol {protocol})"))
                    .collect();
                error!(
                    worker_id = %me,
                    workers = %listed.join(", "),
                    "Workers of another release are running: leaving"
                );
                self.outcome = Err(RunError::IncompatibleWorkers { workers: listed });
            }
        }
    }
}

fn log_processing(generation: Generation, partition: Partition, slots: usize) {
    info!(generation = generation.0, partition = %partition, slots, "Worker processing:");
}
