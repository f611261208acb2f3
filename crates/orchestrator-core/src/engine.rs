//! The coordination state machine of one worker: inputs in, commands out, time passed in.
//!
//! The runtime owns the IO. It feeds the engine what happened ([`Input`]) with the current time,
//! executes the [`Command`]s the engine asks for, and feeds their outcomes back.
//! The engine is level-triggered: each [`Input::Observed`] snapshot is compared with what the worker
//! is doing, and commands are emitted to close the gap, so a lost or repeated command heals itself.
//!
//! Every store call the engine asks for is answered with an input, failures included
//! ([`Input::CallFailed`]); the engine decides what follows: a retry at a deadline with backoff
//! (registration, deregistration), the next interval (heartbeats, observations), or the end of
//! the worker ([`Engine::exit`]).
//!
//! A join, from input to commands (see docs/ARCHITECTURE.md for the whole walk-through):
//! 1. `Start` → `Register`. `Registered(incarnation)` → `Heartbeat` (takes the lease if vacant) + `Observe`.
//! 2. The leader's `Observed` shows a live worker that is not a member. Once no join arrived for
//!    `registration_wait`, it emits `CreateGeneration(plan)`: members + slot grants and handoffs.
//! 3. Each member's `Observed` shows the new generation. An owner asked to hand a slot over emits
//!    `StopSlot`; on `SlotStopped` it emits `ReleaseSlot`, which moves the slot to the joiner.
//! 4. The joiner's `Observed` shows slots it owns with no pending handoff: it emits `StartSlot`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::ids::{Epoch, Generation, Incarnation, ReplicaSetName, WorkerId};
use crate::plan::{Deferral, GenerationPlan, plan_generation};
use crate::slot::{Slot, SlotCount};
use crate::snapshot::{PROTOCOL_VERSION, Partition, Snapshot};
use crate::time::Timestamp;
use crate::timing::Timing;

/// How a replica set moves slots when membership changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The seed's stop-the-world: on a new generation every member stops all its slots, hands over
    /// what moved, waits until every member did the same, then starts its new assignment.
    Recreate,
    /// Only slots that change owner pause; a moved slot starts on its new owner once the old owner
    /// released it (or was fenced). Unmoved slots keep processing throughout. The default.
    #[default]
    Incremental,
}

/// Static configuration of one worker's engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The replica set the worker joins.
    pub replica_set: ReplicaSetName,
    /// This worker's id.
    pub worker_id: WorkerId,
    /// Slot count of the replica set.
    pub slot_count: SlotCount,
    /// Heartbeat, staleness and wait settings.
    pub timing: Timing,
    /// Rebalancing strategy.
    pub strategy: Strategy,
}

/// Something that happened, fed to [`Engine::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The runtime started the worker.
    Start,
    /// Time passed; the engine may be due to heartbeat or observe.
    Tick,
    /// `Register` succeeded under this incarnation.
    Registered(Incarnation),
    /// `Heartbeat` was written.
    HeartbeatAcked,
    /// The store no longer knows this incarnation (evicted as stale, or the id was re-registered).
    NotRegistered,
    /// A fresh snapshot of the replica set.
    Observed(Snapshot),
    /// The runtime stopped processing a slot, and its last batch is committed or abandoned.
    SlotStopped(Slot),
    /// Graceful shutdown was requested (SIGTERM, cancellation).
    Shutdown,
    /// `Deregister` succeeded.
    Deregistered,
    /// The runtime dropped a slot on its own (a commit was fenced, or found a checkpoint ahead):
    /// it is stopped, and the engine looks at the store again to see whether it is still owned.
    SlotLost(Slot),
    /// A store call the engine asked for failed. `transient` is the error's own classification
    /// (connection lost, server restarting, serialization failure); others are definite answers.
    CallFailed {
        /// Which call.
        call: Call,
        /// Whether retrying the same call later may succeed.
        transient: bool,
    },
}

/// The store calls of [`Command`]s, as [`Input::CallFailed`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// [`Command::Register`].
    Register,
    /// [`Command::Heartbeat`].
    Heartbeat,
    /// [`Command::Observe`].
    Observe,
    /// [`Command::CreateGeneration`]; a definite failure is a conflict (the plan was superseded).
    CreateGeneration,
    /// [`Command::ReleaseSlot`].
    ReleaseSlot,
    /// [`Command::AckGeneration`].
    AckGeneration,
    /// [`Command::Deregister`].
    Deregister,
}

/// Why a worker's engine ended ([`Engine::exit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It left as asked: deregistered, or shut down before it had registered.
    Left,
    /// The store refused registration for good (schema missing, slot count mismatch).
    Refused,
    /// Its id was registered again by a newer process.
    Superseded,
    /// Live members speak another coordination protocol.
    IncompatibleWorkers(Vec<(WorkerId, u32)>),
    /// Leaving took longer than `coordination_timeout`; it ended without deregistering (the others
    /// take its slots once it is stale).
    LeaveTimedOut,
}

/// Something the runtime must do, taken from [`Engine::take_commands`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Register (or register again) in the replica set; answer with `Registered` or an error.
    Register,
    /// Write a heartbeat for this incarnation and take or renew the leader lease if possible.
    Heartbeat {
        /// Incarnation the heartbeat is for.
        incarnation: Incarnation,
        /// How long the lease lasts if this worker holds it: `stale_worker_timeout`, so a dead
        /// leader is replaced within the stale timeout.
        lease: Duration,
    },
    /// Read a snapshot and answer with `Observed`.
    Observe,
    /// Apply a new generation (leader only; compare-and-set in the store).
    CreateGeneration(GenerationPlan),
    /// Start processing a slot under this epoch (the fencing token of its commits).
    StartSlot {
        /// The slot.
        slot: Slot,
        /// Its epoch.
        epoch: Epoch,
    },
    /// Stop processing a slot after the batch in flight; answer with `SlotStopped`.
    StopSlot {
        /// The slot.
        slot: Slot,
    },
    /// Hand a stopped slot to its `next_owner` (compare-and-set on owner and epoch).
    ReleaseSlot {
        /// The slot.
        slot: Slot,
        /// Its epoch while this worker owned it.
        epoch: Epoch,
    },
    /// Record that this worker has adopted a generation.
    AckGeneration {
        /// Incarnation writing the ack.
        incarnation: Incarnation,
        /// The generation adopted.
        generation: Generation,
    },
    /// Leave the replica set: drop the worker row, free its slots, give up the lease.
    Deregister {
        /// Incarnation leaving.
        incarnation: Incarnation,
    },
}

/// Something worth logging or counting, taken from [`Engine::take_notices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Registration succeeded.
    Registered {
        /// The new incarnation.
        incarnation: Incarnation,
    },
    /// This worker became the leader.
    BecameLeader,
    /// The leader proposed a generation.
    GenerationPlanned {
        /// Its number.
        generation: Generation,
        /// Number of members.
        members: usize,
        /// Number of slots changing hands.
        moved_slots: usize,
        /// Stale workers removed.
        evicted: Vec<WorkerId>,
    },
    /// A new generation was seen; this worker starts adopting it.
    CoordinationStarted {
        /// The generation.
        generation: Generation,
    },
    /// Every member has adopted the generation.
    AllCoordinated {
        /// The generation.
        generation: Generation,
        /// Time from first seeing it to everyone having adopted it.
        duration: Duration,
    },
    /// Not every member adopted the generation within `coordination_timeout`; carrying on.
    CoordinationTimeout {
        /// The generation.
        generation: Generation,
    },
    /// As leader: a handoff was pending for `coordination_timeout` while its owner kept
    /// heartbeating; the next generation grants the slot to its next owner anyway (epoch bumped,
    /// so the old owner's late commit is fenced).
    HandoffForced {
        /// The slot.
        slot: Slot,
        /// Its owner, which did not release it.
        from: WorkerId,
        /// Its next owner.
        to: WorkerId,
    },
    /// Processing with a new set of slots.
    Processing {
        /// The generation.
        generation: Generation,
        /// This worker's partition, if it is a member.
        partition: Option<Partition>,
        /// Number of slots processed.
        slots: usize,
    },
    /// A slot this worker was processing now belongs to someone else or has a newer epoch.
    OwnershipLost {
        /// The slot.
        slot: Slot,
    },
    /// No heartbeat has been acknowledged for `stale_worker_timeout`: processing stops until one is.
    ContactLost,
    /// The worker id is registered by a newer process; this one stops.
    Superseded,
    /// A store call failed transiently; the engine tries it again after `after`.
    RetryScheduled {
        /// Which call.
        call: Call,
        /// Failures in a row so far.
        attempt: u32,
        /// When the next attempt is.
        after: Duration,
    },
    /// A store call failed; it is tried again at the next interval (heartbeats, observations,
    /// acks, releases), or the worker gives up on it (a definite refusal).
    CallFailed {
        /// Which call.
        call: Call,
        /// Whether it was transient.
        transient: bool,
    },
    /// Leaving took longer than `coordination_timeout`: the worker ends without deregistering.
    LeaveTimedOut,
    /// Live members speak another coordination protocol (another release): this worker leaves
    /// instead of taking part.
    IncompatibleWorkers {
        /// The workers, each with the protocol it speaks.
        workers: Vec<(WorkerId, u32)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Registering,
    Member(Incarnation),
    Leaving(Incarnation),
    Left,
}

#[derive(Debug, Clone, Copy)]
struct Adoption {
    generation: Generation,
    seen_at: Timestamp,
    acked: bool,
    settled: bool,
}

/// The coordination state machine of one worker.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    phase: Phase,
    next_heartbeat: Timestamp,
    next_observe: Timestamp,
    last_contact: Option<Timestamp>,
    is_leader: bool,
    adoption: Option<Adoption>,
    running: BTreeMap<Slot, Epoch>,
    stopping: BTreeSet<Slot>,
    /// Failed attempts in a row of the call being retried (registration or deregistration), and
    /// when the next attempt is due (`None` while an attempt is in flight).
    retry: Option<(u32, Option<Timestamp>)>,
    /// When a graceful leave gives up on deregistering.
    leave_by: Option<Timestamp>,
    /// Pending handoffs as this worker has seen them: slot -> (owner, next owner, first seen).
    handoffs: BTreeMap<Slot, (WorkerId, WorkerId, Timestamp)>,
    exit: Option<Exit>,
    commands: Vec<Command>,
    notices: Vec<Notice>,
}

impl Engine {
    /// A new engine; nothing happens until [`Input::Start`].
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            phase: Phase::Idle,
            next_heartbeat: Timestamp(0),
            next_observe: Timestamp(0),
            last_contact: None,
            is_leader: false,
            adoption: None,
            running: BTreeMap::new(),
            stopping: BTreeSet::new(),
            retry: None,
            leave_by: None,
            handoffs: BTreeMap::new(),
            exit: None,
            commands: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Slots the runtime was told to process (and not yet told to stop), with their epochs.
    pub fn running(&self) -> &BTreeMap<Slot, Epoch> {
        &self.running
    }

    /// Whether the worker has left the replica set (or was superseded) and the runtime may exit.
    pub fn has_left(&self) -> bool {
        self.phase == Phase::Left
    }

    /// Why the worker ended, once it has.
    pub fn exit(&self) -> Option<&Exit> {
        self.exit.as_ref()
    }

    /// The current incarnation, if registered.
    pub fn incarnation(&self) -> Option<Incarnation> {
        match self.phase {
            Phase::Member(inc) | Phase::Leaving(inc) => Some(inc),
            _ => None,
        }
    }

    /// When the engine next wants a [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let retry = self.retry.and_then(|(_, due)| due);
        let intervals = match self.phase {
            Phase::Member(_) | Phase::Leaving(_) => {
                Some(self.next_heartbeat.min(self.next_observe))
            }
            _ => None,
        };
        [retry, intervals, self.leave_by].into_iter().flatten().min()
    }

    /// Commands emitted since the last call, in the order they must run.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Notices emitted since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Feeds one input at time `now`.
    pub fn handle(&mut self, now: Timestamp, input: Input) {
        match input {
            Input::Start => {
                if self.phase == Phase::Idle {
                    self.phase = Phase::Registering;
                    self.commands.push(Command::Register);
                }
            }
            Input::Registered(incarnation) if self.phase == Phase::Left => {
                // Shut down while this registration was in flight: undo it.
                self.commands.push(Command::Deregister { incarnation });
            }
            Input::Registered(incarnation) => {
                if self.phase == Phase::Registering {
                    self.phase = Phase::Member(incarnation);
                    self.retry = None;
                    self.last_contact = Some(now);
                    self.notices.push(Notice::Registered { incarnation });
                    let lease = self.config.timing.stale_worker_timeout;
                    self.commands.push(Command::Heartbeat { incarnation, lease });
                    self.commands.push(Command::Observe);
                    self.next_heartbeat = now + self.config.timing.heartbeat_interval;
                    self.next_observe = now + self.config.timing.poll_interval;
                }
            }
            Input::Tick => self.on_tick(now),
            Input::HeartbeatAcked => self.last_contact = Some(now),
            Input::SlotLost(slot) => {
                self.handle(now, Input::SlotStopped(slot));
                self.commands.push(Command::Observe);
            }
            Input::CallFailed { call, transient } => self.on_call_failed(now, call, transient),
            Input::NotRegistered => self.on_not_registered(),
            Input::Observed(snapshot) => self.on_observed(now, &snapshot),
            Input::SlotStopped(slot) => {
                self.stopping.remove(&slot);
                self.running.remove(&slot);
                if let Phase::Leaving(incarnation) = self.phase {
                    self.deregister_when_drained(incarnation);
                }
            }
            Input::Shutdown => self.on_shutdown(now),
            Input::Deregistered => {
                self.retry = None;
                self.leave(Exit::Left);
            }
        }
    }

    /// Ends the worker, keeping the first reason.
    fn leave(&mut self, exit: Exit) {
        self.phase = Phase::Left;
        self.is_leader = false;
        self.retry = None;
        self.leave_by = None;
        self.exit.get_or_insert(exit);
    }

    fn on_call_failed(&mut self, now: Timestamp, call: Call, transient: bool) {
        match (call, transient) {
            (Call::Register, true) | (Call::Deregister, true) => {
                let attempt = self.retry.map_or(1, |(attempt, _)| attempt + 1);
                let after = self.config.timing.retry_backoff(attempt);
                self.retry = Some((attempt, Some(now + after)));
                self.notices.push(Notice::RetryScheduled { call, attempt, after });
            }
            (Call::Register, false) => {
                self.notices.push(Notice::CallFailed { call, transient });
                if self.phase == Phase::Registering {
                    self.leave(Exit::Refused);
                }
            }
            (Call::Deregister, false) => {
                // Nothing to deregister any more (evicted meanwhile): the leave is complete.
                self.notices.push(Notice::CallFailed { call, transient });
                self.leave(Exit::Left);
            }
            (Call::CreateGeneration, false) => {
                // Superseded by another plan or leader: look again at once.
                self.commands.push(Command::Observe);
            }
            (Call::ReleaseSlot, false) => {
                // The slot is not ours at that epoch any more (its handoff was forced): look at
                // who owns what now.
                self.notices.push(Notice::CallFailed { call, transient });
                self.commands.push(Command::Observe);
            }
            _ => self.notices.push(Notice::CallFailed { call, transient }),
        }
    }

    fn on_tick(&mut self, now: Timestamp) {
        if self.leave_by.is_some_and(|by| now >= by) && matches!(self.phase, Phase::Leaving(_)) {
            self.notices.push(Notice::LeaveTimedOut);
            return self.leave(Exit::LeaveTimedOut);
        }
        if let Some((attempt, Some(due))) = self.retry
            && now >= due
        {
            // Due: the same call again; its answer clears the retry or schedules the next one.
            self.retry = Some((attempt, None));
            match self.phase {
                Phase::Registering => self.commands.push(Command::Register),
                Phase::Leaving(incarnation) => {
                    self.commands.push(Command::Deregister { incarnation })
                }
                _ => self.retry = None,
            }
        }
        let incarnation = match self.phase {
            Phase::Member(inc) | Phase::Leaving(inc) => inc,
            _ => return,
        };
        if now >= self.next_heartbeat {
            let lease = self.config.timing.stale_worker_timeout;
            self.commands.push(Command::Heartbeat { incarnation, lease });
            self.next_heartbeat = now + self.config.timing.heartbeat_interval;
        }
        if now >= self.next_observe {
            self.commands.push(Command::Observe);
            self.next_observe = now + self.config.timing.poll_interval;
        }
        if self.contact_lost(now) && !self.running.is_empty() {
            // Others will soon see this worker as stale and take its slots; fencing would refuse
            // its commits anyway, but stopping now saves the wasted work.
            self.notices.push(Notice::ContactLost);
            self.stop_all();
        }
    }

    fn contact_lost(&self, now: Timestamp) -> bool {
        self.last_contact
            .is_none_or(|at| now.saturating_since(at) > self.config.timing.stale_worker_timeout)
    }

    fn on_not_registered(&mut self) {
        match self.phase {
            Phase::Member(_) => {
                // Evicted while unable to heartbeat (a pause, a partition). Register again as a new
                // incarnation; the old one's slots were granted away with new epochs.
                self.stop_all();
                self.is_leader = false;
                self.adoption = None;
                self.phase = Phase::Registering;
                self.commands.push(Command::Register);
            }
            Phase::Leaving(_) => {
                // Nothing left to deregister.
                self.stop_all();
                self.leave(Exit::Left);
            }
            _ => {}
        }
    }

    fn on_shutdown(&mut self, now: Timestamp) {
        match self.phase {
            // Not registered (perhaps retrying against a database that is down): nothing to undo.
            Phase::Idle | Phase::Registering => self.leave(Exit::Left),
            Phase::Member(incarnation) => {
                self.phase = Phase::Leaving(incarnation);
                self.leave_by = Some(now + self.config.timing.coordination_timeout);
                self.stop_all();
                self.deregister_when_drained(incarnation);
            }
            Phase::Leaving(_) | Phase::Left => {}
        }
    }

    fn deregister_when_drained(&mut self, incarnation: Incarnation) {
        if self.running.is_empty() && self.stopping.is_empty() {
            self.commands.push(Command::Deregister { incarnation });
        }
    }

    fn stop_all(&mut self) {
        let slots: Vec<Slot> = self.running.keys().copied().collect();
        for slot in slots {
            self.stop(slot);
        }
    }

    fn stop(&mut self, slot: Slot) {
        if self.running.contains_key(&slot) && self.stopping.insert(slot) {
            self.commands.push(Command::StopSlot { slot });
        }
    }

    fn on_observed(&mut self, now: Timestamp, snapshot: &Snapshot) {
        let Phase::Member(incarnation) = self.phase else {
            return;
        };
        let me = self.config.worker_id.clone();
        match snapshot.worker(&me) {
            None => return self.on_not_registered(),
            Some(record) if record.incarnation > incarnation => {
                self.notices.push(Notice::Superseded);
                self.stop_all();
                return self.leave(Exit::Superseded);
            }
            Some(record) if record.incarnation < incarnation => return,
            Some(_) => {}
        }
        let stale_after = self.config.timing.stale_worker_timeout;
        let incompatible: Vec<(WorkerId, u32)> = snapshot
            .workers
            .iter()
            .filter(|w| w.id != me && w.protocol != PROTOCOL_VERSION)
            .filter(|w| w.is_live(stale_after))
            .map(|w| (w.id.clone(), w.protocol))
            .collect();
        if !incompatible.is_empty() {
            self.notices.push(Notice::IncompatibleWorkers { workers: incompatible.clone() });
            self.exit = Some(Exit::IncompatibleWorkers(incompatible));
            return self.on_shutdown(now);
        }

        self.lead(now, snapshot, incarnation);
        self.adopt(now, snapshot, incarnation);
    }

    fn lead(&mut self, now: Timestamp, snapshot: &Snapshot, incarnation: Incarnation) {
        let overdue = self.overdue_handoffs(now, snapshot);
        let me = &self.config.worker_id;
        let leads = snapshot
            .leader()
            .is_some_and(|lease| &lease.holder == me && lease.incarnation == incarnation);
        if leads && !self.is_leader {
            self.notices.push(Notice::BecameLeader);
        }
        self.is_leader = leads;
        if snapshot.leader().is_none() {
            // Vacant or expired lease: heartbeat now, which takes it.
            self.next_heartbeat = now;
        }
        if !leads {
            return;
        }
        for slot in &overdue {
            if let Some((from, to, _)) = self.handoffs.get(slot) {
                self.notices.push(Notice::HandoffForced {
                    slot: *slot,
                    from: from.clone(),
                    to: to.clone(),
                });
            }
        }
        match plan_generation(snapshot, &self.config.timing, me, incarnation, &overdue) {
            Ok(plan) => {
                let moved_slots = plan.changes.len();
                self.notices.push(Notice::GenerationPlanned {
                    generation: plan.generation,
                    members: plan.members.len(),
                    moved_slots,
                    evicted: plan.evict.clone(),
                });
                self.commands.push(Command::CreateGeneration(plan));
                self.commands.push(Command::Observe);
            }
            Err(Deferral::BatchingJoins(wait)) => {
                self.next_observe = self.next_observe.min(now + wait);
            }
            Err(Deferral::Settled | Deferral::NoLiveWorkers) => {}
        }
    }

    /// Tracks how long each handoff has been pending (by this worker's clock, from when it first
    /// saw it: a leader that took over later waits longer, never shorter) and returns those
    /// pending for `coordination_timeout`; asks to observe again when the next one falls due.
    fn overdue_handoffs(&mut self, now: Timestamp, snapshot: &Snapshot) -> BTreeSet<Slot> {
        let timeout = self.config.timing.coordination_timeout;
        let mut seen = BTreeMap::new();
        for (index, rec) in snapshot.slots.iter().enumerate() {
            let (Some(owner), Some(next)) = (&rec.owner, &rec.next_owner) else { continue };
            let slot = Slot(index as u32);
            let since = match self.handoffs.get(&slot) {
                Some((o, n, since)) if o == owner && n == next => *since,
                _ => now,
            };
            seen.insert(slot, (owner.clone(), next.clone(), since));
        }
        self.handoffs = seen;
        let mut overdue = BTreeSet::new();
        for (slot, (_, _, since)) in &self.handoffs {
            let due = *since + timeout;
            if now >= due {
                overdue.insert(*slot);
            } else {
                self.next_observe = self.next_observe.min(due);
            }
        }
        overdue
    }

    fn adopt(&mut self, now: Timestamp, snapshot: &Snapshot, incarnation: Incarnation) {
        let me = self.config.worker_id.clone();
        let generation = snapshot.generation;
        if self.adoption.is_none_or(|a| a.generation < generation) && generation > Generation::ZERO
        {
            self.adoption =
                Some(Adoption { generation, seen_at: now, acked: false, settled: false });
            self.notices.push(Notice::CoordinationStarted { generation });
        }
        let recreate_pause =
            self.config.strategy == Strategy::Recreate && self.adoption.is_some_and(|a| !a.acked);

        // Stop what this worker may no longer process, or must hand over.
        let running: Vec<(Slot, Epoch)> = self.running.iter().map(|(s, e)| (*s, *e)).collect();
        for (slot, epoch) in running {
            let record = snapshot.slot(slot);
            let lost = record.owner.as_ref() != Some(&me) || record.epoch != epoch;
            if lost && !self.stopping.contains(&slot) {
                self.notices.push(Notice::OwnershipLost { slot });
            }
            if lost || record.next_owner.is_some() || recreate_pause {
                self.stop(slot);
            }
        }

        // Release stopped slots that are being handed over.
        let mut handing_over = false;
        for (slot, epoch) in snapshot.owned_by(&me) {
            if snapshot.slot(slot).next_owner.is_some() {
                handing_over = true;
                if !self.running.contains_key(&slot) {
                    self.commands.push(Command::ReleaseSlot { slot, epoch });
                }
            }
        }

        let Some(mut adoption) = self.adoption else {
            return;
        };
        let is_member = snapshot.members.contains(&me);
        let drained = self.config.strategy == Strategy::Incremental || self.running.is_empty();
        if !adoption.acked && is_member && !handing_over && drained {
            adoption.acked = true;
            self.commands.push(Command::AckGeneration { incarnation, generation });
        } else if adoption.acked
            && snapshot.worker(&me).is_some_and(|w| w.acked_generation < generation)
        {
            // The ack was lost (a failed write): write it again, or the others wait for it.
            self.commands.push(Command::AckGeneration { incarnation, generation });
        }

        let stale_after = self.config.timing.stale_worker_timeout;
        let everyone_acked = snapshot.members.iter().all(|m| {
            m == &me && adoption.acked
                || snapshot
                    .worker(m)
                    .is_some_and(|w| w.acked_generation >= generation || !w.is_live(stale_after))
        });
        let waited = now.saturating_since(adoption.seen_at);
        if !adoption.settled && adoption.acked {
            if everyone_acked {
                adoption.settled = true;
                self.notices.push(Notice::AllCoordinated { generation, duration: waited });
            } else if waited >= self.config.timing.coordination_timeout {
                // Ownership is per slot and fenced, so starting without the barrier is safe.
                adoption.settled = true;
                self.notices.push(Notice::CoordinationTimeout { generation });
            }
        }
        self.adoption = Some(adoption);

        let may_start = !self.contact_lost(now)
            && match self.config.strategy {
                Strategy::Incremental => true,
                Strategy::Recreate => adoption.settled,
            };
        if !may_start {
            return;
        }
        let mut started = false;
        for (slot, epoch) in snapshot.owned_by(&me) {
            let free_to_run = snapshot.slot(slot).next_owner.is_none()
                && !self.running.contains_key(&slot)
                && !self.stopping.contains(&slot);
            if free_to_run {
                self.running.insert(slot, epoch);
                self.commands.push(Command::StartSlot { slot, epoch });
                started = true;
            }
        }
        if started {
            self.notices.push(Notice::Processing {
                generation,
                partition: snapshot.partition_of(&me),
                slots: self.running.len(),
            });
        }
    }
}
