//! The seeded fault schedule: which fault when, against which worker. The same seed always
//! gives the same schedule.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::options::Store;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Fault {
    Join,
    Term,
    Kill,
    Pause,
    /// PostgreSQL: every connection to the run's database terminated.
    DropConnections,
    /// PostgreSQL: the server restarted (`pg_ctlcluster ... restart`).
    RestartServer,
}

impl Fault {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Fault::Join => "join",
            Fault::Term => "SIGTERM",
            Fault::Kill => "kill -9",
            Fault::Pause => "SIGSTOP/SIGCONT",
            Fault::DropConnections => "connections terminated",
            Fault::RestartServer => "PostgreSQL restarts",
        }
    }
}

/// One fault of the schedule. Every entry draws the same random numbers whatever its kind, so a
/// seed always gives the same schedule.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub(crate) at: Duration,
    pub(crate) fault: Fault,
    /// Picks the target among the running workers (by age).
    pub(crate) pick: u64,
    /// How long a SIGSTOP lasts.
    pub(crate) pause: Duration,
    /// Whether a kill -9 is followed by a replacement.
    pub(crate) replace: bool,
}

/// A duration drawn uniformly from `low..=high`, to the millisecond.
fn between(rng: &mut SmallRng, low: Duration, high: Duration) -> Duration {
    Duration::from_millis(rng.random_range(low.as_millis() as u64..=high.as_millis() as u64))
}

pub(crate) fn schedule(seed: u64, store: Store, duration: Duration) -> Vec<Planned> {
    // Kinds are dealt from a shuffled deck, so every kind comes up in every few faults.
    let deck: &[Fault] = match store {
        Store::Postgres => &[
            Fault::Join,
            Fault::Term,
            Fault::Kill,
            Fault::Kill,
            Fault::Pause,
            Fault::DropConnections,
            Fault::RestartServer,
        ],
        Store::Sqlite => &[Fault::Join, Fault::Term, Fault::Kill, Fault::Kill, Fault::Pause],
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut planned = Vec::new();
    let mut hand: Vec<Fault> = Vec::new();
    let mut at = between(&mut rng, Duration::from_secs(2), Duration::from_secs(4));
    let last = duration.saturating_sub(Duration::from_secs(1));
    while at < last {
        if hand.is_empty() {
            hand = deck.to_vec();
            hand.shuffle(&mut rng);
        }
        let fault = hand.pop().unwrap_or(Fault::Join);
        let pick = rng.random();
        // Eviction takes about 3.7 s (3 s stale timeout, heartbeats every 500 ms). A stopped
        // process that holds SQLite's write lock blocks every writer, which give up after the
        // 5 s busy timeout: SQLite pauses stay under that.
        let pause = match store {
            Store::Sqlite => {
                between(&mut rng, Duration::from_millis(4300), Duration::from_millis(4800))
            }
            Store::Postgres => {
                between(&mut rng, Duration::from_millis(4500), Duration::from_millis(6500))
            }
        };
        let replace = rng.random_bool(0.75);
        planned.push(Planned { at, fault, pick, pause, replace });
        at += between(&mut rng, Duration::from_millis(1500), Duration::from_millis(5000));
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(plan: &[Planned]) -> Vec<(Duration, Fault, u64, Duration, bool)> {
        plan.iter().map(|p| (p.at, p.fault, p.pick, p.pause, p.replace)).collect()
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = schedule(7, Store::Postgres, Duration::from_secs(60));
        assert!(!a.is_empty());
        assert_eq!(key(&a), key(&schedule(7, Store::Postgres, Duration::from_secs(60))));
        assert_ne!(key(&a), key(&schedule(8, Store::Postgres, Duration::from_secs(60))));
        assert!(a.windows(2).all(|w| w[0].at < w[1].at));
        assert!(a.iter().all(|p| p.at < Duration::from_secs(59)));
    }

    #[test]
    fn every_kind_comes_up_and_sqlite_gets_no_server_faults() {
        let postgres = schedule(1, Store::Postgres, Duration::from_secs(30));
        for kind in [Fault::Join, Fault::Term, Fault::Kill, Fault::Pause, Fault::RestartServer] {
            assert!(postgres.iter().any(|p| p.fault == kind), "{kind:?} in {postgres:?}");
        }
        let sqlite = schedule(1, Store::Sqlite, Duration::from_secs(60));
        assert!(
            sqlite
                .iter()
                .all(|p| !matches!(p.fault, Fault::DropConnections | Fault::RestartServer))
        );
        assert!(sqlite.iter().all(|p| p.pause < Duration::from_secs(5)));
    }
}
