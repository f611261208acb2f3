//! The conformance suite against the in-memory adapter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_conformance::{Harness, SLOTS, conformance_tests};
use orchestrator_core::SlotCount;
use orchestrator_core::ports::DeadLetterId;
use orchestrator_memory::{ManualClock, MemoryStore, MemoryTx, MemoryUnitOfWork};

struct MemoryHarness {
    clock: Arc<ManualClock>,
    store: MemoryStore,
}

#[async_trait]
impl Harness for MemoryHarness {
    type Store = MemoryStore;

    async fn start() -> Option<Self> {
        let clock = Arc::new(ManualClock::default());
        let store = MemoryStore::new(SlotCount::new(u64::from(SLOTS)).unwrap(), clock.clone());
        Some(Self { clock, store })
    }

    fn store(&self) -> &MemoryStore {
        &self.store
    }

    async fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    async fn put_row(&self, tx: &mut MemoryTx, key: &str, value: &str) {
        tx.put("rows", key, value.as_bytes().to_vec());
    }

    async fn get_row(&self, key: &str) -> Option<String> {
        self.store.read_model_row("rows", key).map(|v| String::from_utf8(v).unwrap())
    }

    async fn put_row_in_unit(&self, unit: &mut MemoryUnitOfWork, key: &str, value: &str) {
        unit.tx().put("rows", key, value.as_bytes().to_vec());
    }

    async fn skipped_letters(&self) -> Option<Vec<DeadLetterId>> {
        Some(self.store.skipped_letters().into_iter().map(|(_, letter, _)| letter.id).collect())
    }
}

conformance_tests!(MemoryHarness);
