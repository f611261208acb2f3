//! Worker settings: the seed's names and defaults, read from code or the environment, validated
//! before anything starts.

use std::time::Duration;

pub use orchestrator_core::parse_duration;
/// How a failing handler is retried before its projection stops (`HANDLER_MAX_ATTEMPTS`; the
/// waits double from 100 ms up to 5 s).
pub use orchestrator_core::processing::{FailurePolicy, RetryPolicy};
use orchestrator_core::{
    InvalidName, ReplicaSetName, SlotCount, Strategy, TablePrefix, Timing, WorkerId, quote,
};
use thiserror::Error;

/// A setting was rejected; the message names the setting and the rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {setting}: {rule}")]
pub struct InvalidSetting {
    /// The setting, as the environment spells it (`STALE_WORKER_TIMEOUT`) or the builder does.
    pub setting: String,
    /// The rule it broke.
    pub rule: String,
}

impl InvalidSetting {
    fn new(setting: &str, rule: impl Into<String>) -> Self {
        Self { setting: setting.to_owned(), rule: rule.into() }
    }
}

/// Everything a worker needs to know besides its store and projections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The replica set to join (`REPLICA_SET`, default `main-projections`).
    pub replica_set: ReplicaSetName,
    /// This worker's id (`WORKER_ID`; default: host name and process id, or random).
    pub worker_id: WorkerId,
    /// Heartbeat, staleness, coordination and polling intervals.
    pub timing: Timing,
    /// Events per batch (`BATCH_SIZE`, default 100).
    pub batch_size: usize,
    /// Slot count of the replica set (`SLOTS`, default 256); must match the event store's.
    pub slots: SlotCount,
    /// Table-name prefix of the SQL stores (`TABLE_PREFIX`, default `orch_`).
    pub table_prefix: TablePrefix,
    /// Rebalancing strategy (`STRATEGY`, `recreate` or `incremental`).
    pub strategy: Strategy,
    /// Handler retries.
    pub retry: RetryPolicy,
    /// What a projection does with an event its handler failed on for good (`FAILURE_POLICY`,
    /// `stop` or `park`, default `stop`); a projection may say otherwise
    /// ([`Projection::failure_policy`](crate::Projection::failure_policy)).
    pub failure_policy: FailurePolicy,
    /// How long an idle worker waits before looking for new events again (`POLL_INTERVAL`, default
    /// 100 ms, the seed processor's; a store that can notify wakes it sooner).
    pub idle_poll: Duration,
    /// Disjoint groups of the owned slots processed at the same time (`PROCESSING_CONCURRENCY`,
    /// default 1): with I/O-bound handlers, up to this many batches of each projection are in
    /// flight at once. Per-key order holds at any setting (a key's slot is in one group).
    pub processing_concurrency: usize,
    /// How long a handler may take on one batch before the batch is abandoned (rolled back) and
    /// counts as a failed attempt (`HANDLER_TIMEOUT`). `None`: 30 s, or half of
    /// `coordination_timeout` when that is shorter than a minute ([`Settings::handler_timeout`]).
    /// A value given must be shorter than `coordination_timeout`.
    pub handler_timeout: Option<Duration>,
    /// Connections of the store's pool (`DATABASE_POOL_SIZE`). `None`: what the worker needs
    /// ([`Settings::pool_size_needed`]); a value given must be at least that.
    pub database_pool_size: Option<u32>,
    /// Memory for shared batches that slower projections have not taken yet, in bytes
    /// (`SHARED_READ_BUFFER_MB` in MiB, default 128 MiB, split between the slot groups):
    /// projections of different speeds keep sharing one read while the slower ones stay within
    /// it; a projection further behind reads on its own. It fills only when projections drift
    /// apart.
    pub shared_read_buffer: usize,
}

/// The handler timeout when none is given.
pub(crate) const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

impl Settings {
    /// Defaults for a replica set, with a generated worker id.
    pub fn new(replica_set: ReplicaSetName) -> Self {
        Self {
            replica_set,
            worker_id: default_worker_id(),
            timing: Timing::default(),
            batch_size: 100,
            slots: SlotCount::DEFAULT,
            table_prefix: TablePrefix::default(),
            strategy: Strategy::default(),
            retry: RetryPolicy::default(),
            failure_policy: FailurePolicy::Stop,
            idle_poll: Duration::from_millis(100),
            processing_concurrency: 1,
            handler_timeout: None,
            database_pool_size: None,
            shared_read_buffer: 128 << 20,
        }
    }

    /// The handler timeout in force: the one given, else 30 s, or half of `coordination_timeout`
    /// when that is shorter than a minute (so the default always passes validation).
    pub fn handler_timeout(&self) -> Duration {
        self.handler_timeout
            .unwrap_or_else(|| DEFAULT_HANDLER_TIMEOUT.min(self.timing.coordination_timeout / 2))
    }

    /// Connections a worker running `projections` projections needs so that no batch, read or
    /// heartbeat waits for another's connection: one transaction per projection and slot group
    /// (`PROCESSING_CONCURRENCY × projections`), one read per group, one for coordination
    /// (heartbeats, observations), and one for LISTEN when `listens` (PostgreSQL's change feed).
    pub fn pool_size_needed(&self, projections: usize, listens: bool) -> u32 {
        let groups = self.processing_concurrency.max(1);
        let needed = groups * projections + groups + 1 + usize::from(listens);
        u32::try_from(needed).unwrap_or(u32::MAX)
    }

    /// The pool size to build: `database_pool_size` if given, else what is needed.
    pub fn pool_size(&self, projections: usize, listens: bool) -> u32 {
        self.database_pool_size.unwrap_or_else(|| self.pool_size_needed(projections, listens))
    }

    /// Refuses a `database_pool_size` smaller than what `projections` projections need.
    pub fn check_pool_size(&self, projections: usize, listens: bool) -> Result<(), InvalidSetting> {
        let needed = self.pool_size_needed(projections, listens);
        match self.database_pool_size {
            Some(size) if size < needed => Err(InvalidSetting::new(
                "DATABASE_POOL_SIZE",
                format!(
                    "{size} connections cannot serve {} projection(s) at PROCESSING_CONCURRENCY={} \
                     (one transaction per projection and group, one read per group, one for \
                     coordination{}): at least {needed}",
                    projections,
                    self.processing_concurrency,
                    if listens { ", one for LISTEN" } else { "" }
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a handler timeout that is not shorter than the store's limit on a transaction left
    /// idle (PostgreSQL ends such sessions: 60 s as `PgStore::tune` sets it), past which the
    /// store would end the batch's transaction before the timeout does.
    pub fn check_transaction_limit(&self, limit: Duration) -> Result<(), InvalidSetting> {
        let timeout = self.handler_timeout();
        if timeout >= limit {
            return Err(InvalidSetting::new(
                "handler_timeout",
                format!(
                    "must be shorter than the store's idle-in-transaction limit ({limit:?}), got {timeout:?}"
                ),
            ));
        }
        Ok(())
    }

    /// Checks every setting and their relations.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.timing.validate().map_err(|e| InvalidSetting::new(e.setting, e.rule))?;
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(InvalidSetting::new(
                "batch_size",
                format!("must be between 1 and 100000, got {}", self.batch_size),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(InvalidSetting::new("handler_max_attempts", "must be at least 1"));
        }
        if self.idle_poll.is_zero() {
            return Err(InvalidSetting::new("poll_interval", "must be at least 1ms"));
        }
        let slots = self.slots.get() as usize;
        if self.processing_concurrency == 0 || self.processing_concurrency > slots {
            return Err(InvalidSetting::new(
                "processing_concurrency",
                format!(
                    "must be between 1 and the slot count ({slots}), got {}",
                    self.processing_concurrency
                ),
            ));
        }
        if let Some(timeout) = self.handler_timeout {
            let coordination = self.timing.coordination_timeout;
            if timeout.is_zero() || timeout >= coordination {
                return Err(InvalidSetting::new(
                    "handler_timeout",
                    format!(
                        "must be more than 0 and shorter than coordination_timeout ({coordination:?}), got {timeout:?}"
                    ),
                ));
            }
        }
        if self.shared_read_buffer == 0 {
            return Err(InvalidSetting::new("shared_read_buffer", "must be at least 1 byte"));
        }
        if self.database_pool_size == Some(0) {
            return Err(InvalidSetting::new("database_pool_size", "must be at least 1"));
        }
        Ok(())
    }

    /// Settings from environment variables (docs/configuration.md) over the defaults, validated.
    ///
    /// `REPLICA_SET`, `WORKER_ID`, `HEARTBEAT_INTERVAL`, `STALE_WORKER_TIMEOUT`,
    /// `COORDINATION_TIMEOUT`, `POLL_INTERVAL`, `REGISTRATION_WAIT`, `BATCH_SIZE`, `SLOTS`,
    /// `TABLE_PREFIX`, `STRATEGY`, `FAILURE_POLICY`, `HANDLER_MAX_ATTEMPTS`, `PROCESSING_CONCURRENCY`,
    /// `HANDLER_TIMEOUT`, `DATABASE_POOL_SIZE`, `SHARED_READ_BUFFER_MB`. Durations are written `5s`, `500ms`, `1m`.
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Like [`Settings::from_env`] with any source of variables (for tests and config files).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, InvalidSetting> {
        let name = lookup("REPLICA_SET").unwrap_or_else(|| "main-projections".to_owned());
        let mut settings =
            Self::new(ReplicaSetName::new(name).map_err(|e| named("REPLICA_SET", e))?);
        if let Some(id) = lookup("WORKER_ID") {
            settings.worker_id = WorkerId::new(id).map_err(|e| named("WORKER_ID", e))?;
        }
        let durations: [(&str, &mut Duration); 5] = [
            ("HEARTBEAT_INTERVAL", &mut settings.timing.heartbeat_interval),
            ("STALE_WORKER_TIMEOUT", &mut settings.timing.stale_worker_timeout),
            ("COORDINATION_TIMEOUT", &mut settings.timing.coordination_timeout),
            ("POLL_INTERVAL", &mut settings.idle_poll),
            ("REGISTRATION_WAIT", &mut settings.timing.registration_wait),
        ];
        for (key, slot) in durations {
            if let Some(text) = lookup(key) {
                *slot = parse_duration(&text)
                    .map_err(|rule| InvalidSetting::new(key, rule.to_string()))?;
            }
        }
        if let Some(text) = lookup("BATCH_SIZE") {
            settings.batch_size = parse_number("BATCH_SIZE", &text)? as usize;
        }
        if let Some(text) = lookup("SLOTS") {
            settings.slots = SlotCount::new(parse_number("SLOTS", &text)?)
                .map_err(|e| InvalidSetting::new("SLOTS", e.to_string()))?;
        }
        if let Some(text) = lookup("TABLE_PREFIX") {
            settings.table_prefix = TablePrefix::new(text).map_err(|e| named("TABLE_PREFIX", e))?;
        }
        if let Some(text) = lookup("STRATEGY") {
            settings.strategy =
                parse_strategy(&text).map_err(|rule| InvalidSetting::new("STRATEGY", rule))?;
        }
        if let Some(text) = lookup("FAILURE_POLICY") {
            settings.failure_policy = parse_failure_policy(&text)
                .map_err(|rule| InvalidSetting::new("FAILURE_POLICY", rule))?;
        }
        if let Some(text) = lookup("HANDLER_MAX_ATTEMPTS") {
            settings.retry.max_attempts = parse_number("HANDLER_MAX_ATTEMPTS", &text)? as u32;
        }
        if let Some(text) = lookup("PROCESSING_CONCURRENCY") {
            settings.processing_concurrency =
                parse_number("PROCESSING_CONCURRENCY", &text)?.min(u64::from(u32::MAX)) as usize;
        }
        if let Some(text) = lookup("HANDLER_TIMEOUT") {
            settings.handler_timeout = Some(
                parse_duration(&text)
                    .map_err(|rule| InvalidSetting::new("HANDLER_TIMEOUT", rule.to_string()))?,
            );
        }
        if let Some(text) = lookup("SHARED_READ_BUFFER_MB") {
            let mb = parse_number("SHARED_READ_BUFFER_MB", &text)?;
            if mb == 0 || mb > 1 << 20 {
                return Err(InvalidSetting::new(
                    "SHARED_READ_BUFFER_MB",
                    format!("must be between 1 and 1048576, got {mb}"),
                ));
            }
            settings.shared_read_buffer = (mb as usize) << 20;
        }
        if let Some(text) = lookup("DATABASE_POOL_SIZE") {
            settings.database_pool_size =
                Some(parse_number("DATABASE_POOL_SIZE", &text)?.min(u64::from(u32::MAX)) as u32);
        }
        settings.validate()?;
        Ok(settings)
    }
}

fn named(setting: &str, err: InvalidName) -> InvalidSetting {
    InvalidSetting::new(setting, format!("{} {}", quote(&err.value), err.rule))
}

fn parse_number(setting: &str, text: &str) -> Result<u64, InvalidSetting> {
    text.trim()
        .parse::<u64>()
        .map_err(|_| InvalidSetting::new(setting, format!("{} is not a whole number", quote(text))))
}

/// Parses `rebalancing strategy` names.
pub fn parse_strategy(text: &str) -> Result<Strategy, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "recreate" => Ok(Strategy::Recreate),
        "incremental" => Ok(Strategy::Incremental),
        other => Err(format!("{} is not a strategy: use recreate or incremental", quote(other))),
    }
}

/// A failure policy by name: `stop` or `park`.
pub fn parse_failure_policy(text: &str) -> Result<FailurePolicy, String> {
    let text = text.trim().to_ascii_lowercase();
    FailurePolicy::parse(&text)
        .ok_or_else(|| format!("{} is not a failure policy: use stop or park", quote(&text)))
}

/// `<host>-<pid>` from `HOSTNAME` (the pod name in Kubernetes), else `worker-<pid>-<nanos>`.
fn default_worker_id() -> WorkerId {
    let pid = std::process::id();
    let candidate = match std::env::var("HOSTNAME") {
        Ok(host) if !host.is_empty() => format!("{host}-{pid}"),
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            format!("worker-{pid}-{nanos}")
        }
    };
    WorkerId::new(candidate)
        .unwrap_or_else(|_| WorkerId::new(format!("worker-{pid}")).expect("a valid id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn durations_are_the_core_parser() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        let err = Settings::from_lookup(env(&[("HEARTBEAT_INTERVAL", "5 parsecs")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid HEARTBEAT_INTERVAL: unknown unit \"parsecs\" in \"5 parsecs\": use ms, s, m or h"
        );
    }

    #[test]
    fn long_values_are_quoted_briefly() {
        let long = "x".repeat(5000);
        for key in ["REPLICA_SET", "WORKER_ID", "BATCH_SIZE", "STRATEGY", "HEARTBEAT_INTERVAL"] {
            let err = Settings::from_lookup(env(&[(key, &long)])).unwrap_err().to_string();
            assert!(err.contains("… (5000 characters)"), "{key}: {err}");
            assert!(err.len() < 200, "{key}: {err}");
        }
    }

    #[test]
    fn environment_overrides_defaults() {
        let settings = Settings::from_lookup(env(&[
            ("REPLICA_SET", "analytics"),
            ("WORKER_ID", "pod-1"),
            ("HEARTBEAT_INTERVAL", "1s"),
            ("STALE_WORKER_TIMEOUT", "5s"),
            ("BATCH_SIZE", "1000"),
            ("STRATEGY", "incremental"),
        ]))
        .unwrap();
        assert_eq!(settings.replica_set.as_str(), "analytics");
        assert_eq!(settings.worker_id.as_str(), "pod-1");
        assert_eq!(settings.timing.stale_worker_timeout, Duration::from_secs(5));
        assert_eq!(settings.batch_size, 1000);
        assert_eq!(settings.strategy, Strategy::Incremental);
    }

    #[test]
    fn bad_values_name_the_setting_and_the_rule() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("REPLICA_SET", "main projections")], "invalid REPLICA_SET"),
            (
                &[("STALE_WORKER_TIMEOUT", "5s")],
                "invalid stale_worker_timeout: must be at least twice heartbeat_interval",
            ),
            (&[("BATCH_SIZE", "0")], "invalid batch_size: must be between 1 and 100000"),
            (&[("BATCH_SIZE", "many")], "invalid BATCH_SIZE: \"many\" is not a whole number"),
            (&[("SLOTS", "100")], "invalid SLOTS: invalid slot count 100: must be a power of two"),
            (&[("HEARTBEAT_INTERVAL", "-1s")], "invalid HEARTBEAT_INTERVAL"),
            (&[("TABLE_PREFIX", "x; drop")], "invalid TABLE_PREFIX"),
            (&[("STRATEGY", "yolo")], "invalid STRATEGY"),
            (
                &[("FAILURE_POLICY", "retry")],
                "invalid FAILURE_POLICY: \"retry\" is not a failure policy",
            ),
            (
                &[("PROCESSING_CONCURRENCY", "0")],
                "invalid processing_concurrency: must be between 1 and the slot count (256), got 0",
            ),
            (&[("PROCESSING_CONCURRENCY", "257")], "invalid processing_concurrency"),
            (&[("PROCESSING_CONCURRENCY", "eight")], "invalid PROCESSING_CONCURRENCY"),
            (
                &[("HANDLER_TIMEOUT", "60s")],
                "invalid handler_timeout: must be more than 0 and shorter than coordination_timeout (60s), got 60s",
            ),
            (
                &[("HANDLER_TIMEOUT", "15s"), ("COORDINATION_TIMEOUT", "10s")],
                "invalid handler_timeout",
            ),
            (&[("HANDLER_TIMEOUT", "0s")], "invalid HANDLER_TIMEOUT"),
            (&[("HANDLER_TIMEOUT", "soon")], "invalid HANDLER_TIMEOUT"),
            (&[("DATABASE_POOL_SIZE", "0")], "invalid database_pool_size: must be at least 1"),
            (&[("SHARED_READ_BUFFER_MB", "0")], "invalid SHARED_READ_BUFFER_MB: must be between 1"),
        ];
        for (vars, expected) in cases {
            let err = Settings::from_lookup(env(vars)).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{vars:?}: {err}");
        }
    }

    #[test]
    fn processing_settings_from_the_environment() {
        let settings = Settings::from_lookup(env(&[
            ("PROCESSING_CONCURRENCY", "8"),
            ("HANDLER_TIMEOUT", "10s"),
            ("DATABASE_POOL_SIZE", "40"),
        ]))
        .unwrap();
        assert_eq!(settings.processing_concurrency, 8);
        assert_eq!(settings.handler_timeout(), Duration::from_secs(10));
        assert_eq!(settings.database_pool_size, Some(40));
        let defaults = Settings::from_lookup(env(&[])).unwrap();
        assert_eq!(defaults.processing_concurrency, 1);
        assert_eq!(defaults.handler_timeout(), Duration::from_secs(30));
        let short = Settings::from_lookup(env(&[("COORDINATION_TIMEOUT", "10s")])).unwrap();
        assert_eq!(
            short.handler_timeout(),
            Duration::from_secs(5),
            "half a short coordination timeout"
        );
    }

    #[test]
    fn the_pool_must_serve_every_group_and_projection() {
        let mut settings = Settings::from_lookup(env(&[("PROCESSING_CONCURRENCY", "4")])).unwrap();
        // 4 groups x 2 projections, 4 reads, coordination, LISTEN.
        assert_eq!(settings.pool_size_needed(2, true), 14);
        assert_eq!(settings.pool_size(2, false), 13);
        assert_eq!(settings.check_pool_size(2, true), Ok(()));
        settings.database_pool_size = Some(10);
        let err = settings.check_pool_size(2, true).unwrap_err().to_string();
        assert!(err.starts_with("invalid DATABASE_POOL_SIZE: 10 connections cannot serve 2 projection(s) at PROCESSING_CONCURRENCY=4"), "{err}");
        assert!(err.ends_with("at least 14"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn the_handler_timeout_must_end_before_the_store_ends_the_transaction() {
        let mut settings = Settings::from_lookup(env(&[("COORDINATION_TIMEOUT", "2m")])).unwrap();
        assert_eq!(settings.check_transaction_limit(Duration::from_secs(60)), Ok(()));
        settings.handler_timeout = Some(Duration::from_secs(90));
        assert_eq!(settings.validate(), Ok(()));
        let err = settings.check_transaction_limit(Duration::from_secs(60)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid handler_timeout: must be shorter than the store's idle-in-transaction limit (60s), got 90s"
        );
    }
}
