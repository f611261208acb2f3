//! The processor against mocked ports: the exact calls of one slot's start, read and batch, and
//! what a fenced commit leads to (the slot reported lost, no further batch on it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mockall::Sequence;
use orchestrator_core::ports::{
    Appended, Backlog, DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId,
    DeadLetterRequest, Fence, ProjectionStop, ReadRequest, StoppedProjection, StoreError,
    StoreResult,
};
use orchestrator_core::{
    Epoch, Event, EventId, ExpectedVersion, NewEvent, PartitionKey, Position, ReplicaSetName, Slot,
    SlotCount, StreamId, Timestamp, Tracing, WorkerId,
};
use tokio::sync::mpsc;

use super::{Control, Processor, Report};
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::settings::Settings;

mockall::mock! {
    /// The ports the processor works through (`ProcessingStore`), `Tx` being `()`.
    Ports {}

    #[async_trait]
    impl orchestrator_core::ports::EventStore for Ports {
        fn slot_count(&self) -> SlotCount;
        async fn append_with_key<'k>(
            &self,
            stream: &StreamId,
            key: Option<&'k PartitionKey>,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> StoreResult<Appended>;
        async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>>;
        async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>>;
        async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog>;
    }

    #[async_trait]
    impl orchestrator_core::ports::CheckpointStore for Ports {
        type Tx = ();
        async fn load(
            &self,
            replica_set: &ReplicaSetName,
            projection: &str,
            slots: &[Slot],
        ) -> StoreResult<BTreeMap<Slot, Position>>;
        async fn begin(&self) -> StoreResult<()>;
        async fn commit(
            &self,
            tx: (),
            fence: &Fence,
            projection: &str,
            checkpoints: &BTreeMap<Slot, Position>,
        ) -> StoreResult<()>;
        async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>>;
        async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()>;
        async fn stop_projection(
            &self,
            replica_set: &ReplicaSetName,
            stop: &ProjectionStop,
        ) -> StoreResult<()>;
        async fn stopped_projections(
            &self,
            replica_set: &ReplicaSetName,
        ) -> StoreResult<Vec<StoppedProjection>>;
        async fn resume_projection(
            &self,
            replica_set: &ReplicaSetName,
            projection: &str,
        ) -> StoreResult<bool>;
        async fn reset(
            &self,
            tx: (),
            replica_set: &ReplicaSetName,
            projection: &str,
        ) -> StoreResult<()>;
    }

    #[async_trait]
    impl orchestrator_core::ports::DeadLetterStore for Ports {
        async fn park(
            &self,
            tx: &mut (),
            replica_set: &ReplicaSetName,
            projection: &str,
            letters: &[orchestrator_core::ports::NewDeadLetter],
        ) -> StoreResult<()>;
        async fn parked_keys(
            &self,
            replica_set: &ReplicaSetName,
            projection: &str,
            slots: &[Slot],
        ) -> StoreResult<Vec<(Slot, String)>>;
        async fn dead_letters(
            &self,
            replica_set: &ReplicaSetName,
            filter: &DeadLetterFilter,
        ) -> StoreResult<Vec<DeadLetter>>;
        async fn dead_letter_counts(
            &self,
            replica_set: &ReplicaSetName,
        ) -> StoreResult<BTreeMap<String, u64>>;
        async fn request(
            &self,
            replica_set: &ReplicaSetName,
            filter: &DeadLetterFilter,
            action: DeadLetterAction,
        ) -> StoreResult<u64>;
        async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>>;
        async fn parked_events(
            &self,
            replica_set: &ReplicaSetName,
            projection: &str,
            key: &str,
        ) -> StoreResult<Vec<(DeadLetterId, Event)>>;
        async fn resolve(
            &self,
            tx: &mut (),
            replica_set: &ReplicaSetName,
            projection: &str,
            key: &str,
            action: DeadLetterAction,
        ) -> StoreResult<u64>;
    }
}

/// What a commit was asked to fence and to checkpoint.
type Commit = (Fence, BTreeMap<Slot, Position>);

const SLOT: Slot = Slot(1);
const EPOCH: Epoch = Epoch(7);

/// A projection that records the global positions it was handed.
#[derive(Default)]
struct Recording {
    handled: Mutex<Vec<u64>>,
}

#[async_trait]
impl Projection<()> for Recording {
    fn name(&self) -> &str {
        "ledger"
    }

    async fn handle(
        &self,
        _: &mut (),
        event: &Event,
    ) -> Result<(), orchestrator_core::ports::BoxError> {
        self.handled.lock().unwrap().push(event.position.global);
        Ok(())
    }
}

fn event(global: u64) -> Event {
    Event {
        position: Position { commit: global, global },
        stream: StreamId::new("bank", "Account", "acct-1"),
        aggregate_version: global,
        partition_key: "acct-1".into(),
        slot: SLOT,
        event_id: EventId::from_bytes([global as u8; 16]),
        event_type: "Deposited".into(),
        event_version: 1,
        payload: Vec::new(),
        metadata: "{}".into(),
        tracing: Tracing::default(),
        created_at: Timestamp(0),
    }
}

fn processor(store: MockPorts, projection: Arc<Recording>) -> Processor<MockPorts> {
    let rs = ReplicaSetName::new("main").unwrap();
    let settings = Settings::new(rs.clone());
    Processor {
        store,
        replica_set: rs.clone(),
        worker: WorkerId::new("w1").unwrap(),
        projections: vec![projection],
        batch_size: 100,
        idle_poll: Duration::from_secs(3600),
        retry: settings.retry,
        failure_policy: settings.failure_policy,
        wake: Arc::default(),
        metrics: Arc::new(Metrics::new(&opentelemetry::global::meter("test"), &rs)),
        // Measured once, at the start, and not again within the test.
        lag_interval: Duration::from_secs(3600),
        concurrency: 1,
        handler_timeout: settings.handler_timeout(),
        read_buffer_bytes: settings.shared_read_buffer,
    }
}

/// The lag measurement and the poll of stopped projections and dead-letter requests, which run
/// beside the batches: answered whenever they come, and not part of the sequence.
fn measurements(store: &mut MockPorts) {
    store.expect_slot_count().return_const(SlotCount::new(4).unwrap());
    store.expect_backlog().returning(|_| Ok(Backlog::default()));
    store.expect_stopped_projections().returning(|_| Ok(Vec::new()));
    store.expect_requests().returning(|_| Ok(Vec::new()));
    store.expect_dead_letter_counts().returning(|_| Ok(BTreeMap::new()));
}

#[tokio::test(start_paused = true)]
async fn a_fenced_commit_reports_the_slot_lost_and_stops_its_batches() {
    let mut store = MockPorts::new();
    measurements(&mut store);
    let mut seq = Sequence::new();
    let fences: Arc<Mutex<Vec<Commit>>> = Arc::default();
    store
        .expect_load()
        .withf(|_, projection, slots| projection == "ledger" && slots == [SLOT])
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(BTreeMap::from([(SLOT, Position::START)])));
    store
        .expect_parked_keys()
        .withf(|_, projection, slots| projection == "ledger" && slots == [SLOT])
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(Vec::new()));
    store
        .expect_read()
        .withf(|request| request.cursors == [(SLOT, Position::START)])
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(vec![event(1), event(2)]));
    store.expect_begin().times(1).in_sequence(&mut seq).returning(|| Ok(()));
    let recorded = fences.clone();
    store.expect_commit().times(1).in_sequence(&mut seq).returning(
        move |(), fence, _, checkpoints| {
            recorded.lock().unwrap().push((fence.clone(), checkpoints.clone()));
            Err(StoreError::Fenced { worker: fence.worker.clone(), slot: SLOT })
        },
    );
    // The shared read reads one batch ahead while a batch is handled: from the batch's end, and
    // it finds nothing more. Past the fence nothing else: no read, no batch. Later calls are
    // recorded rather than left to panic, since a panic inside the processor's tasks only counts
    // as a failed attempt.
    let reads_ahead: Arc<Mutex<Vec<ReadRequest>>> = Arc::default();
    let begins = Arc::new(AtomicUsize::new(0));
    let (ahead, begun) = (reads_ahead.clone(), begins.clone());
    store.expect_read().returning(move |request| {
        ahead.lock().unwrap().push(request.clone());
        Ok(Vec::new())
    });
    store.expect_begin().returning(move || {
        begun.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });

    let projection = Arc::new(Recording::default());
    let (control, orders) = mpsc::unbounded_channel();
    let (reports, mut reported) = mpsc::unbounded_channel();
    let running = tokio::spawn(processor(store, projection.clone()).run(orders, reports));
    control.send(Control::Start { slot: SLOT, epoch: EPOCH }).unwrap();

    let report = tokio::time::timeout(Duration::from_secs(60), reported.recv()).await;
    assert!(matches!(report, Ok(Some(Report::Lost(SLOT)))), "got {report:?}");
    assert_eq!(*projection.handled.lock().unwrap(), [1, 2], "the batch reached the handler");
    let (fence, checkpoints) = fences.lock().unwrap().pop().expect("one commit");
    assert_eq!(fence.worker, WorkerId::new("w1").unwrap());
    assert_eq!(fence.grants, BTreeMap::from([(SLOT, EPOCH)]), "fenced on the slot's grant");
    assert_eq!(checkpoints, BTreeMap::from([(SLOT, event(2).position)]), "up to the batch's end");

    // The coordination task answers a lost slot by stopping it; the processor confirms.
    control.send(Control::Stop { slot: SLOT }).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), reported.recv()).await;
    assert!(matches!(report, Ok(Some(Report::Stopped(SLOT)))), "got {report:?}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(begins.load(Ordering::SeqCst), 0, "no batch after the slot was lost");
    let ahead: Vec<_> = reads_ahead.lock().unwrap().iter().map(|r| r.cursors.clone()).collect();
    assert_eq!(
        ahead,
        [vec![(SLOT, event(2).position)]],
        "only the read ahead, from the batch's end"
    );
    drop(control);
    // The run ends with its orders; dropping the mock checks every expectation's count.
    running.await.expect("the processor ran to its end and every expectation held");
}
