//! The runtime's clock: wall time at start-up, advanced by a monotonic clock.
//!
//! The monotonic part is tokio's: under a paused tokio clock (tests, the simulation) it follows
//! simulated time, so a whole cluster can run deterministically.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use orchestrator_core::{Clock, Timestamp};

/// A [`Clock`] that never goes backwards, even when the system clock is adjusted.
#[derive(Debug)]
pub struct SystemClock {
    started: Instant,
    started_at: Timestamp,
}

impl SystemClock {
    /// Anchors the clock at the current wall time.
    pub fn new() -> Self {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { started: Instant::now(), started_at: Timestamp(since_epoch.as_millis() as u64) }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        self.started_at + self.started.elapsed()
    }
}
