//! The audit projections of the simulation: each records every event it applies, in the same
//! transaction as its checkpoint, so what was committed tells whether an event took effect twice or
//! out of order.
//!
//! They differ in speed and scope, so that the shared read is left and rejoined all the time: two
//! fast ones, one that spends simulated time on every batch (and now and then hangs past the
//! handler timeout, so its batch is abandoned and retried), and one scoped to one aggregate type.
//! A fifth runs the `park` failure policy and fails for good on "poison" events until the fix is
//! deployed (at wind-down), sometimes naming the event, sometimes not (so the batch is retried one
//! event at a time): its poisoned keys are parked, then retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, DeadLetterFilter, DeadLetterStore};
use orchestrator_core::{Event, ReplicaSetName, Scope, StreamId};
use orchestrator_memory::{MemoryStore, MemoryTx};
use orchestrator_runtime::{FailurePolicy, HandlerError, Permanent, Projection};

/// The projections every simulated worker runs, each checked on its own.
pub const PROJECTIONS: [&str; 5] =
    ["sim_audit", "sim_audit_batch", "sim_audit_slow", "sim_audit_cards", "sim_audit_park"];

/// The projection with the `park` policy.
pub(crate) const PARKING: &str = PROJECTIONS[4];

/// Events the parking projection fails on while the poison is on.
fn poison(event: &Event) -> bool {
    event.position.global.is_multiple_of(97)
}

/// The aggregate type `sim_audit_cards` is scoped to; the other streams are accounts.
pub(crate) const CARDS: &str = "Card";

/// How long `sim_audit_slow` takes per batch, and how long it hangs on every 25th batch.
pub(crate) const SLOW_BATCH: Duration = Duration::from_millis(60);
pub(crate) const HANG: Duration = Duration::from_millis(1_500);

fn applied_table(projection: &str) -> String {
    format!("{projection}.applied")
}

fn versions_table(projection: &str) -> String {
    format!("{projection}.versions")
}

/// Whether `projection` handles events of `stream`.
pub(crate) fn in_scope(projection: &str, stream: &StreamId) -> bool {
    projection != PROJECTIONS[3] || stream.aggregate_type == CARDS
}

/// Records each event: `applied[position] += 1` and `versions[aggregate] = version`, checking the
/// aggregate's previous version (as this transaction sees it) is the one before.
pub(crate) struct Audit {
    name: &'static str,
    worker: String,
    batches: AtomicU64,
    /// Whether the parking projection's poison is still on (shared by every worker).
    poisoned: Arc<AtomicBool>,
}

impl Audit {
    pub(crate) fn new(name: &'static str, worker: &str, poisoned: Arc<AtomicBool>) -> Self {
        Self { name, worker: worker.to_owned(), batches: AtomicU64::new(0), poisoned }
    }

    fn record(&self, tx: &mut MemoryTx, event: &Event) {
        let key = format!("{:020}", event.position.global);
        let applied = applied_table(self.name);
        let times =
            tx.get(&applied, &key).map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap()));
        let mut row = (times + 1).to_be_bytes().to_vec();
        row.extend_from_slice(self.worker.as_bytes());
        tx.put(&applied, &key, row);
        let versions = versions_table(self.name);
        let aggregate = event.stream.aggregate_id.as_str();
        let previous = tx
            .get(&versions, aggregate)
            .map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap()));
        if event.aggregate_version != previous + 1 {
            // Committed only if the transaction commits: then it is a real violation.
            tx.put(
                &format!("{}.violations", self.name),
                &key,
                format!(
                    "{} applied {aggregate} v{} after v{previous} (worker {})",
                    self.name, event.aggregate_version, self.worker
                )
                .into_bytes(),
            );
        }
        tx.put(&versions, aggregate, event.aggregate_version.to_be_bytes().to_vec());
    }
}

#[async_trait]
impl Projection<MemoryTx> for Audit {
    fn name(&self) -> &str {
        self.name
    }

    fn scope(&self) -> Scope {
        if self.name == PROJECTIONS[3] {
            Scope { aggregate_types: vec![CARDS.into()], bounded_contexts: Vec::new() }
        } else {
            Scope::all()
        }
    }

    fn failure_policy(&self) -> Option<FailurePolicy> {
        (self.name == PARKING).then_some(FailurePolicy::Park)
    }

    async fn handle(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), BoxError> {
        self.record(tx, event);
        Ok(())
    }

    async fn handle_batch(&self, tx: &mut MemoryTx, events: &[Event]) -> Result<(), HandlerError> {
        if self.name == PARKING && self.poisoned.load(Ordering::Relaxed) {
            for (index, event) in events.iter().enumerate() {
                if poison(event) {
                    let error = Permanent::new(format!("poison at {}", event.position));
                    // Half the time the handler says which event failed.
                    return Err(if event.position.global.is_multiple_of(2) {
                        HandlerError::at(index, error)
                    } else {
                        HandlerError::somewhere(error)
                    });
                }
            }
        }
        if self.name == PROJECTIONS[2] {
            let batch = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
            let pause = if batch.is_multiple_of(25) { HANG } else { SLOW_BATCH };
            tokio::time::sleep(pause).await;
        }
        for event in events {
            if !in_scope(self.name, &event.stream) {
                return Err(HandlerError::at(
                    0,
                    format!("{} given {} out of its scope", self.name, event.stream),
                ));
            }
            self.record(tx, event);
        }
        Ok(())
    }
}

/// How many events each projection must apply: all of them, the cards for the scoped one.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expected {
    pub(crate) events: u64,
    pub(crate) cards: u64,
}

impl Expected {
    fn of(&self, projection: &str) -> u64 {
        if projection == PROJECTIONS[3] { self.cards } else { self.events }
    }
}

/// What was committed: no event applied twice, no order violation; with `expected`, also every
/// expected event applied (exactly once).
pub(crate) fn check_committed(
    store: &MemoryStore,
    expected: Option<Expected>,
) -> Result<(), String> {
    for projection in PROJECTIONS {
        if let Some((_, why)) =
            store.read_model_table(&format!("{projection}.violations")).into_iter().next()
        {
            return Err(format!("per-aggregate order broken: {}", String::from_utf8_lossy(&why)));
        }
        let applied = store.read_model_table(&applied_table(projection));
        for (key, row) in &applied {
            let times = u64::from_be_bytes(row[..8].try_into().unwrap());
            if times > 1 {
                let last = String::from_utf8_lossy(&row[8..]);
                return Err(format!(
                    "{projection}: event at position {} applied {times} times (last by {last})",
                    key.trim_start_matches('0')
                ));
            }
        }
        if let Some(expected) = expected
            && applied.len() as u64 != expected.of(projection)
        {
            return Err(format!(
                "{projection}: {} of {} events applied",
                applied.len(),
                expected.of(projection)
            ));
        }
    }
    Ok(())
}

/// The dead letters of the parking projection: none of them applied (nothing of a parked key is
/// applied while it is parked: the order check above sees a key's later event applied after an
/// earlier one parked, this one the parked event itself). Returns how many there are.
pub(crate) async fn check_parked(store: &MemoryStore) -> Result<usize, String> {
    let rs = ReplicaSetName::new(super::REPLICA_SET).expect("valid");
    let filter = DeadLetterFilter { projection: Some(PARKING.into()), ..Default::default() };
    let letters = store.dead_letters(&rs, &filter).await.map_err(|e| e.to_string())?;
    let applied = store.read_model_table(&applied_table(PARKING));
    for letter in &letters {
        let key = format!("{:020}", letter.position.global);
        if applied.iter().any(|(k, _)| *k == key) {
            return Err(format!("{PARKING}: parked event {} was applied", letter.position));
        }
    }
    Ok(letters.len())
}

/// Whether every projection applied every event it should.
pub(crate) fn all_applied(store: &MemoryStore, expected: Expected) -> bool {
    store.event_count() as u64 == expected.events
        && PROJECTIONS
            .iter()
            .all(|p| store.read_model_table(&applied_table(p)).len() as u64 == expected.of(p))
}

/// How far each projection got, for a failure message.
pub(crate) fn progress(store: &MemoryStore, expected: Expected) -> String {
    PROJECTIONS
        .iter()
        .map(|p| {
            format!("{p} {}/{}", store.read_model_table(&applied_table(p)).len(), expected.of(p))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
