//! The processing state machine against a model of the store, with the answers to its commands
//! delivered in any order (as concurrent tasks finish), failures injected, slots stopped, started
//! and stolen, and appends held open the way PostgreSQL's commit-order reading sees them (a read
//! returns nothing at or after the oldest open append).
//!
//! After every delivered answer: no event applied twice by any projection, every aggregate applied
//! in version order, no slot reported stopped while a batch covering it is in flight. At the end,
//! with faults off and everything started again: every event applied exactly once by every
//! projection whose scope includes it. A skipped or repeated batch where a lane leaves or joins
//! the shared read shows up as a missing or doubled event.
//!
//! Projection 3 runs the `park` failure policy and fails for good on "poison" events (saying on
//! which event, or not): nothing of a parked key may be applied while it is parked, and at the
//! end, with the poison gone and every parked key retried, everything is applied exactly once in
//! per-key order all the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::event::Tracing;
use orchestrator_core::ports::{DeadLetterAction, ReadRequest};
use orchestrator_core::processing::{
    Batch, Command, FailurePolicy, Input, Outcome, PolledState, Processing, ProcessingConfig,
    RetryPolicy,
};
use orchestrator_core::{
    Epoch, Event, EventId, Position, Scope, Slot, SlotCount, StreamId, Timestamp,
};
use proptest::prelude::*;

/// A small deterministic generator, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const TYPES: [&str; 3] = ["A", "B", "C"];
const STREAMS: u64 = 12;

fn scopes() -> Vec<Scope> {
    vec![
        Scope::all(),
        Scope { aggregate_types: vec!["A".into()], bounded_contexts: vec![] },
        Scope { aggregate_types: vec!["B".into(), "C".into()], bounded_contexts: vec![] },
        Scope::all(),
    ]
}

/// A task handed out and not answered yet; reads are executed when handed out (their answer may
/// arrive after other answers, stale).
enum Pending {
    Read { task: u64, events: Option<Vec<Event>> },
    Load { task: u64, projection: usize, slots: Vec<Slot> },
    Process { task: u64, projection: usize, batch: Batch },
    Resolve { task: u64, projection: usize, key: String, grants: BTreeMap<Slot, Epoch> },
    Poll { task: u64 },
    Wait { task: u64 },
}

impl Pending {
    fn covers(&self, slot: Slot) -> bool {
        match self {
            Pending::Process { batch, .. } => batch.checkpoints.contains_key(&slot),
            Pending::Resolve { grants, .. } => grants.contains_key(&slot),
            _ => false,
        }
    }
}

/// The projection with the `park` policy.
const PARKING: usize = 3;

/// Events the parking projection fails on for good while the poison is on.
fn poison(event: &Event) -> bool {
    event.position.global.is_multiple_of(23)
}

struct World {
    rng: Rng,
    processing: Processing,
    scopes: Vec<Scope>,
    slots: SlotCount,
    batch_size: usize,
    faults: bool,
    events: Vec<Event>,
    /// Global positions of appends still open (invisible, and hiding everything after them).
    held: BTreeSet<u64>,
    versions: BTreeMap<u64, u64>,
    /// The store's owner epochs of the slots this worker owns.
    owned: BTreeMap<Slot, Epoch>,
    /// What the worker was told: running slots, and slots stopping.
    running: BTreeSet<Slot>,
    stopping: BTreeSet<Slot>,
    checkpoints: BTreeMap<(usize, Slot), Position>,
    applied: Vec<BTreeMap<u64, u32>>,
    applied_versions: Vec<BTreeMap<u64, u64>>,
    pending: Vec<Pending>,
    violation: Option<String>,
    /// The model's dead letters: (projection, key) -> parked global positions.
    letters: BTreeMap<(usize, String), BTreeSet<u64>>,
    /// Keys an operator asked to retry.
    requested: BTreeSet<(usize, String)>,
    poisoned: bool,
}

fn stream(n: u64) -> StreamId {
    StreamId::new("ctx", TYPES[(n % 3) as usize], format!("agg-{n}"))
}

impl World {
    fn new(seed: u64, groups: usize, batch_size: usize, window: usize, slot_count: u64) -> Self {
        let slots = SlotCount::new(slot_count).unwrap();
        let scopes = scopes();
        let processing = Processing::new(ProcessingConfig {
            scopes: scopes.clone(),
            batch_size,
            groups,
            // `window` batches of small events.
            window_bytes: window * batch_size * 300,
            retry: RetryPolicy { max_attempts: 1_000_000, ..RetryPolicy::default() },
            policies: vec![
                FailurePolicy::Stop,
                FailurePolicy::Stop,
                FailurePolicy::Stop,
                FailurePolicy::Park,
            ],
            slot_count: slots,
        });
        Self {
            rng: Rng(seed),
            processing,
            applied: vec![BTreeMap::new(); scopes.len()],
            applied_versions: vec![BTreeMap::new(); scopes.len()],
            scopes,
            slots,
            batch_size,
            faults: true,
            events: Vec::new(),
            held: BTreeSet::new(),
            versions: BTreeMap::new(),
            owned: slots.all().map(|s| (s, Epoch(1))).collect(),
            running: BTreeSet::new(),
            stopping: BTreeSet::new(),
            checkpoints: BTreeMap::new(),
            pending: Vec::new(),
            violation: None,
            letters: BTreeMap::new(),
            requested: BTreeSet::new(),
            poisoned: true,
        }
    }

    fn parked_keys(&self, projection: usize, slots: &[Slot]) -> Vec<(Slot, String)> {
        self.letters
            .keys()
            .filter(|(p, _)| *p == projection)
            .map(|(_, key)| (self.slots.slot_of(key), key.clone()))
            .filter(|(slot, _)| slots.contains(slot))
            .collect()
    }

    fn event_at(&self, global: u64) -> &Event {
        &self.events[global as usize - 1]
    }

    /// Applies one event to a projection's read model, checking exactly once and per-key order.
    fn apply(&mut self, projection: usize, global: u64) {
        let event = self.event_at(global).clone();
        let times = self.applied[projection].entry(global).or_default();
        *times += 1;
        if *times > 1 {
            self.fail(format!("projection {projection}: event {} applied twice", event.position));
        }
        let n: u64 = event.stream.aggregate_id[4..].parse().unwrap();
        let previous =
            self.applied_versions[projection].insert(n, event.aggregate_version).unwrap_or(0);
        if event.aggregate_version != previous + 1 {
            self.fail(format!(
                "projection {projection}: {} v{} applied after v{previous}",
                event.stream, event.aggregate_version
            ));
        }
    }

    fn fail(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }

    fn append(&mut self) {
        let n = self.rng.below(STREAMS);
        let stream = stream(n);
        // An append waits for the stream's previous one (PostgreSQL's stream lock).
        let held_stream = self.held.iter().any(|g| self.events[*g as usize - 1].stream == stream);
        if held_stream {
            return;
        }
        let version = self.versions.entry(n).or_default();
        *version += 1;
        let global = self.events.len() as u64 + 1;
        let key = stream.aggregate_id.clone();
        self.events.push(Event {
            position: Position::global(global),
            slot: self.slots.slot_of(&key),
            partition_key: key,
            stream,
            aggregate_version: *version,
            event_id: EventId::from_bytes([0; 16]),
            event_type: "Happened".into(),
            event_version: 1,
            payload: Vec::new(),
            metadata: "{}".into(),
            tracing: Tracing::default(),
            created_at: Timestamp(0),
        });
        if self.faults && self.rng.chance(30) {
            self.held.insert(global);
        }
    }

    fn visible_below(&self) -> u64 {
        self.held.first().copied().unwrap_or(u64::MAX)
    }

    fn read(&self, request: &ReadRequest) -> Vec<Event> {
        let cursors: BTreeMap<Slot, Position> = request.cursors.iter().copied().collect();
        let below = self.visible_below();
        self.events
            .iter()
            .filter(|e| e.position.global < below)
            .filter(|e| cursors.get(&e.slot).is_some_and(|c| e.position > *c))
            .filter(|e| request.scope.includes(&e.stream))
            .take(request.limit)
            .cloned()
            .collect()
    }

    fn feed(&mut self, input: Input) {
        self.processing.handle(input);
        for command in self.processing.take_commands() {
            match command {
                Command::Read { task, request } => {
                    if request.limit != self.batch_size {
                        self.fail(format!(
                            "read of {} events, batch size {}",
                            request.limit, self.batch_size
                        ));
                    }
                    let events = if self.faults && self.rng.chance(5) {
                        None
                    } else {
                        Some(self.read(&request))
                    };
                    self.pending.push(Pending::Read { task, events });
                }
                Command::Load { task, projection, slots } => {
                    self.pending.push(Pending::Load { task, projection, slots })
                }
                Command::Process { task, projection, batch } => {
                    if let Some(part) =
                        batch.events.parts().iter().find(|p| p.len() > self.batch_size)
                    {
                        self.fail(format!(
                            "projection {projection} given {} events in one handler call",
                            part.len()
                        ));
                    }
                    for event in batch.events.iter() {
                        if !self.scopes[projection].includes(&event.stream) {
                            self.fail(format!(
                                "projection {projection} given {} out of its scope",
                                event.position
                            ));
                        }
                    }
                    self.pending.push(Pending::Process { task, projection, batch })
                }
                Command::Wait { task, .. } => self.pending.push(Pending::Wait { task }),
                Command::SlotStopped(slot) | Command::SlotLost(slot) => {
                    if self.pending.iter().any(|p| p.covers(slot)) {
                        self.fail(format!(
                            "slot {slot} reported stopped with a batch in flight covering it"
                        ));
                    }
                    if !self.running.remove(&slot) {
                        self.fail(format!("slot {slot} reported stopped twice"));
                    }
                    self.stopping.remove(&slot);
                }
                Command::Resolve { task, projection, key, action, grants, .. } => {
                    if action != DeadLetterAction::Retry {
                        self.fail(format!("unasked {action:?}"));
                    }
                    self.pending.push(Pending::Resolve { task, projection, key, grants });
                }
                Command::Poll { task } => self.pending.push(Pending::Poll { task }),
                Command::RecordStop { projection, .. }
                | Command::ProjectionStopped { projection }
                | Command::ProjectionResumed { projection } => {
                    self.fail(format!("projection {projection} stopped"))
                }
            }
        }
    }

    /// Delivers the answer to one pending task, chosen at random (concurrent tasks finish in any
    /// order).
    fn deliver(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let index = self.rng.below(self.pending.len() as u64) as usize;
        let input = match self.pending.swap_remove(index) {
            Pending::Read { task, events } => Input::Read { task, events },
            Pending::Wait { task } => Input::Elapsed { task },
            Pending::Load { task, projection, slots } => {
                let checkpoints = if self.faults && self.rng.chance(5) {
                    None
                } else {
                    Some(
                        slots
                            .iter()
                            .map(|s| {
                                (
                                    *s,
                                    self.checkpoints
                                        .get(&(projection, *s))
                                        .copied()
                                        .unwrap_or_default(),
                                )
                            })
                            .collect(),
                    )
                };
                let parked = self.parked_keys(projection, &slots);
                Input::Loaded { task, checkpoints, parked }
            }
            Pending::Process { task, projection, batch } => {
                let outcome = self.process(projection, &batch);
                // Batches of every pace: some lanes take one read at a time, some several.
                let took = Duration::from_millis(self.rng.below(40));
                Input::Processed { task, outcome, took }
            }
            Pending::Resolve { task, projection, key, grants } => {
                let outcome = self.retry(projection, &key, &grants);
                Input::Processed { task, outcome, took: Duration::ZERO }
            }
            Pending::Poll { task } => {
                let state = (!self.faults || !self.rng.chance(5)).then(|| PolledState {
                    stopped: BTreeSet::new(),
                    requests: self
                        .requested
                        .iter()
                        .filter(|k| self.letters.contains_key(k))
                        .map(|(p, key)| {
                            (*p, self.slots.slot_of(key), key.clone(), DeadLetterAction::Retry)
                        })
                        .collect(),
                });
                Input::Polled { task, state }
            }
        };
        self.feed(input);
    }

    /// An operator's retry of a parked key, as the runtime carries it out.
    fn retry(&mut self, projection: usize, key: &str, grants: &BTreeMap<Slot, Epoch>) -> Outcome {
        if self.faults && self.rng.chance(4) {
            return Outcome::StoreFailed;
        }
        for (slot, epoch) in grants {
            if self.owned.get(slot) != Some(epoch) {
                return Outcome::Fenced { slot: *slot };
            }
        }
        let id = (projection, key.to_owned());
        let parked: Vec<u64> = self.letters.get(&id).into_iter().flatten().copied().collect();
        if self.poisoned && parked.iter().any(|g| poison(self.event_at(*g))) {
            // Failed again: parked again (in a transaction of its own), the request answered.
            self.requested.remove(&id);
            return Outcome::HandlerFailed { index: None, timed_out: false, permanent: true };
        }
        for global in parked {
            self.apply(projection, global);
        }
        self.letters.remove(&id);
        self.requested.remove(&id);
        if self.faults && self.rng.chance(4) {
            return Outcome::StoreFailed; // written, but the reply was lost
        }
        Outcome::Committed
    }

    fn process(&mut self, projection: usize, batch: &Batch) -> Outcome {
        if projection == PARKING
            && self.poisoned
            && let Some(index) = batch.events.iter().position(poison)
        {
            let said = self.rng.chance(50);
            return Outcome::HandlerFailed {
                index: said.then_some(index),
                timed_out: !said && self.rng.chance(50),
                permanent: true,
            };
        }
        if self.faults && self.rng.chance(8) {
            return Outcome::HandlerFailed {
                index: None,
                timed_out: self.rng.chance(50),
                permanent: false,
            };
        }
        if self.faults && self.rng.chance(4) {
            return Outcome::StoreFailed;
        }
        for slot in batch.checkpoints.keys() {
            if batch.grants.get(slot) != self.owned.get(slot) {
                return Outcome::Fenced { slot: *slot };
            }
        }
        for (slot, at) in &batch.checkpoints {
            if self.checkpoints.get(&(projection, *slot)).is_some_and(|c| c > at) {
                return Outcome::Regression { slot: *slot };
            }
        }
        for event in batch.events.iter() {
            let id = (projection, event.partition_key.clone());
            let parked_before = self
                .letters
                .get(&id)
                .and_then(|l| l.first())
                .is_some_and(|g| *g < event.position.global);
            if parked_before {
                self.fail(format!(
                    "projection {projection}: {} applied while its key is parked",
                    event.position
                ));
            }
            self.apply(projection, event.position.global);
        }
        for parked in &batch.park {
            let global = parked.event.position.global;
            if self.applied[projection].contains_key(&global) {
                self.fail(format!("projection {projection}: {global} parked after it was applied"));
            }
            if !batch.checkpoints.contains_key(&parked.event.slot) {
                self.fail(format!("projection {projection}: {global} parked outside the batch"));
            }
            let key = (projection, parked.event.partition_key.clone());
            self.letters.entry(key).or_default().insert(global);
        }
        for (slot, at) in &batch.checkpoints {
            self.checkpoints.insert((projection, *slot), *at);
        }
        if self.faults && self.rng.chance(4) {
            return Outcome::StoreFailed; // written, but the reply was lost
        }
        Outcome::Committed
    }

    fn start(&mut self, slot: Slot) {
        if self.running.contains(&slot) {
            return;
        }
        self.running.insert(slot);
        let epoch = self.owned[&slot];
        self.feed(Input::Start { slot, epoch });
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=14 => {
                for _ in 0..1 + self.rng.below(6) {
                    self.append();
                }
            }
            15..=22 => {
                if let Some(first) = self.held.iter().nth(self.rng.below(3) as usize).copied() {
                    self.held.remove(&first);
                }
            }
            23..=26 => self.feed(Input::Wake),
            27..=28 => {
                let slot = Slot(self.rng.below(u64::from(self.slots.get())) as u32);
                if self.running.contains(&slot) && !self.stopping.contains(&slot) {
                    self.stopping.insert(slot);
                    self.feed(Input::Stop { slot });
                } else {
                    self.start(slot);
                }
            }
            30 => self.feed(Input::PollDue),
            31 => {
                // An operator retries a parked key while the poison is still there.
                if let Some(id) = self.letters.keys().nth(self.rng.below(4) as usize).cloned() {
                    self.requested.insert(id);
                }
            }
            29 => {
                // Someone else took the slot (and gave it back under a new epoch): our commits
                // for it are fenced until the worker starts it again.
                let slot = Slot(self.rng.below(u64::from(self.slots.get())) as u32);
                let epoch = self.owned.get_mut(&slot).unwrap();
                *epoch = epoch.next();
            }
            _ => self.deliver(),
        }
    }

    fn quiesce(&mut self) -> Result<(), String> {
        self.faults = false;
        self.held.clear();
        // The fix is deployed; the operator retries every parked key.
        self.poisoned = false;
        for round in 0..10_000u32 {
            if round.is_multiple_of(50) {
                self.requested.extend(self.letters.keys().cloned());
                self.feed(Input::PollDue);
            }
            for slot in self.slots.all() {
                if !self.stopping.contains(&slot) {
                    self.start(slot);
                }
            }
            if self.pending.is_empty() {
                if self.all_applied() && self.letters.is_empty() {
                    return Ok(());
                }
                self.feed(Input::Wake);
            } else {
                self.deliver();
            }
            if let Some(violation) = &self.violation {
                return Err(violation.clone());
            }
        }
        Err(format!("not every event applied: {}", self.progress()))
    }

    fn expected(&self, projection: usize) -> BTreeSet<u64> {
        self.events
            .iter()
            .filter(|e| self.scopes[projection].includes(&e.stream))
            .map(|e| e.position.global)
            .collect()
    }

    fn all_applied(&self) -> bool {
        (0..self.scopes.len()).all(|p| {
            let applied: BTreeSet<u64> = self.applied[p].keys().copied().collect();
            applied == self.expected(p)
        })
    }

    fn progress(&self) -> String {
        (0..self.scopes.len())
            .map(|p| {
                let expected = self.expected(p);
                let missing: Vec<u64> = expected
                    .iter()
                    .filter(|g| !self.applied[p].contains_key(g))
                    .copied()
                    .take(5)
                    .collect();
                format!(
                    "p{p} {}/{} (missing e.g. {missing:?})",
                    self.applied[p].len(),
                    expected.len()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn run(
    seed: u64,
    groups: usize,
    batch_size: usize,
    window: usize,
    slot_count: u64,
    steps: usize,
) -> Result<(), String> {
    let mut world = World::new(seed, groups, batch_size, window, slot_count);
    for slot in world.slots.all() {
        world.start(slot);
    }
    for _ in 0..steps {
        world.step();
        if let Some(violation) = &world.violation {
            return Err(violation.clone());
        }
    }
    world.quiesce()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_event_exactly_once_in_order_whatever_the_order_of_answers(
        seed in any::<u64>(),
        groups in 1usize..4,
        batch_size in 1usize..6,
        window in 1usize..4,
        slot_count in prop::sample::select(vec![1u64, 4, 8]),
    ) {
        if let Err(violation) = run(seed, groups, batch_size, window, slot_count, 400) {
            prop_assert!(false, "seed {seed}, groups {groups}, batch {batch_size}, window {window}, slots {slot_count}: {violation}");
        }
    }
}

/// A reader far behind, cut at a boundary it has not read past: the case the rejoin rule exists
/// for. 200 seeds of a longer run with small batches and windows.
#[test]
fn long_runs_with_small_batches() {
    for seed in 0..200 {
        run(seed, 2, 2, 2, 4, 1_500).unwrap_or_else(|v| panic!("seed {seed}: {v}"));
    }
}

#[test]
fn a_batch_handed_to_a_projection_is_shared_by_reference() {
    let mut world = World::new(7, 1, 10, 4, 1);
    world.faults = false;
    for _ in 0..30 {
        world.append();
    }
    world.start(Slot(0));
    // Deliver loads, then the shared read, and look at the batches handed to the two unscoped
    // projections (0 and 3).
    let mut shared: Vec<Arc<Vec<Event>>> = Vec::new();
    for _ in 0..20 {
        if let Some(index) =
            world.pending.iter().position(|p| !matches!(p, Pending::Process { .. }))
        {
            let task = world.pending.swap_remove(index);
            let input = match task {
                Pending::Read { task, events } => Input::Read { task, events },
                Pending::Load { task, projection, slots } => Input::Loaded {
                    parked: Vec::new(),
                    task,
                    checkpoints: Some(
                        slots
                            .iter()
                            .map(|s| {
                                (
                                    *s,
                                    world
                                        .checkpoints
                                        .get(&(projection, *s))
                                        .copied()
                                        .unwrap_or_default(),
                                )
                            })
                            .collect(),
                    ),
                },
                Pending::Wait { task } => Input::Elapsed { task },
                Pending::Process { .. } | Pending::Resolve { .. } | Pending::Poll { .. } => {
                    unreachable!()
                }
            };
            world.feed(input);
        }
    }
    for pending in &world.pending {
        if let Pending::Process { projection: 0 | 3, batch, .. } = pending {
            shared.push(batch.events.parts()[0].clone());
        }
    }
    assert_eq!(shared.len(), 2, "both unscoped projections got the first batch");
    assert!(Arc::ptr_eq(&shared[0], &shared[1]), "one read, one copy of the events");
}
