//! A clock that moves only when told to, for tests and simulation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrator_core::{Clock, Timestamp};

/// A [`Clock`] that stands still until advanced.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        Self { millis: AtomicU64::new(start.as_millis()) }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.millis.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    /// A clock reading 2026-01-01T00:00:00Z, so timestamps look like real ones.
    fn default() -> Self {
        Self::new(Timestamp(1_767_225_600_000))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.millis.load(Ordering::SeqCst))
    }
}
