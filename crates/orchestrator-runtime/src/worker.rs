//! The coordination task: drives the core [`Engine`] with time and store results, executes its
//! commands, and hands slot starts and stops to the processor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ports::{
    Change, ChangeFeed, CheckpointStore, CoordinationStore, EventStore, StoreError,
};
use orchestrator_core::{
    Call, Clock, Command, Engine, EngineConfig, Exit, Generation, Input, Notice, Partition,
    Snapshot, Timestamp,
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
    clock: Arc<dyn Clock>,
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
        Ok(Self {
            store,
            settings,
            wake: Arc::new(Notify::new()),
            changes: None,
            telemetry: None,
            clock: Arc::new(SystemClock::new()),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Tells time by `clock` instead of the system clock ([`SystemClock`]). The engine's
    /// deadlines (heartbeats, observations, retries, the leave deadline) are read against it;
    /// waits between them still sleep on tokio's clock, so a clock that jumps ahead makes the
    /// worker act at its next wake-up.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
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
        settings.check_pool_size(projections.len(), self.changes.is_some())?;
        let clock = self.clock.clone();
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
            failure_policy: settings.failure_policy,
            wake: self.wake.clone(),
            metrics: metrics.clone(),
            lag_interval: settings.timing.heartbeat_interval,
            concurrency: settings.processing_concurrency,
            handler_timeout: settings.handler_timeout(),
            read_buffer_bytes: settings.shared_read_buffer,
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
            last_error: None,
            announced: false,
            leaving: false,
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
                        driver.feed(clock.now(), Input::SlotLost(slot)).await;
                    }
                    None => break,
                },
                () = coordination_changed.notified() => driver.observe(clock.now()).await,
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    driver.begin_leaving(clock.now()).await;
                }
            }
        }
        // Closing the processor's channel tells it to finish.
        drop(std::mem::replace(&mut driver.control, mpsc::unbounded_channel().0));
        if driver.engine.exit() == Some(&Exit::LeaveTimedOut) {
            // The leave ran out of time (a database that stays down): stop processing now.
            drop(processing);
        } else {
            let _ = (&mut processing.0).await;
        }
        metrics.state(WorkerState::Stopped);
        health.stopped();
        driver.finish()
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

/// The executor of the engine's commands: one coordination-store call per command, its outcome
/// fed back as an input (failures included); logs and metrics from the engine's notices.
struct Driver<C: CoordinationStore> {
    store: C,
    settings: Settings,
    engine: Engine,
    control: mpsc::UnboundedSender<Control>,
    /// A processor failure that ends the worker.
    outcome: Result<(), RunError>,
    /// The error of the last failed store call, for the log line and a refused registration.
    last_error: Option<StoreError>,
    announced: bool,
    leaving: bool,
    metrics: Arc<Metrics>,
    health: Arc<WorkerHealth>,
}

impl<C: CoordinationStore> Driver<C> {
    async fn begin_leaving(&mut self, now: Timestamp) {
        info!(worker_id = %self.settings.worker_id, "Worker leaving: finishing the batch in flight, then deregistering");
        self.leaving = true;
        self.metrics.state(WorkerState::Leaving);
        self.health.set_ready(false);
        self.feed(now, Input::Shutdown).await;
    }

    async fn observe(&mut self, now: Timestamp) {
        if let Some(input) = self.execute(Command::Observe).await {
            self.feed(now, input).await;
        }
    }

    /// What `run` returns, from why the engine ended and whether processing failed.
    fn finish(&mut self) -> Result<(), RunError> {
        let me = self.settings.worker_id.clone();
        match self.engine.exit() {
            Some(Exit::Refused) => {
                Err(RunError::Store(self.last_error.take().unwrap_or_else(|| StoreError::Other {
                    message: "registration refused".into(),
                    source: None,
                })))
            }
            Some(Exit::Superseded) => Err(RunError::Superseded(me)),
            Some(Exit::IncompatibleWorkers(workers)) => Err(RunError::IncompatibleWorkers {
                workers: workers
                    .iter()
                    .map(|(id, protocol)| format!("{id} (protocol {protocol})"))
                    .collect(),
            }),
            Some(Exit::Left | Exit::LeaveTimedOut) | None => {
                std::mem::replace(&mut self.outcome, Ok(()))
            }
        }
    }

    /// The outcome of a store call as the engine's input: `ok` on success, `CallFailed` with the
    /// error's own classification otherwise (the error is kept for the log line).
    fn answer<T>(
        &mut self,
        call: Call,
        result: Result<T, StoreError>,
        ok: impl FnOnce(T) -> Option<Input>,
    ) -> Option<Input> {
        match result {
            Ok(value) => ok(value),
            Err(StoreError::NotRegistered { .. })
                if matches!(call, Call::Heartbeat | Call::AckGeneration) =>
            {
                Some(Input::NotRegistered)
            }
            Err(err) => {
                let transient = err.is_retryable();
                self.last_error = Some(err);
                Some(Input::CallFailed { call, transient })
            }
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

    /// Executes one command: one port call (or one message to the processor), its outcome fed
    /// back as an input. Retries, backoff and deadlines are the engine's.
    async fn execute(&mut self, command: Command) -> Option<Input> {
        let rs = self.settings.replica_set.clone();
        let me = self.settings.worker_id.clone();
        let timing = self.settings.timing;
        match command {
            Command::Register => {
                let result = self.store.register(&rs, self.settings.slots, &me).await;
                self.answer(Call::Register, result, |incarnation| {
                    Some(Input::Registered(incarnation))
                })
            }
            Command::Heartbeat { incarnation, lease } => {
                let started = tokio::time::Instant::now();
                let result = self.store.heartbeat(&rs, &me, incarnation, lease).await;
                if result.is_ok() {
                    let latency = started.elapsed();
                    tracing::debug!(?latency, "Heartbeat sent");
                    self.metrics.heartbeat(latency);
                    if !self.leaving {
                        self.health.set_ready(true);
                    }
                }
                self.answer(Call::Heartbeat, result, |_| Some(Input::HeartbeatAcked))
            }
            Command::Observe => {
                let result = self.store.snapshot(&rs).await;
                if let Ok(snapshot) = &result {
                    let live = snapshot
                        .workers
                        .iter()
                        .filter(|w| w.is_live(timing.stale_worker_timeout))
                        .count();
                    self.metrics.observed(snapshot.generation.0, snapshot.members.len(), live);
                }
                self.answer(Call::Observe, result, |snapshot| Some(Input::Observed(snapshot)))
            }
            Command::CreateGeneration(plan) => {
                let result = self.store.create_generation(&rs, &plan).await;
                if result.is_ok() {
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
                self.answer(Call::CreateGeneration, result, |()| None)
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
                let result = self.store.release_slot(&rs, &me, slot, epoch).await;
                self.answer(Call::ReleaseSlot, result, |()| None)
            }
            Command::AckGeneration { incarnation, generation } => {
                let result = self.store.ack_generation(&rs, &me, incarnation, generation).await;
                self.answer(Call::AckGeneration, result, |()| None)
            }
            Command::Deregister { incarnation } => {
                let result = self.store.deregister(&rs, &me, incarnation).await;
                if result.is_ok() {
                    info!(worker_id = %me, "Worker deregistered");
                }
                self.answer(Call::Deregister, result, |()| Some(Input::Deregistered))
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
            Notice::HandoffForced { slot, from, to } => {
                self.metrics.coordination_timed_out();
                warn!(
                    %slot,
                    %from,
                    %to,
                    "Coordination timeout: the owner did not release the slot within coordination_timeout; it moves anyway and the owner's late commit is fenced"
                );
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
            }
            Notice::RetryScheduled { call, attempt, after } => {
                let err = self.last_error.as_ref().map(ToString::to_string).unwrap_or_default();
                match call {
                    Call::Register => {
                        warn!(%err, attempt, ?after, "Worker registration failed; retrying")
                    }
                    _ => warn!(%err, ?call, attempt, ?after, "Store call failed; retrying"),
                }
            }
            Notice::CallFailed { call, transient } => {
                let err = self.last_error.as_ref().map(ToString::to_string).unwrap_or_default();
                match (call, transient) {
                    (Call::Register, _) => warn!(%err, "Worker registration failed"),
                    (Call::Deregister, _) => warn!(
                        %err,
                        "Deregistering failed; the others take over once this worker is stale"
                    ),
                    (Call::Heartbeat, _) => {
                        warn!(%err, "Heartbeat failed; retrying at the next interval")
                    }
                    (Call::Observe, _) => {
                        warn!(%err, "Reading the coordination state failed; retrying")
                    }
                    (Call::ReleaseSlot, _) => tracing::debug!(%err, "Releasing a slot failed"),
                    _ => warn!(%err, ?call, "Store call failed; retrying"),
                }
            }
            Notice::LeaveTimedOut => warn!(
                "Leaving took longer than coordination_timeout; exiting without deregistering"
            ),
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
            }
        }
    }
}

fn log_processing(generation: Generation, partition: Partition, slots: usize) {
    info!(generation = generation.0, partition = %partition, slots, "Worker processing:");
}

#[cfg(test)]
mod tests {
    //! The executor against mocked ports: exact call sequences for a join, a failed heartbeat,
    //! a refused generation and a registration retried at the engine's deadline.

    use mockall::Sequence;
    use mockall::predicate::eq;
    use orchestrator_core::ports::{HeartbeatAck, MockCoordinationStore};
    use orchestrator_core::{
        Generation, GenerationPlan, Incarnation, ReplicaSetName, SlotCount, Snapshot, Timing,
        WorkerId,
    };

    use super::*;

    const T0: Timestamp = Timestamp(1_000_000);

    fn settings() -> Settings {
        let mut settings = Settings::new(ReplicaSetName::new("main").unwrap());
        settings.worker_id = WorkerId::new("w1").unwrap();
        settings.slots = SlotCount::new(4).unwrap();
        settings
    }

    fn driver(store: MockCoordinationStore) -> Driver<MockCoordinationStore> {
        let settings = settings();
        let rs = settings.replica_set.clone();
        Driver {
            store,
            engine: Engine::new(EngineConfig {
                replica_set: rs.clone(),
                worker_id: settings.worker_id.clone(),
                slot_count: settings.slots,
                timing: settings.timing,
                strategy: settings.strategy,
            }),
            settings,
            control: mpsc::unbounded_channel().0,
            outcome: Ok(()),
            last_error: None,
            announced: false,
            leaving: false,
            metrics: Arc::new(Metrics::new(&opentelemetry::global::meter("test"), &rs)),
            health: WorkerHealth::detached("main"),
        }
    }

    fn unavailable() -> StoreError {
        StoreError::Unavailable { message: "connection refused".into(), source: None }
    }

    fn empty_snapshot() -> Snapshot {
        Snapshot {
            replica_set: ReplicaSetName::new("main").unwrap(),
            slot_count: SlotCount::new(4).unwrap(),
            generation: Generation::ZERO,
            members: vec![],
            lease: None,
            workers: vec![],
            slots: vec![Default::default(); 4],
        }
    }

    #[tokio::test]
    async fn a_join_registers_then_heartbeats_with_the_stale_timeout_as_lease_then_observes() {
        let mut store = MockCoordinationStore::new();
        let mut order = Sequence::new();
        store
            .expect_register()
            .times(1)
            .in_sequence(&mut order)
            .returning(|_, _, _| Ok(Incarnation(3)));
        store
            .expect_heartbeat()
            .with(
                eq(ReplicaSetName::new("main").unwrap()),
                eq(WorkerId::new("w1").unwrap()),
                eq(Incarnation(3)),
                eq(Timing::default().stale_worker_timeout),
            )
            .times(1)
            .in_sequence(&mut order)
            .returning(|_, _, _, _| Ok(HeartbeatAck { leader: true }));
        store.expect_snapshot().times(1).in_sequence(&mut order).returning(|_| {
            let mut snapshot = empty_snapshot();
            snapshot.workers.push(orchestrator_core::WorkerRecord {
                id: WorkerId::new("w1").unwrap(),
                incarnation: Incarnation(3),
                heartbeat_age: Duration::ZERO,
                registered_age: Duration::ZERO,
                acked_generation: Generation::ZERO,
                protocol: orchestrator_core::PROTOCOL_VERSION,
            });
            Ok(snapshot)
        });
        let mut driver = driver(store);
        driver.feed(T0, Input::Start).await;
        assert_eq!(driver.engine.incarnation(), Some(Incarnation(3)));
    }

    #[tokio::test]
    async fn a_failed_heartbeat_is_one_call_answered_with_call_failed() {
        let mut store = MockCoordinationStore::new();
        store.expect_heartbeat().times(1).returning(|_, _, _, _| Err(unavailable()));
        let mut driver = driver(store);
        let command = Command::Heartbeat {
            incarnation: Incarnation(1),
            lease: Timing::default().stale_worker_timeout,
        };
        let answer = driver.execute(command).await;
        assert_eq!(answer, Some(Input::CallFailed { call: Call::Heartbeat, transient: true }));
        assert!(driver.last_error.is_some(), "kept for the log line");
    }

    #[tokio::test]
    async fn a_refused_generation_is_answered_and_the_engine_observes_again() {
        let mut store = MockCoordinationStore::new();
        let mut order = Sequence::new();
        store.expect_create_generation().times(1).in_sequence(&mut order).returning(|rs, plan| {
            Err(StoreError::GenerationConflict {
                replica_set: rs.clone(),
                expected: plan.expected,
                actual: Generation(9),
            })
        });
        store
            .expect_snapshot()
            .times(1)
            .in_sequence(&mut order)
            .returning(|_| Ok(empty_snapshot()));
        let mut driver = driver(store);
        let plan = GenerationPlan {
            expected: Generation(1),
            generation: Generation(2),
            leader: WorkerId::new("w1").unwrap(),
            leader_incarnation: Incarnation(1),
            members: vec![WorkerId::new("w1").unwrap()],
            changes: vec![],
            evict: vec![],
        };
        let answer = driver.execute(Command::CreateGeneration(plan)).await;
        assert_eq!(
            answer,
            Some(Input::CallFailed { call: Call::CreateGeneration, transient: false })
        );
        driver.feed(T0, answer.unwrap()).await;
    }

    /// The old owner of a slot whose handoff was forced releases it too late: the store says
    /// `Fenced`; that is one call, answered as a definite refusal, after which the engine looks at
    /// the store again.
    #[tokio::test]
    async fn a_fenced_release_is_one_call_answered_as_a_refusal_then_observed() {
        let mut store = MockCoordinationStore::new();
        let mut order = Sequence::new();
        store
            .expect_release_slot()
            .with(
                eq(ReplicaSetName::new("main").unwrap()),
                eq(WorkerId::new("w1").unwrap()),
                eq(orchestrator_core::Slot(3)),
                eq(orchestrator_core::Epoch(4)),
            )
            .times(1)
            .in_sequence(&mut order)
            .returning(|_, worker, slot, _| {
                Err(StoreError::Fenced { worker: worker.clone(), slot })
            });
        store
            .expect_snapshot()
            .times(1)
            .in_sequence(&mut order)
            .returning(|_| Ok(empty_snapshot()));
        let mut driver = driver(store);
        let command = Command::ReleaseSlot {
            slot: orchestrator_core::Slot(3),
            epoch: orchestrator_core::Epoch(4),
        };
        let answer = driver.execute(command).await;
        assert_eq!(answer, Some(Input::CallFailed { call: Call::ReleaseSlot, transient: false }));
        driver.feed(T0, answer.unwrap()).await;
    }

    #[tokio::test]
    async fn registration_is_tried_once_per_engine_deadline() {
        let mut store = MockCoordinationStore::new();
        let mut order = Sequence::new();
        store
            .expect_register()
            .times(2)
            .in_sequence(&mut order)
            .returning(|_, _, _| Err(unavailable()));
        let mut driver = driver(store);
        driver.feed(T0, Input::Start).await;
        let due = driver.engine.next_deadline().expect("a retry is scheduled");
        assert_eq!(due, T0 + Duration::from_millis(200));
        // A tick before the deadline calls nothing; at the deadline, exactly one attempt.
        driver.feed(T0 + Duration::from_millis(100), Input::Tick).await;
        driver.feed(due, Input::Tick).await;
        assert_eq!(driver.engine.next_deadline(), Some(due + Duration::from_millis(400)));
        driver.feed(due, Input::Shutdown).await;
        assert!(driver.engine.has_left());
        assert!(driver.finish().is_ok());
    }
}
