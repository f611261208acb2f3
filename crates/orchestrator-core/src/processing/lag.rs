//! Lag at a bounded cost: an exact count up to a limit, an estimate beyond it.
//!
//! A worker counts each projection's backlog (the port's `backlog`) only up to
//! [`LAG_COUNT_LIMIT`] events, so measuring costs at most that many index entries whatever the
//! backlog. Below the limit the count is the lag. At the limit the lag is estimated per group:
//! the events per global position the lane has been seeing in its recent batches (its
//! [`Density`]) times the distance from its cursor to the store's last position. The estimate is
//! never below the count.
//!
//! How far off it can be: the density is measured on the events the lane has just read, so the
//! estimate is right when the backlog ahead has the same mix (share of the group's slots, share
//! of the projection's scope) as what was just read. With hashed keys and a steady mix of event
//! types that is sampling noise: about `1/sqrt(n)` for the `n` events (at least a few thousand)
//! the density was measured on, a few percent. Positions the sequence skipped (appends rolled
//! back) count as events, so it over-estimates by their share. A backlog whose mix differs from
//! what was just read (a burst of one event type a scoped projection ignores) is estimated with
//! the error of that difference; the count below the limit is always exact.

/// The count limit: below it the lag is exact, at it the estimate takes over.
pub const LAG_COUNT_LIMIT: u64 = 1_000;

/// Events a lane was given per global position, over its recent batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Density {
    events: u64,
    span: u64,
}

/// Beyond this many events recorded the history is halved, so the density follows the recent
/// batches (the last 64,000 events or so) rather than everything since the start.
const HISTORY: u64 = 64_000;

impl Density {
    /// Records a batch: `events` of this lane's scope among positions spanning `span` global
    /// positions (`max - min + 1` of the batch read).
    pub fn record(&mut self, events: u64, span: u64) {
        if span < 2 {
            return; // one event says nothing about spacing
        }
        self.events += events;
        self.span += span;
        if self.events > HISTORY || self.span > HISTORY.saturating_mul(1 << 16) {
            self.events /= 2;
            self.span /= 2;
        }
    }

    /// Events per global position; `fallback` until something was recorded.
    pub fn per_position(&self, fallback: f64) -> f64 {
        if self.span == 0 { fallback } else { self.events as f64 / self.span as f64 }
    }
}

/// One group's share of a projection's lag estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagPart {
    /// The smallest global position among the lane's cursors.
    pub after_global: u64,
    /// Its events per global position.
    pub density: f64,
}

/// A projection's lag as measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagEstimate {
    /// Events behind.
    pub events: u64,
    /// Whether `events` is an exact count (below the limit) rather than an estimate.
    pub exact: bool,
}

/// The lag from a count stopped at `limit`, the store's last global position (`head`, where the
/// store knows it) and the per-group parts.
pub fn estimate_lag(counted: u64, limit: u64, head: Option<u64>, parts: &[LagPart]) -> LagEstimate {
    if counted < limit {
        return LagEstimate { events: counted, exact: true };
    }
    let Some(head) = head else { return LagEstimate { events: counted, exact: false } };
    let estimated: f64 =
        parts.iter().map(|part| part.density * head.saturating_sub(part.after_global) as f64).sum();
    LagEstimate { events: (estimated.round() as u64).max(counted), exact: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_limit_the_count_is_the_lag() {
        let parts = [LagPart { after_global: 0, density: 1.0 }];
        assert_eq!(
            estimate_lag(999, 1000, Some(50_000), &parts),
            LagEstimate { events: 999, exact: true }
        );
    }

    #[test]
    fn at_the_limit_density_times_distance_never_below_the_count() {
        let parts = [
            LagPart { after_global: 10_000, density: 0.25 },
            LagPart { after_global: 30_000, density: 0.25 },
        ];
        let lag = estimate_lag(1000, 1000, Some(50_000), &parts);
        assert_eq!(lag, LagEstimate { events: 10_000 + 5_000, exact: false });
        let close = estimate_lag(1000, 1000, Some(30_100), &parts);
        assert_eq!(close.events, 5_025 + 25);
        assert_eq!(estimate_lag(1000, 1000, Some(10), &parts).events, 1000);
        assert_eq!(
            estimate_lag(1000, 1000, None, &parts),
            LagEstimate { events: 1000, exact: false }
        );
    }

    #[test]
    fn density_follows_recent_batches() {
        let mut density = Density::default();
        assert_eq!(density.per_position(0.5), 0.5);
        density.record(250, 1000);
        assert!((density.per_position(0.5) - 0.25).abs() < 1e-9);
        for _ in 0..1000 {
            density.record(1000, 1000);
        }
        assert!(density.per_position(0.5) > 0.99);
        density.record(5, 1);
        assert!(density.per_position(0.5) <= 1.0);
    }
}
