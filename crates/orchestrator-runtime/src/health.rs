//! Liveness and readiness of the workers of one process, for `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The health of every worker that reports to one [`crate::Telemetry`].
#[derive(Debug, Default)]
pub(crate) struct HealthBoard {
    workers: Mutex<Vec<Arc<WorkerHealth>>>,
}

/// One worker's flags, written by its coordination loop.
#[derive(Debug)]
pub(crate) struct WorkerHealth {
    replica_set: String,
    /// The worker's loop is running (false once `run` has returned).
    alive: AtomicBool,
    /// Registered, heartbeats acknowledged, not leaving.
    ready: AtomicBool,
}

/// Readiness or liveness, with the reason when it is not.
pub(crate) type Verdict = Result<(), String>;

impl HealthBoard {
    pub(crate) fn add(&self, replica_set: &str) -> Arc<WorkerHealth> {
        let health = Arc::new(WorkerHealth {
            replica_set: replica_set.to_owned(),
            alive: AtomicBool::new(true),
            ready: AtomicBool::new(false),
        });
        self.lock().push(health.clone());
        health
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<WorkerHealth>>> {
        self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Live while no worker of the process has stopped.
    pub(crate) fn live(&self) -> Verdict {
        match self.lock().iter().find(|w| !w.alive.load(Ordering::Relaxed)) {
            Some(stopped) => Err(format!("worker of {} has stopped", stopped.replica_set)),
            None => Ok(()),
        }
    }

    /// Ready when there is at least one worker and every one is registered and in contact.
    pub(crate) fn ready(&self) -> Verdict {
        let workers = self.lock();
        if workers.is_empty() {
            return Err("no worker started".to_owned());
        }
        match workers.iter().find(|w| !w.ready.load(Ordering::Relaxed)) {
            Some(not_ready) => Err(format!(
                "worker of {} is not registered or has lost contact with the database",
                not_ready.replica_set
            )),
            None => Ok(()),
        }
    }
}

impl WorkerHealth {
    /// Flags no server reads (a worker without [`crate::Telemetry`]).
    pub(crate) fn detached(replica_set: &str) -> Arc<Self> {
        HealthBoard::default().add(replica_set)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(crate) fn stopped(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.alive.store(false, Ordering::Relaxed);
    }
}
