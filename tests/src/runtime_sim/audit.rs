//! The audit projections of the simulation: each records every event it applies, in the same
//! transaction as its checkpoint, so what was committed tells whether an event took effect twice or
//! out of order.

use async_trait::async_trait;
use orchestrator_core::Event;
use orchestrator_core::ports::BoxError;
use orchestrator_memory::{MemoryStore, MemoryTx};
use orchestrator_runtime::Projection;

/// The projections every simulated worker runs: two, each checked on its own.
pub const PROJECTIONS: [&str; 2] = ["sim_audit", "sim_audit_batch"];

fn applied_table(projection: &str) -> String {
    format!("{projection}.applied")
}

fn versions_table(projection: &str) -> String {
    format!("{projection}.versions")
}

/// Records each event: `applied[position] += 1` and `versions[aggregate] = version`, checking the
/// aggregate's previous version (as this transaction sees it) is the one before.
pub(crate) struct Audit {
    name: &'static str,
    worker: String,
}

impl Audit {
    pub(crate) fn new(name: &'static str, worker: &str) -> Self {
        Self { name, worker: worker.to_owned() }
    }
}

#[async_trait]
impl Projection<MemoryTx> for Audit {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(&self, tx: &mut MemoryTx, event: &Event) -> Result<(), BoxError> {
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
        Ok(())
    }
}

/// What was committed: no event applied twice, no order violation; with `expected`, also every
/// one of the `expected` events applied (exactly once).
pub(crate) fn check_committed(store: &MemoryStore, expected: Option<u64>) -> Result<(), String> {
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
            && applied.len() as u64 != expected
        {
            return Err(format!("{projection}: {} of {expected} events applied", applied.len()));
        }
    }
    Ok(())
}

/// Whether both projections applied every one of `expected` events.
pub(crate) fn all_applied(store: &MemoryStore, expected: u64) -> bool {
    store.event_count() as u64 == expected
        && PROJECTIONS
            .iter()
            .all(|p| store.read_model_table(&applied_table(p)).len() as u64 == expected)
}

/// How far each projection got, for a failure message.
pub(crate) fn progress(store: &MemoryStore, expected: u64) -> String {
    PROJECTIONS
        .iter()
        .map(|p| format!("{p} {}/{expected}", store.read_model_table(&applied_table(p)).len()))
        .collect::<Vec<_>>()
        .join(", ")
}
