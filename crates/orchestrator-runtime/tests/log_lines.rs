//! The seed guide's log lines, as an operator greps for them.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_core::{ReplicaSetName, SlotCount, Timing, WorkerId};
use orchestrator_memory::MemoryStore;
use orchestrator_runtime::{Orchestrator, Settings, SystemClock};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_worker_logs_the_seed_messages() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .finish();
    // Thread-local default: every task of this single-threaded runtime logs into `captured`.
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = MemoryStore::new(SlotCount::new(16).unwrap(), Arc::new(SystemClock::new()));
    let mut settings = Settings::new(ReplicaSetName::new("main-projections").unwrap());
    settings.worker_id = WorkerId::new("abc-123").unwrap();
    settings.slots = SlotCount::new(16).unwrap();
    settings.timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        stale_worker_timeout: Duration::from_millis(500),
        coordination_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        registration_wait: Duration::from_millis(50),
    };
    let worker = Orchestrator::new(store, settings).unwrap();
    let stop = tokio::time::sleep(Duration::from_millis(800));
    worker.run(stop, Vec::new()).await.unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for line in [
        "Generation created: generation=1 total_partitions=1",
        "Coordination started: generation=1",
        "All workers coordinated: generation=1 duration=",
        "Worker registered: worker_id=abc-123 partition=0/1",
        "Worker processing: generation=1 partition=0/1",
        "Worker deregistered worker_id=abc-123",
    ] {
        assert!(logs.contains(line), "missing {line:?} in:\n{logs}");
    }
}
