//! The timing settings of coordination and the rules that make them consistent.

use std::time::Duration;

use thiserror::Error;

/// A timing setting was rejected; the message names the setting and the rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {setting}: {rule}")]
pub struct InvalidTiming {
    /// The setting, as the user spells it (`stale_worker_timeout`).
    pub setting: &'static str,
    /// The rule it broke, with the values involved.
    pub rule: String,
}

/// How often workers talk to the coordination store and how long they wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often a worker refreshes its heartbeat (default 5 s).
    pub heartbeat_interval: Duration,
    /// A worker whose last heartbeat is older than this is stale (default 30 s).
    /// It is also the leader lease: a dead leader is replaced once its lease runs out.
    pub stale_worker_timeout: Duration,
    /// Bound on every coordination wait (default 60 s); on expiry the worker logs and carries on.
    pub coordination_timeout: Duration,
    /// How often a worker re-reads the coordination state when nothing wakes it (default 1 s).
    pub poll_interval: Duration,
    /// Joins that arrive within this window of each other are batched into one generation
    /// (default 1 s; the seed's 5 s would spend most of the 2 s join budget waiting).
    pub registration_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            stale_worker_timeout: Duration::from_secs(30),
            coordination_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            registration_wait: Duration::from_secs(1),
        }
    }
}

impl Timing {
    /// The wait before retrying a failed coordination call for the `attempt`-th time (1, 2, ...):
    /// 200 ms doubling, never longer than a heartbeat interval, so a worker whose database comes
    /// back rejoins within one interval.
    pub fn retry_backoff(&self, attempt: u32) -> Duration {
        Duration::from_millis(200)
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.heartbeat_interval)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), InvalidTiming> {
        let positive = [
            ("heartbeat_interval", self.heartbeat_interval),
            ("stale_worker_timeout", self.stale_worker_timeout),
            ("coordination_timeout", self.coordination_timeout),
            ("poll_interval", self.poll_interval),
        ];
        for (setting, value) in positive {
            if value < Duration::from_millis(1) {
                return Err(InvalidTiming {
                    setting,
                    rule: format!("must be at least 1ms, got {value:?}"),
                });
            }
        }
        if self.stale_worker_timeout < 2 * self.heartbeat_interval {
            return Err(InvalidTiming {
                setting: "stale_worker_timeout",
                rule: format!(
                    "must be at least twice heartbeat_interval ({:?}), got {:?}, \
                     or one late heartbeat would evict a healthy worker",
                    self.heartbeat_interval, self.stale_worker_timeout
                ),
            });
        }
        if self.coordination_timeout <= self.heartbeat_interval {
            return Err(InvalidTiming {
                setting: "coordination_timeout",
                rule: format!(
                    "must be greater than heartbeat_interval ({:?}), got {:?}",
                    self.heartbeat_interval, self.coordination_timeout
                ),
            });
        }
        if self.registration_wait >= self.coordination_timeout {
            return Err(InvalidTiming {
                setting: "registration_wait",
                rule: format!(
                    "must be less than coordination_timeout ({:?}), got {:?}",
                    self.coordination_timeout, self.registration_wait
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Timing::default().validate().unwrap();
    }

    #[test]
    fn rejects_inconsistent_settings() {
        let stale_too_short =
            Timing { stale_worker_timeout: Duration::from_secs(5), ..Timing::default() };
        assert_eq!(stale_too_short.validate().unwrap_err().setting, "stale_worker_timeout");

        let zero_heartbeat = Timing { heartbeat_interval: Duration::ZERO, ..Timing::default() };
        let err = zero_heartbeat.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid heartbeat_interval: must be at least 1ms, got 0ns");

        let long_wait = Timing { registration_wait: Duration::from_secs(60), ..Timing::default() };
        assert_eq!(long_wait.validate().unwrap_err().setting, "registration_wait");
    }
}
