//! The processing state machine, scenario by scenario: the commands it emits for one read shared
//! by many projections, a slow or failing projection beside fast ones, concurrency groups, a
//! projection behind the others catching up and joining, and slots stopped with batches in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::event::Tracing;
use orchestrator_core::processing::{
    Batch, BatchEvents, Command, DEFAULT_WINDOW_BYTES, FailurePolicy, Input, MAX_SHARED_PER_BATCH,
    Outcome, ParkCause, PolledState, Processing, ProcessingConfig, RetryPolicy, TaskId,
    covering_scope,
};
use orchestrator_core::{
    Epoch, Event, EventId, Position, Scope, Slot, SlotCount, StreamId, Timestamp,
};

const SLOTS: u64 = 8;

/// A store of `events` events over 16 aggregates, and a worker's processing over it. Commands are
/// collected; the test answers them in the order it wants.
struct Harness {
    processing: Processing,
    config: ProcessingConfig,
    events: Vec<Event>,
    checkpoints: BTreeMap<(usize, Slot), Position>,
    reads: Vec<(TaskId, orchestrator_core::ports::ReadRequest)>,
    loads: Vec<(TaskId, usize, Vec<Slot>)>,
    processes: Vec<(TaskId, usize, Batch)>,
    /// Waits asked for, with their delays.
    waits: Vec<(TaskId, Duration)>,
    reports: Vec<Command>,
    applied: Vec<Vec<u64>>,
}

fn event(global: u64, aggregate_type: &str) -> Event {
    let slots = SlotCount::new(SLOTS).unwrap();
    let id = format!("agg-{}", global % 16);
    Event {
        position: Position::global(global),
        stream: StreamId::new("ctx", aggregate_type, id.clone()),
        aggregate_version: 1 + (global - 1) / 16,
        slot: slots.slot_of(&id),
        partition_key: id,
        event_id: EventId::from_bytes([0; 16]),
        event_type: "Happened".into(),
        event_version: 1,
        payload: Vec::new(),
        metadata: "{}".into(),
        tracing: Tracing::default(),
        created_at: Timestamp(0),
    }
}

impl Harness {
    fn new(scopes: Vec<Scope>, groups: usize, batch_size: usize, events: u64) -> Self {
        Self::with_window(scopes, groups, batch_size, events, DEFAULT_WINDOW_BYTES)
    }

    fn with_window(
        scopes: Vec<Scope>,
        groups: usize,
        batch_size: usize,
        events: u64,
        window_bytes: usize,
    ) -> Self {
        let projections = scopes.len();
        let config = ProcessingConfig {
            scopes,
            batch_size,
            groups,
            window_bytes,
            retry: RetryPolicy { max_attempts: 3, ..RetryPolicy::default() },
            policies: Vec::new(),
            slot_count: SlotCount::new(SLOTS).unwrap(),
        };
        let processing = Processing::new(config.clone());
        let types = ["A", "B"];
        Self {
            processing,
            config,
            events: (1..=events).map(|g| event(g, types[(g % 2) as usize])).collect(),
            checkpoints: BTreeMap::new(),
            reads: Vec::new(),
            loads: Vec::new(),
            processes: Vec::new(),
            waits: Vec::new(),
            reports: Vec::new(),
            applied: vec![Vec::new(); projections],
        }
    }

    /// Sets the projections' failure policies (before anything started).
    fn policies(&mut self, policies: Vec<FailurePolicy>) {
        self.config.policies = policies;
        self.processing = Processing::new(self.config.clone());
    }

    /// A poll of the store that finds `state`.
    fn poll(&mut self, state: PolledState) {
        self.feed(Input::PollDue);
        let index = self
            .reports
            .iter()
            .rposition(|r| matches!(r, Command::Poll { .. }))
            .expect("a poll is asked for");
        let Command::Poll { task } = self.reports.remove(index) else { unreachable!() };
        self.feed(Input::Polled { task, state: Some(state) });
    }

    fn feed(&mut self, input: Input) {
        self.processing.handle(input);
        self.drain();
    }

    fn drain(&mut self) {
        for command in self.processing.take_commands() {
            match command {
                Command::Read { task, request } => self.reads.push((task, request)),
                Command::Load { task, projection, slots } => {
                    self.loads.push((task, projection, slots))
                }
                Command::Process { task, projection, batch } => {
                    self.processes.push((task, projection, batch))
                }
                Command::Wait { task, delay } => self.waits.push((task, delay)),
                report => self.reports.push(report),
            }
        }
    }

    fn start_all(&mut self) {
        for slot in 0..SLOTS as u32 {
            self.processing.handle(Input::Start { slot: Slot(slot), epoch: Epoch(1) });
        }
        self.drain();
        let groups = self.processing.groups().len().min(SLOTS as usize);
        assert_eq!(
            self.loads.len(),
            self.applied.len() * groups,
            "one load per projection and group"
        );
        self.answer_loads();
    }

    fn answer_loads(&mut self) {
        while let Some((task, projection, slots)) = self.loads.pop() {
            let checkpoints = slots
                .iter()
                .map(|s| (*s, self.checkpoints.get(&(projection, *s)).copied().unwrap_or_default()))
                .collect();
            self.feed(Input::Loaded { task, checkpoints: Some(checkpoints), parked: Vec::new() });
        }
    }

    fn answer_reads(&mut self) -> usize {
        let mut answered = 0;
        for (task, request) in std::mem::take(&mut self.reads) {
            let cursors: BTreeMap<Slot, Position> = request.cursors.iter().copied().collect();
            let events = self
                .events
                .iter()
                .filter(|e| cursors.get(&e.slot).is_some_and(|c| e.position > *c))
                .filter(|e| request.scope.includes(&e.stream))
                .take(request.limit)
                .cloned()
                .collect();
            self.feed(Input::Read { task, events: Some(events) });
            answered += 1;
        }
        answered
    }

    /// Commits the pending batches of `projection` (all, with `None`).
    fn commit(&mut self, projection: Option<usize>) -> usize {
        let mut committed = 0;
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.processes)
            .into_iter()
            .partition(|(_, p, _)| projection.is_none_or(|want| *p == want));
        self.processes = later;
        for (task, p, batch) in now {
            self.commit_taking(task, p, &batch, Duration::ZERO);
            committed += 1;
        }
        committed
    }

    /// Commits one batch of projection 0 handed out earlier.
    fn commit_one(&mut self, task: TaskId, batch: Batch) {
        self.commit_taking(task, 0, &batch, Duration::ZERO);
    }

    /// Commits a batch of `projection` handed out earlier, reported as taking `took`.
    fn commit_taking(&mut self, task: TaskId, projection: usize, batch: &Batch, took: Duration) {
        for (slot, at) in &batch.checkpoints {
            self.checkpoints.insert((projection, *slot), *at);
        }
        self.applied[projection].extend(batch.events.iter().map(|e| e.position.global));
        self.feed(Input::Processed { took, task, outcome: Outcome::Committed });
    }

    /// Answers reads until none is asked for.
    fn answer_all_reads(&mut self) {
        while !self.reads.is_empty() {
            self.answer_reads();
        }
    }

    /// Answers everything until nothing is left to do; returns the reads made.
    fn run_to_end(&mut self) -> usize {
        let mut reads = 0;
        loop {
            self.answer_loads();
            let r = self.answer_reads();
            reads += r;
            let c = self.commit(None);
            if r == 0 && c == 0 && self.loads.is_empty() {
                return reads;
            }
        }
    }

    fn expected(&self, scope: &Scope) -> Vec<u64> {
        self.events
            .iter()
            .filter(|e| scope.includes(&e.stream))
            .map(|e| e.position.global)
            .collect()
    }
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort();
    v
}

#[test]
fn batch_events_read_as_one_sequence_without_copying_a_read() {
    let first = Arc::new(vec![event(1, "A"), event(2, "A")]);
    let mut events = BatchEvents::shared(first.clone());
    events.push(Arc::new(Vec::new()));
    events.push(Arc::new(vec![event(3, "A")]));
    assert_eq!(events.len(), 3);
    assert_eq!(events.parts().len(), 2, "an empty read is not kept");
    assert!(Arc::ptr_eq(&events.parts()[0], &first), "a shared read is not copied");
    assert_eq!(events[2].position, Position::global(3));
    assert!(events.get(3).is_none());
    let globals: Vec<u64> = events.iter().map(|e| e.position.global).collect();
    assert_eq!(globals, [1, 2, 3]);
    let whole = BatchEvents::from(vec![event(1, "A"), event(2, "A"), event(3, "A")]);
    assert_eq!(events, whole, "equal however the events are split");
    assert!(BatchEvents::from(Vec::new()).is_empty());
}

#[test]
fn ten_projections_at_one_position_share_one_read_per_batch() {
    let mut h = Harness::new(vec![Scope::all(); 10], 1, 100, 1000);
    h.start_all();
    let reads = h.run_to_end();
    // Ten batches of 100 and the empty read at the end: one read per batch, not per projection.
    assert_eq!(reads, 11);
    for p in 0..10 {
        assert_eq!(sorted(h.applied[p].clone()), h.expected(&Scope::all()), "projection {p}");
    }
}

#[test]
fn the_next_batches_are_read_while_one_is_handled_and_taken_together() {
    let mut h = Harness::new(vec![Scope::all()], 1, 100, 1000);
    h.start_all();
    assert_eq!(h.answer_reads(), 1);
    assert_eq!(h.processes.len(), 1, "batch 1 handed out");
    let mut ahead = 0;
    while !h.reads.is_empty() {
        ahead += h.answer_reads();
    }
    assert_eq!(ahead, MAX_SHARED_PER_BATCH, "as many read ahead as a lane takes at once");
    h.commit(None);
    assert_eq!(h.processes.len(), 1, "the batches waiting are handed out at once, together");
    let (_, _, batch) = &h.processes[0];
    assert_eq!(batch.events.parts().len(), MAX_SHARED_PER_BATCH, "one part per read");
    let globals: Vec<u64> = batch.events.iter().map(|e| e.position.global).collect();
    assert_eq!(globals, (101..=500).collect::<Vec<_>>(), "batches 2 to 5, in order");
    assert!(
        batch.checkpoints.values().all(|at| *at == Position::global(500)),
        "one commit to the last batch's end: {:?}",
        batch.checkpoints
    );
    assert_eq!(h.reads.len(), 1, "the stream reads on");
    h.run_to_end();
    assert_eq!(h.applied[0], h.expected(&Scope::all()), "every event once, in order");
}

#[test]
fn a_lane_takes_as_many_waiting_batches_as_fit_its_pace() {
    let mut h = Harness::new(vec![Scope::all()], 1, 100, 2000);
    h.start_all();
    // Commits the batch in flight as taking `ms`; returns how many reads the next one holds.
    let commit_after = |h: &mut Harness, ms: u64| {
        h.answer_all_reads();
        let (task, p, batch) = h.processes.remove(0);
        h.commit_taking(task, p, &batch, Duration::from_millis(ms));
        h.answer_all_reads();
        h.processes[0].2.events.parts().len()
    };
    h.answer_reads();
    assert_eq!(h.processes[0].2.events.parts().len(), 1, "the first batch: one read");
    assert_eq!(commit_after(&mut h, 30), 1, "30 ms for one read: past the budget alone");
    assert_eq!(commit_after(&mut h, 10), 2, "10 ms a read: two fit 25 ms");
    assert_eq!(commit_after(&mut h, 10), 4, "5 ms a read: four (and no more)");
    assert_eq!(commit_after(&mut h, 200), 1, "50 ms a read: one again");
    h.run_to_end();
    assert_eq!(h.applied[0], h.expected(&Scope::all()), "every event once, in order");
}

#[test]
fn a_lane_at_the_head_takes_each_batch_as_it_is_read() {
    let mut h = Harness::new(vec![Scope::all()], 1, 100, 1000);
    h.start_all();
    while !h.reads.is_empty() {
        h.answer_reads();
        assert!(h.processes.iter().all(|(_, _, b)| b.events.parts().len() == 1));
        h.commit(None);
    }
    assert_eq!(h.applied[0], h.expected(&Scope::all()));
}

#[test]
fn scoped_projections_share_the_read_and_get_their_own_events() {
    let a = Scope { aggregate_types: vec!["A".into()], bounded_contexts: vec![] };
    let b = Scope { aggregate_types: vec!["B".into()], bounded_contexts: vec![] };
    assert_eq!(covering_scope(&[a.clone(), b.clone()]).aggregate_types, vec!["A", "B"]);
    assert_eq!(covering_scope(&[a.clone(), Scope::all()]), Scope::all());
    let mut h = Harness::new(vec![a.clone(), b.clone(), Scope::all()], 1, 50, 500);
    h.start_all();
    let reads = h.run_to_end();
    assert_eq!(reads, 11);
    assert_eq!(sorted(h.applied[0].clone()), h.expected(&a));
    assert_eq!(sorted(h.applied[1].clone()), h.expected(&b));
    assert_eq!(sorted(h.applied[2].clone()), h.expected(&Scope::all()));
    // Out-of-scope events still advance checkpoints: each slot of the scoped projections ends at
    // the last event of the slot, whatever its type.
    let last = h.events.last().unwrap().position;
    for p in 0..3 {
        assert_eq!(h.processing.cursors(p).values().max(), Some(&last), "projection {p}");
    }
}

#[test]
fn a_slow_projection_does_not_hold_the_others_back() {
    // A window of about eight batches: the slow one falls out of it.
    let window = 8 * 10 * orchestrator_core::processing::event_size(&event(1, "A"));
    let mut h = Harness::with_window(vec![Scope::all(); 4], 1, 10, 2000, window);
    h.start_all();
    // Projection 3 never finishes its batch while the others run to the end.
    loop {
        let r = h.answer_reads();
        let c = (0..3).map(|p| h.commit(Some(p))).sum::<usize>();
        if r == 0 && c == 0 {
            break;
        }
    }
    for p in 0..3 {
        assert_eq!(h.applied[p].len(), 2000, "projection {p} went on alone");
    }
    assert_eq!(h.processes.len(), 1, "the slow one still has its first batch");
    // It finishes, falls behind the window, reads on its own and catches up.
    let reads = h.run_to_end();
    assert_eq!(sorted(h.applied[3].clone()), h.expected(&Scope::all()));
    assert!(reads >= 190, "the slow projection read alone: {reads} reads");
}

#[test]
fn a_projection_behind_reads_alone_then_joins_the_shared_read() {
    let mut h = Harness::new(vec![Scope::all(); 3], 1, 10, 400);
    // Projections 0 and 1 have processed the first 300 events; 2 is new.
    for slot in 0..SLOTS as u32 {
        let at = h
            .events
            .iter()
            .filter(|e| e.slot == Slot(slot) && e.position.global <= 300)
            .map(|e| e.position)
            .max();
        for p in 0..2 {
            h.checkpoints.insert((p, Slot(slot)), at.unwrap_or_default());
        }
    }
    h.start_all();
    let reads = h.run_to_end();
    assert_eq!(
        sorted(h.applied[2].clone()),
        h.expected(&Scope::all()),
        "the new one: every event once"
    );
    assert_eq!(h.applied[0].len(), 100);
    // 0 and 1 shared 10 batches (and an empty read); 2 read its 400 events alone, 10 at a time.
    assert!((40..=55).contains(&reads), "{reads} reads");
    // Caught up, the three share one read per batch from now on.
    h.events.extend((401..=500).map(|g| event(g, "A")));
    h.feed(Input::Wake);
    assert_eq!(h.run_to_end(), 11, "one read per batch for all three");
    for p in 0..3 {
        assert_eq!(sorted(h.applied[p].clone()).last(), Some(&500));
    }
}

#[test]
fn concurrency_groups_split_the_slots_and_run_side_by_side() {
    let mut h = Harness::new(vec![Scope::all()], 4, 10, 400);
    h.start_all();
    let groups = h.processing.groups();
    assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2, 2]);
    h.answer_reads();
    assert_eq!(h.processes.len(), 4, "one batch in flight per group");
    let mut slots_seen = std::collections::BTreeSet::new();
    for (_, _, batch) in &h.processes {
        let slots: std::collections::BTreeSet<Slot> = batch.checkpoints.keys().copied().collect();
        assert!(slots_seen.is_disjoint(&slots), "groups are disjoint");
        slots_seen.extend(slots);
    }
    h.run_to_end();
    assert_eq!(sorted(h.applied[0].clone()), h.expected(&Scope::all()));
}

#[test]
fn a_failing_projection_stops_alone_and_the_others_go_on() {
    let mut h = Harness::new(vec![Scope::all(), Scope::all()], 1, 10, 100);
    h.start_all();
    for attempt in 1..=3 {
        h.answer_loads();
        h.answer_reads();
        h.commit(Some(0));
        let (task, p, _) =
            h.processes.remove(h.processes.iter().position(|(_, p, _)| *p == 1).unwrap());
        assert_eq!(p, 1);
        h.feed(Input::Processed {
            took: Duration::ZERO,
            task,
            outcome: Outcome::HandlerFailed { index: Some(4), timed_out: false, permanent: false },
        });
        if attempt < 3 {
            let (wait, _) = h.waits.pop().expect("a backoff before the retry");
            h.feed(Input::Elapsed { task: wait });
            assert_eq!(h.loads.len(), 1, "the retry starts from the stored checkpoints");
        }
    }
    assert!(h.reports.contains(&Command::ProjectionStopped { projection: 1 }));
    let records: Vec<_> =
        h.reports.iter().filter(|r| matches!(r, Command::RecordStop { .. })).cloned().collect();
    assert_eq!(records.len(), 1, "the stop is recorded in the store, for every worker");
    let Command::RecordStop { task, projection, event, attempts, .. } = &records[0] else {
        unreachable!()
    };
    assert_eq!((*projection, *attempts), (1, 3));
    assert_eq!(
        event.as_ref().unwrap().position,
        h.events[4].position,
        "the event the handler named"
    );
    // The store was down: the record is asked for again, the same, after a backoff.
    h.reports.clear();
    h.feed(Input::Recorded { task: *task, ok: false });
    let (wait, _) = h.waits.pop().expect("a backoff before recording again");
    h.feed(Input::Elapsed { task: wait });
    let Some(Command::RecordStop { task, projection: 1, attempts: 3, .. }) = h.reports.pop() else {
        panic!("the record is retried: {:?}", h.reports)
    };
    h.feed(Input::Recorded { task, ok: true });
    assert!(h.processing.is_stopped(1));
    h.run_to_end();
    assert_eq!(h.applied[0].len(), 100, "the other projection finished");
    assert!(h.applied[1].is_empty());

    // The stop record is still there: nothing changes. Then `projection resume` deletes it.
    h.poll(PolledState { stopped: [1].into(), requests: Vec::new() });
    assert!(h.processing.is_stopped(1));
    h.poll(PolledState::default());
    assert!(!h.processing.is_stopped(1));
    assert!(h.reports.contains(&Command::ProjectionResumed { projection: 1 }));
    h.run_to_end();
    assert_eq!(h.applied[1].len(), 100, "resumed from the failing event, once each");
}

#[test]
fn a_stop_recorded_by_another_worker_stops_the_projection_here_and_a_resume_restarts_it() {
    let mut h = Harness::new(vec![Scope::all(), Scope::all()], 1, 10, 100);
    h.start_all();
    h.answer_loads();
    h.poll(PolledState { stopped: [0].into(), requests: Vec::new() });
    assert!(h.processing.is_stopped(0));
    assert!(h.reports.contains(&Command::ProjectionStopped { projection: 0 }));
    assert!(
        !h.reports.iter().any(|r| matches!(r, Command::RecordStop { .. })),
        "recorded elsewhere already"
    );
    h.run_to_end();
    assert_eq!(h.applied[1].len(), 100);
    assert!(h.applied[0].len() <= 10, "at most the batch in flight when it stopped");
    h.poll(PolledState::default());
    h.run_to_end();
    assert_eq!(h.applied[0].len(), 100);
}

#[test]
fn a_poll_issued_before_the_stop_was_recorded_does_not_resume_it() {
    let mut h = Harness::new(vec![Scope::all()], 1, 10, 20);
    h.start_all();
    h.answer_loads();
    h.answer_reads();
    h.processing.handle(Input::PollDue);
    h.drain();
    let Some(Command::Poll { task: poll }) = h.reports.pop() else { panic!("a poll") };
    let (task, _, _) = h.processes.pop().unwrap();
    h.feed(Input::Processed {
        took: Duration::ZERO,
        task,
        outcome: Outcome::HandlerFailed { index: Some(0), timed_out: false, permanent: true },
    });
    let Some(Command::RecordStop { task: record, .. }) =
        h.reports.iter().find(|r| matches!(r, Command::RecordStop { .. })).cloned()
    else {
        panic!("a permanent error stops at once: {:?}", h.reports)
    };
    h.feed(Input::Recorded { task: record, ok: true });
    // The poll read the store before the record: it says "not stopped", which is stale.
    h.feed(Input::Polled { task: poll, state: Some(PolledState::default()) });
    assert!(h.processing.is_stopped(0));
}

#[test]
fn park_sets_the_failing_key_aside_and_the_rest_of_the_batch_goes_on() {
    let mut h = Harness::new(vec![Scope::all()], 1, 1000, 40);
    h.policies(vec![FailurePolicy::Park]);
    h.start_all();
    h.answer_loads();
    h.answer_reads();
    let (task, _, batch) = h.processes.pop().unwrap();
    let poison = batch.events[5].clone();
    h.feed(Input::Processed {
        took: Duration::ZERO,
        task,
        outcome: Outcome::HandlerFailed { index: Some(5), timed_out: false, permanent: true },
    });
    let (_, _, again) = h.processes.last().expect("the batch goes again at once");
    assert_eq!(again.checkpoints, batch.checkpoints, "the same stretch");
    let key = &poison.partition_key;
    assert!(again.park.iter().all(|p| &p.event.partition_key == key));
    assert_eq!(again.park[0].event.position, poison.position);
    assert!(matches!(again.park[0].cause, ParkCause::Failed { task: t, attempts: 1 } if t == task));
    let later =
        batch.events.iter().filter(|e| &e.partition_key == key && e.position > poison.position);
    assert_eq!(again.park.len(), 1 + later.count(), "the key's later events parked behind it");
    assert!(
        again.events.iter().all(|e| &e.partition_key != key || e.position < poison.position),
        "nothing of the key from the failing event on is applied"
    );
    assert_eq!(again.events.len() + again.park.len(), batch.events.len());
}

#[test]
fn park_without_the_failing_index_goes_one_event_at_a_time() {
    let mut h = Harness::new(vec![Scope::all()], 1, 1000, 12);
    h.policies(vec![FailurePolicy::Park]);
    h.start_all();
    h.answer_loads();
    h.answer_reads();
    let (task, _, batch) = h.processes.pop().unwrap();
    h.feed(Input::Processed {
        took: Duration::ZERO,
        task,
        outcome: Outcome::HandlerFailed { index: None, timed_out: true, permanent: false },
    });
    // Attempts are exhausted at 3: two backoffs first.
    for _ in 0..2 {
        let (wait, _) = h.waits.pop().expect("a backoff");
        h.feed(Input::Elapsed { task: wait });
        h.answer_loads();
        h.answer_reads();
        let (task, _, _) = h.processes.pop().unwrap();
        h.feed(Input::Processed {
            took: Duration::ZERO,
            task,
            outcome: Outcome::HandlerFailed { index: None, timed_out: true, permanent: false },
        });
    }
    let mut singles = 0;
    while let Some((task, _, single)) = h.processes.pop() {
        if single.events.is_empty() && single.park.is_empty() {
            assert_eq!(single.checkpoints, batch.checkpoints, "the batch's own end, last");
            h.feed(Input::Processed { took: Duration::ZERO, task, outcome: Outcome::Committed });
            break;
        }
        assert_eq!(single.events.len() + single.park.len(), 1, "one event at a time");
        singles += 1;
        let event = single.events.first().cloned();
        if event.as_ref().is_some_and(|e| e.position == batch.events[3].position) {
            h.feed(Input::Processed {
                took: Duration::ZERO,
                task,
                outcome: Outcome::HandlerFailed {
                    index: Some(0),
                    timed_out: false,
                    permanent: false,
                },
            });
            let (_, _, parked) = h.processes.last().unwrap();
            assert_eq!(parked.park.len(), 1, "the one that failed is parked, at once");
        } else {
            h.feed(Input::Processed { took: Duration::ZERO, task, outcome: Outcome::Committed });
        }
    }
    assert!(singles >= batch.events.len());
}

#[test]
fn a_stopped_slot_is_reported_only_after_its_batches_in_flight() {
    let mut h = Harness::new(vec![Scope::all(), Scope::all()], 1, 1000, 100);
    h.start_all();
    h.answer_reads();
    assert_eq!(h.processes.len(), 2);
    let slot = h.processes[0].2.checkpoints.keys().next().copied().unwrap();
    h.feed(Input::Stop { slot });
    assert!(h.reports.is_empty(), "two batches cover it");
    h.commit(Some(0));
    assert!(h.reports.is_empty(), "one batch still covers it");
    h.commit(Some(1));
    assert_eq!(h.reports, vec![Command::SlotStopped(slot)]);
    assert!(!h.processing.groups()[0].contains(&slot));
    // A slot that was never started is stopped at once.
    h.feed(Input::Stop { slot });
    assert_eq!(h.reports.last(), Some(&Command::SlotStopped(slot)));
}

#[test]
fn a_fenced_commit_drops_the_slot_from_every_projection_and_reloads() {
    let mut h = Harness::new(vec![Scope::all(), Scope::all()], 1, 1000, 100);
    h.start_all();
    h.answer_reads();
    let lost = h.processes[0].2.checkpoints.keys().next().copied().unwrap();
    let (task, _, _) = h.processes.remove(0);
    h.feed(Input::Processed {
        took: Duration::ZERO,
        task,
        outcome: Outcome::Fenced { slot: lost },
    });
    assert!(h.reports.is_empty(), "the other projection's batch still covers it");
    assert_eq!(h.loads.len(), 1, "the fenced lane reloads its checkpoints");
    h.commit(None);
    assert_eq!(h.reports, vec![Command::SlotLost(lost)]);
    h.run_to_end();
    assert!(h.reads.iter().all(|(_, r)| r.cursors.iter().all(|(s, _)| *s != lost)));
}

#[test]
fn a_shared_read_that_fails_is_retried_without_touching_cursors() {
    let mut h = Harness::new(vec![Scope::all(); 3], 1, 10, 30);
    h.start_all();
    let (task, _) = h.reads.remove(0);
    h.feed(Input::Read { task, events: None });
    assert!(h.loads.is_empty(), "nothing to reload: no lane's cursors moved");
    let (wait, _) = h.waits.pop().unwrap();
    assert!(h.reads.is_empty());
    h.feed(Input::Elapsed { task: wait });
    assert_eq!(h.reads.len(), 1, "the same read again");
    h.run_to_end();
    for p in 0..3 {
        assert_eq!(h.applied[p].len(), 30);
    }
}

#[test]
fn store_errors_in_a_row_back_off_to_a_second_and_an_answer_resets_the_wait() {
    let mut h = Harness::new(vec![Scope::all(); 2], 1, 10, 30);
    h.start_all();
    let mut delays = Vec::new();
    for _ in 0..6 {
        let (task, _) = h.reads.remove(0);
        h.feed(Input::Read { task, events: None });
        let (wait, delay) = h.waits.pop().expect("a backoff before the same read");
        delays.push(delay.as_millis());
        h.feed(Input::Elapsed { task: wait });
    }
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    // The store answers (a read of the first events), then fails again: the wait starts over.
    h.answer_reads();
    let (task, _) = h.reads.remove(0);
    h.feed(Input::Read { task, events: None });
    let (_, delay) = h.waits.pop().expect("a backoff");
    assert_eq!(delay, Duration::from_millis(100));
}

#[test]
fn lag_queries_share_one_count_between_projections_at_one_position() {
    let a = Scope { aggregate_types: vec!["A".into()], bounded_contexts: vec![] };
    let mut h = Harness::new(vec![Scope::all(), Scope::all(), a], 2, 10, 100);
    h.start_all();
    let queries = h.processing.lag_queries(1000);
    assert_eq!(queries.len(), 2, "one per distinct (cursors, scope)");
    assert_eq!(queries[0].projections.len(), 2);
    assert_eq!(queries[0].request.cursors.len(), SLOTS as usize);
    assert_eq!(queries[0].projections[0].1.len(), 2, "one part per group");
}

#[test]
fn a_slower_projection_is_served_from_the_window_while_it_fits() {
    // The default window holds the whole backlog: the slow projection never reads alone.
    let mut h = Harness::new(vec![Scope::all(); 4], 1, 10, 2000);
    h.start_all();
    let mut reads = 0;
    loop {
        let r = h.answer_reads();
        reads += r;
        let c = (0..3).map(|p| h.commit(Some(p))).sum::<usize>();
        if r == 0 && c == 0 {
            break;
        }
    }
    assert_eq!(reads, 201, "one read per batch, and the empty one at the end");
    reads += h.run_to_end();
    assert_eq!(reads, 201, "the slow one took every batch from memory, no read of its own");
    assert_eq!(sorted(h.applied[3].clone()), h.expected(&Scope::all()));
}

#[test]
fn a_burst_of_slot_changes_keeps_one_shared_read_in_flight() {
    let mut h = Harness::new(vec![Scope::all(), Scope::all()], 1, 100, 0);
    h.start_all();
    assert_eq!(h.reads.len(), 1);
    // Slots stopped one by one, each handled before the next arrives, the first read still out.
    for slot in 0..SLOTS as u32 / 2 {
        h.feed(Input::Stop { slot: Slot(slot) });
        assert_eq!(h.reads.len(), 1, "the read in flight is abandoned, not doubled");
    }
    assert_eq!(h.reports.len(), SLOTS as usize / 2, "every stop answered at once");
    h.answer_reads();
    assert_eq!(h.reads.len(), 1, "then one read of the slots left");
    assert_eq!(h.reads[0].1.cursors.len(), SLOTS as usize / 2);
}

#[test]
fn stop_without_the_failing_index_finds_the_event_one_at_a_time_and_names_it() {
    let mut h = Harness::new(vec![Scope::all()], 1, 1000, 12);
    h.start_all();
    h.answer_loads();
    h.answer_reads();
    let (task, _, batch) = h.processes.pop().unwrap();
    let culprit = batch.events[5].position;
    h.feed(Input::Processed {
        took: Duration::ZERO,
        task,
        outcome: Outcome::HandlerFailed { index: None, timed_out: false, permanent: true },
    });
    while let Some((task, _, single)) = h.processes.pop() {
        assert_eq!(single.events.len(), 1, "one event at a time");
        if single.events[0].position == culprit {
            h.feed(Input::Processed {
                took: Duration::ZERO,
                task,
                outcome: Outcome::HandlerFailed { index: None, timed_out: false, permanent: true },
            });
        } else {
            h.commit_one(task, single);
        }
    }
    let Some(Command::RecordStop { event: Some(event), .. }) =
        h.reports.iter().find(|r| matches!(r, Command::RecordStop { .. }))
    else {
        panic!("the projection stops: {:?}", h.reports)
    };
    assert_eq!(event.position, culprit, "the very event, not the first of the batch");
    assert_eq!(h.applied[0].len(), 5, "the events before it are applied");
}
