//! The worker's instruments: the seed's metric names (prefix `pupsourcing_orchestrator_`, kept for
//! dashboard compatibility) plus lag, fencing and the read horizon. Every one is recorded where the
//! behaviour it counts happens; docs/metrics.md lists them.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use orchestrator_core::ReplicaSetName;

const PREFIX: &str = "pupsourcing_orchestrator_";

/// Bucket bounds in seconds: 1 ms to a minute, covering batch, heartbeat and coordination times.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// What a worker is doing, as `worker_state{state=...}` (1 for the current state, 0 for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerState {
    Starting,
    Coordinating,
    Processing,
    Leaving,
    Stopped,
}

impl WorkerState {
    const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Coordinating,
        WorkerState::Processing,
        WorkerState::Leaving,
        WorkerState::Stopped,
    ];

    fn label(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Coordinating => "coordinating",
            WorkerState::Processing => "processing",
            WorkerState::Leaving => "leaving",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// The instruments of one worker, labelled with its replica set.
pub(crate) struct Metrics {
    replica_set: KeyValue,
    reconfigurations: Counter<u64>,
    generations: Counter<u64>,
    registrations: Counter<u64>,
    partition_assignments: Counter<u64>,
    stale_workers_cleaned: Counter<u64>,
    coordination_timeouts: Counter<u64>,
    events_processed: Counter<u64>,
    projection_errors: Counter<u64>,
    handler_timeouts: Counter<u64>,
    commits_fenced: Counter<u64>,
    events_parked: Counter<u64>,
    projection_stopped: Gauge<u64>,
    dead_letters: Gauge<u64>,
    active_workers: Gauge<u64>,
    current_generation: Gauge<u64>,
    current_generation_partitions: Gauge<u64>,
    owned_slots: Gauge<u64>,
    worker_state: Gauge<u64>,
    lag_events: Gauge<u64>,
    lag_seconds: Gauge<f64>,
    horizon_stall: Gauge<f64>,
    coordination_duration: Histogram<f64>,
    batch_duration: Histogram<f64>,
    heartbeat_latency: Histogram<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("replica_set", &self.replica_set).finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new(meter: &Meter, replica_set: &ReplicaSetName) -> Self {
        let name = |short: &str| format!("{PREFIX}{short}");
        let counter = |short: &str, help: &'static str| {
            meter.u64_counter(name(short)).with_description(help).build()
        };
        let gauge = |short: &str, help: &'static str| {
            meter.u64_gauge(name(short)).with_description(help).build()
        };
        let f64_gauge = |short: &str, help: &'static str| {
            meter.f64_gauge(name(short)).with_description(help).build()
        };
        let histogram = |short: &str, help: &'static str| {
            meter
                .f64_histogram(name(short))
                .with_description(help)
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build()
        };
        Self {
            replica_set: KeyValue::new("replica_set", replica_set.as_str().to_owned()),
            reconfigurations: counter(
                "reconfiguration_total",
                "Generations this worker coordinated in (rebalances it went through)",
            ),
            generations: counter("generations_total", "Generations this worker created as leader"),
            registrations: counter(
                "workers_registered_total",
                "Registrations of this worker in its replica set",
            ),
            partition_assignments: counter(
                "partition_assignments_total",
                "Partitions assigned to this worker, one per generation it processes in",
            ),
            stale_workers_cleaned: counter(
                "stale_workers_cleaned_total",
                "Stale workers this worker evicted as leader",
            ),
            coordination_timeouts: counter(
                "coordination_timeouts_total",
                "Coordinations that took longer than coordination_timeout",
            ),
            events_processed: counter(
                "events_processed_total",
                "Events handled and committed, per projection",
            ),
            projection_errors: counter(
                "projection_errors_total",
                "Handler failures, each attempt, per projection",
            ),
            handler_timeouts: counter(
                "handler_timeouts_total",
                "Batches abandoned because the handler did not return within HANDLER_TIMEOUT, per projection",
            ),
            commits_fenced: counter(
                "commits_fenced_total",
                "Commits refused because a slot had moved to another owner, per projection",
            ),
            events_parked: counter(
                "events_parked_total",
                "Events this worker parked as dead letters (failure policy park), per projection",
            ),
            projection_stopped: gauge(
                "projection_stopped",
                "1 while the projection is stopped in the replica set (failure policy stop), else 0",
            ),
            dead_letters: gauge(
                "dead_letters",
                "Parked events of the projection in the replica set, as the store holds them",
            ),
            active_workers: gauge("active_workers", "Live workers registered in the replica set"),
            current_generation: gauge("current_generation", "The replica set's current generation"),
            current_generation_partitions: gauge(
                "current_generation_partitions",
                "Members (partitions) of the current generation",
            ),
            owned_slots: gauge("owned_slots", "Slots this worker is processing"),
            worker_state: gauge(
                "worker_state",
                "1 for the state this worker is in, 0 for the others",
            ),
            lag_events: gauge(
                "projection_lag_events",
                "Events of this worker's slots after its checkpoints, in the projection's scope",
            ),
            lag_seconds: f64_gauge(
                "projection_lag_seconds",
                "Age of the oldest event this worker has not processed yet, by the database clock",
            ),
            horizon_stall: f64_gauge(
                "read_horizon_stall_seconds",
                "How long an open writing transaction has held reads back (PostgreSQL)",
            ),
            coordination_duration: histogram(
                "coordination_duration_seconds",
                "From coordination started to all workers coordinated",
            ),
            batch_duration: histogram(
                "event_processing_duration_seconds",
                "Handling and committing one batch of events, per projection",
            ),
            heartbeat_latency: histogram(
                "heartbeat_latency_seconds",
                "Round trip of one heartbeat to the database",
            ),
        }
    }

    fn labels(&self) -> [KeyValue; 1] {
        [self.replica_set.clone()]
    }

    fn projection_labels(&self, projection: &str) -> [KeyValue; 2] {
        [self.replica_set.clone(), KeyValue::new("projection", projection.to_owned())]
    }

    pub(crate) fn state(&self, current: WorkerState) {
        for state in WorkerState::ALL {
            let labels = [self.replica_set.clone(), KeyValue::new("state", state.label())];
            self.worker_state.record(u64::from(state == current), &labels);
        }
    }

    pub(crate) fn registered(&self) {
        self.registrations.add(1, &self.labels());
    }

    /// A new generation was adopted; `partitions` is its member count when this worker is one.
    pub(crate) fn coordination_started(&self, generation: u64, partitions: Option<usize>) {
        self.reconfigurations.add(1, &self.labels());
        if let Some(partitions) = partitions {
            self.partition_assignments.add(1, &self.labels());
            self.current_generation_partitions.record(partitions as u64, &self.labels());
        }
        self.current_generation.record(generation, &self.labels());
        self.state(WorkerState::Coordinating);
    }

    pub(crate) fn coordinated(&self, took: Duration) {
        self.coordination_duration.record(took.as_secs_f64(), &self.labels());
    }

    pub(crate) fn coordination_timed_out(&self) {
        self.coordination_timeouts.add(1, &self.labels());
    }

    pub(crate) fn processing(&self, generation: u64, slots: usize) {
        self.current_generation.record(generation, &self.labels());
        self.owned_slots.record(slots as u64, &self.labels());
        self.state(WorkerState::Processing);
    }

    pub(crate) fn observed(&self, generation: u64, members: usize, live_workers: usize) {
        self.current_generation.record(generation, &self.labels());
        self.current_generation_partitions.record(members as u64, &self.labels());
        self.active_workers.record(live_workers as u64, &self.labels());
    }

    pub(crate) fn generation_created(&self, evicted: usize) {
        self.generations.add(1, &self.labels());
        self.stale_workers_cleaned.add(evicted as u64, &self.labels());
    }

    pub(crate) fn heartbeat(&self, latency: Duration) {
        self.heartbeat_latency.record(latency.as_secs_f64(), &self.labels());
    }

    pub(crate) fn batch_committed(&self, projection: &str, events: usize, took: Duration) {
        let labels = self.projection_labels(projection);
        self.events_processed.add(events as u64, &labels);
        self.batch_duration.record(took.as_secs_f64(), &labels);
    }

    pub(crate) fn handler_failed(&self, projection: &str) {
        self.projection_errors.add(1, &self.projection_labels(projection));
    }

    pub(crate) fn handler_timed_out(&self, projection: &str) {
        self.handler_timeouts.add(1, &self.projection_labels(projection));
    }

    pub(crate) fn commit_fenced(&self, projection: &str) {
        self.commits_fenced.add(1, &self.projection_labels(projection));
    }

    pub(crate) fn parked(&self, projection: &str, events: usize) {
        self.events_parked.add(events as u64, &self.projection_labels(projection));
    }

    /// What the store says of a projection: whether it is stopped, and its dead letters.
    pub(crate) fn failures(&self, projection: &str, stopped: bool, dead_letters: u64) {
        let labels = self.projection_labels(projection);
        self.projection_stopped.record(u64::from(stopped), &labels);
        self.dead_letters.record(dead_letters, &labels);
    }

    pub(crate) fn lag(&self, projection: &str, events: u64, oldest: Option<Duration>) {
        let labels = self.projection_labels(projection);
        self.lag_events.record(events, &labels);
        self.lag_seconds.record(oldest.map_or(0.0, |age| age.as_secs_f64()), &labels);
    }

    pub(crate) fn horizon_stall(&self, stall: Duration) {
        self.horizon_stall.record(stall.as_secs_f64(), &self.labels());
    }

    /// Makes every series exist from the start (at zero), so dashboards and alerts see them
    /// before the first event or failure.
    pub(crate) fn zero(&self, projections: &[&str]) {
        let labels = self.labels();
        for counter in [
            &self.reconfigurations,
            &self.generations,
            &self.registrations,
            &self.partition_assignments,
            &self.stale_workers_cleaned,
            &self.coordination_timeouts,
        ] {
            counter.add(0, &labels);
        }
        for projection in projections {
            let labels = self.projection_labels(projection);
            for counter in [
                &self.events_processed,
                &self.projection_errors,
                &self.handler_timeouts,
                &self.commits_fenced,
                &self.events_parked,
            ] {
                counter.add(0, &labels);
            }
            self.lag(projection, 0, None);
            self.failures(projection, false, 0);
        }
        self.owned_slots.record(0, &labels);
        self.horizon_stall.record(0.0, &labels);
        self.state(WorkerState::Starting);
    }
}
