//! What follows a failed step of a lane: retry after a backoff, drop a slot that is someone
//! else's, or give up on the event and apply the projection's failure policy.

use std::time::Duration;

use crate::slot::Slot;

/// The longest wait between attempts at a store that keeps failing.
pub const MAX_STORE_BACKOFF: Duration = Duration::from_secs(1);

/// How a failing handler is retried before its projection stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled each time (default 100 ms).
    pub initial_backoff: Duration,
    /// Upper bound of the wait (default 5 s).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// The wait after the `failures`-th store error in a row (connection lost, server
    /// restarting, database gone): the initial backoff (at least 100 ms), doubled with each
    /// failure, at most [`MAX_STORE_BACKOFF`]. A database that is down is not hammered, nor its
    /// log flooded, and one that is back is used again within a second.
    pub fn store_backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1));
        self.initial_backoff
            .max(Duration::from_millis(100))
            .saturating_mul(factor)
            .min(MAX_STORE_BACKOFF.max(self.initial_backoff))
    }
}

/// What a projection does with an event its handler failed on for good (a permanent error, or
/// the attempts ran out): `FAILURE_POLICY`, per projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The projection stops on every worker of the replica set, recorded in the store, until
    /// `orchestrator projection resume`; the workers and their other projections go on.
    #[default]
    Stop,
    /// The event and every later event of its partition key are parked as dead letters; the rest
    /// goes on.
    Park,
}

impl FailurePolicy {
    /// How settings spell it (`stop`, `park`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Stop => "stop",
            FailurePolicy::Park => "park",
        }
    }

    /// The policy named `text` (`stop`, `park`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "stop" => Some(FailurePolicy::Stop),
            "park" => Some(FailurePolicy::Park),
            _ => None,
        }
    }
}

/// What went wrong with one step of a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The handler returned an error, panicked, or did not return within the handler timeout
    /// (`timed_out`); its transaction was rolled back.
    Handler {
        /// Whether it was the timeout.
        timed_out: bool,
        /// The handler said retrying will not help.
        permanent: bool,
    },
    /// A store call failed (read, begin, commit, load): nothing definite is known about it.
    Store,
    /// The commit was refused: the slot is owned by someone else now.
    Fenced {
        /// The slot named by the refusal.
        slot: Slot,
    },
    /// The commit was refused: the slot's stored checkpoint is ahead of this lane.
    Regression {
        /// The slot named by the refusal.
        slot: Slot,
    },
}

/// The decision [`after_failure`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Wait `after`, then take the lane's cursors from the stored checkpoints and go on from
    /// there. `attempts` is the handler attempts failed so far (store errors do not count).
    Retry {
        /// The backoff.
        after: Duration,
        /// Failed handler attempts in a row, this one included.
        attempts: u32,
    },
    /// The slot is not this worker's to process: drop it from every lane of its group, report
    /// it lost once nothing covers it, and reload this lane's cursors at once.
    DropSlot {
        /// The slot.
        slot: Slot,
    },
    /// The error is permanent or the attempts ran out: the projection's failure policy applies.
    GiveUp {
        /// Attempts made.
        attempts: u32,
    },
}

/// Decides what follows `failure`, after `attempts` failed handler attempts in a row before it
/// and with `store_failures` store errors in a row so far (this one included, if it is one).
pub fn after_failure(
    failure: Failure,
    attempts: u32,
    store_failures: u32,
    policy: &RetryPolicy,
) -> AfterFailure {
    match failure {
        Failure::Handler { permanent, .. } => {
            let attempts = attempts.saturating_add(1);
            if permanent || attempts >= policy.max_attempts {
                AfterFailure::GiveUp { attempts }
            } else {
                AfterFailure::Retry { after: policy.backoff(attempts), attempts }
            }
        }
        Failure::Store => {
            AfterFailure::Retry { after: policy.store_backoff(store_failures), attempts }
        }
        Failure::Fenced { slot } | Failure::Regression { slot } => AfterFailure::DropSlot { slot },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_failures_back_off_then_stop_the_projection() {
        let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        let handler = Failure::Handler { timed_out: false, permanent: false };
        assert_eq!(
            after_failure(handler, 0, 0, &policy),
            AfterFailure::Retry { after: Duration::from_millis(100), attempts: 1 }
        );
        assert_eq!(
            after_failure(Failure::Handler { timed_out: true, permanent: false }, 1, 0, &policy),
            AfterFailure::Retry { after: Duration::from_millis(200), attempts: 2 }
        );
        assert_eq!(after_failure(handler, 2, 0, &policy), AfterFailure::GiveUp { attempts: 3 });
    }

    #[test]
    fn a_permanent_error_gives_up_at_once() {
        let permanent = Failure::Handler { timed_out: false, permanent: true };
        assert_eq!(
            after_failure(permanent, 0, 0, &RetryPolicy::default()),
            AfterFailure::GiveUp { attempts: 1 }
        );
    }

    #[test]
    fn policies_parse_by_name() {
        for policy in [FailurePolicy::Stop, FailurePolicy::Park] {
            assert_eq!(FailurePolicy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(FailurePolicy::parse("retry"), None);
        assert_eq!(FailurePolicy::default(), FailurePolicy::Stop);
    }

    #[test]
    fn store_errors_are_retried_forever_and_do_not_count() {
        let policy =
            RetryPolicy { max_attempts: 1, initial_backoff: Duration::ZERO, ..Default::default() };
        assert_eq!(
            after_failure(Failure::Store, 7, 1, &policy),
            AfterFailure::Retry { after: Duration::from_millis(100), attempts: 7 }
        );
        assert_eq!(
            after_failure(Failure::Store, 7, 3, &policy),
            AfterFailure::Retry { after: Duration::from_millis(400), attempts: 7 }
        );
    }

    #[test]
    fn store_backoff_doubles_up_to_a_second() {
        let policy = RetryPolicy::default();
        let waits: Vec<u128> = (1..=6).map(|n| policy.store_backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.store_backoff(u32::MAX), MAX_STORE_BACKOFF);
    }

    #[test]
    fn refused_commits_drop_the_slot() {
        let policy = RetryPolicy::default();
        assert_eq!(
            after_failure(Failure::Fenced { slot: Slot(3) }, 0, 0, &policy),
            AfterFailure::DropSlot { slot: Slot(3) }
        );
        assert_eq!(
            after_failure(Failure::Regression { slot: Slot(4) }, 2, 0, &policy),
            AfterFailure::DropSlot { slot: Slot(4) }
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(4), Duration::from_millis(800));
        assert_eq!(policy.backoff(40), Duration::from_secs(5));
    }
}
