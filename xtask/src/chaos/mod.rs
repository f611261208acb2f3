//! `cargo xtask chaos`: the multi-process chaos run of SPEC §6.
//!
//! Real `orchestrator demo worker` processes on PostgreSQL or SQLite, concurrent `demo append`
//! processes, and a seeded schedule of faults: workers joining, leaving by SIGTERM, dying by
//! kill -9, frozen by SIGSTOP for longer than the stale timeout and then resumed as zombies, and
//! (PostgreSQL) their database connections terminated. Afterwards the cluster must converge (no
//! lag, every slot owned, the live workers are the members) and `demo verify` must pass: every
//! event took effect exactly once per projection, in per-aggregate order. Anything else exits
//! non-zero; the logs stay in `target/chaos-<store>/`.
//!
//! The same seed gives the same schedule (fault kinds, targets, timings); the default seed comes
//! from the clock and is printed so a run can be replayed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::json::{Json, JsonParser};
use crate::procs::{Procs, build_orchestrator, signal};

const USAGE: &str = "usage: cargo xtask chaos --store postgres|sqlite [--workers N] [--events E] \
                     [--duration D] [--seed S] [--strategy recreate|incremental]";

/// Worker timings: short, so that crashes and pauses are noticed within seconds.
const WORKER_TIMINGS: [&str; 8] = [
    "--heartbeat-interval",
    "500ms",
    "--stale-worker-timeout",
    "3s",
    "--registration-wait",
    "300ms",
    "--coordination-timeout",
    "10s",
];
/// Most workers alive at once (running or stopped).
const MAX_WORKERS: usize = 6;
/// `demo append` processes, started at different moments.
const APPENDERS: u64 = 4;
const AGGREGATES: &str = "50";
/// The PostgreSQL server when `ORCH_CHAOS_POSTGRES_URL` is not set (a URL without a database).
const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
/// How long the cluster has, once appends are over, to process everything and pass the check.
const CONVERGE_WITHIN: Duration = Duration::from_secs(90);
/// How long a worker has to leave after SIGTERM.
const LEAVE_WITHIN: Duration = Duration::from_secs(30);
/// The demo projections (`demo verify` checks both).
const PROJECTIONS: [&str; 2] = ["demo_audit", "demo_audit_batch"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Sqlite,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::Sqlite => "sqlite",
        }
    }
}

struct Options {
    store: Store,
    workers: usize,
    events: u64,
    duration: Duration,
    seed: u64,
    seed_from_clock: bool,
    strategy: String,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut store = None;
    let mut workers = 3;
    let mut events = 20_000;
    let mut duration = Duration::from_secs(60);
    let mut seed = None;
    let mut strategy = "incremental".to_owned();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--store" => {
                store = Some(match value.as_str() {
                    "postgres" | "postgresql" => Store::Postgres,
                    "sqlite" => Store::Sqlite,
                    other => bail!("--store {other:?}: use postgres or sqlite"),
                })
            }
            "--workers" => workers = value.parse().context("--workers takes a number")?,
            "--events" => events = value.parse().context("--events takes a number")?,
            "--duration" => duration = parse_duration(value)?,
            "--seed" => seed = Some(value.parse().context("--seed takes a number")?),
            "--strategy" => match value.as_str() {
                "recreate" | "incremental" => strategy = value.clone(),
                other => bail!("--strategy {other:?}: use recreate or incremental"),
            },
            other => bail!("unknown flag {other}; {USAGE}"),
        }
    }
    let Some(store) = store else { bail!("--store is required; {USAGE}") };
    if !(1..=MAX_WORKERS).contains(&workers) {
        bail!("--workers must be between 1 and {MAX_WORKERS}");
    }
    if events < APPENDERS {
        bail!("--events must be at least {APPENDERS}");
    }
    if duration < Duration::from_secs(10) {
        bail!("--duration must be at least 10s");
    }
    let seed_from_clock = seed.is_none();
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64) % 1_000_000
    });
    Ok(Options { store, workers, events, duration, seed, seed_from_clock, strategy })
}

/// `500ms`, `45s`, `2m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || format!("--duration {text:?}: write it like 60s, 2m, 500ms or 60");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number.parse().with_context(bad)?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        _ => bail!(bad()),
    }
}

/// SplitMix64: small, seedable, good enough for a fault schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.below(span + 1))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fault {
    Join,
    Term,
    Kill,
    Pause,
    DropConnections,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Join => "join",
            Fault::Term => "SIGTERM",
            Fault::Kill => "kill -9",
            Fault::Pause => "SIGSTOP/SIGCONT",
            Fault::DropConnections => "connections terminated",
        }
    }
}

/// One fault of the schedule. Every entry draws the same random numbers whatever its kind, so a
/// seed always gives the same schedule.
struct Planned {
    at: Duration,
    fault: Fault,
    /// Picks the target among the running workers (by age).
    pick: u64,
    /// How long a SIGSTOP lasts.
    pause: Duration,
    /// Whether a kill -9 is followed by a replacement.
    replace: bool,
}

fn schedule(seed: u64, store: Store, duration: Duration) -> Vec<Planned> {
    // Kinds are dealt from a shuffled deck, so every kind comes up in every few faults.
    let deck: &[Fault] = match store {
        Store::Postgres => &[
            Fault::Join,
            Fault::Term,
            Fault::Kill,
            Fault::Kill,
            Fault::Pause,
            Fault::DropConnections,
        ],
        Store::Sqlite => &[Fault::Join, Fault::Term, Fault::Kill, Fault::Kill, Fault::Pause],
    };
    let mut rng = Rng(seed);
    let mut planned = Vec::new();
    let mut hand: Vec<Fault> = Vec::new();
    let mut at = rng.between(Duration::from_secs(2), Duration::from_secs(4));
    let last = duration.saturating_sub(Duration::from_secs(1));
    while at < last {
        if hand.is_empty() {
            hand = deck.to_vec();
            for i in (1..hand.len()).rev() {
                hand.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let fault = hand.pop().unwrap_or(Fault::Join);
        let pick = rng.next();
        // Eviction takes about 3.7 s (3 s stale timeout, heartbeats every 500 ms). A stopped
        // process that holds SQLite's write lock blocks every writer, which give up after the
        // 5 s busy timeout: SQLite pauses stay under that.
        let pause = match store {
            Store::Sqlite => rng.between(Duration::from_millis(4300), Duration::from_millis(4800)),
            Store::Postgres => {
                rng.between(Duration::from_millis(4500), Duration::from_millis(6500))
            }
        };
        let replace = rng.below(100) < 75;
        planned.push(Planned { at, fault, pick, pause, replace });
        at += rng.between(Duration::from_millis(1500), Duration::from_millis(5000));
    }
    planned
}

// `status --json` is read with `crate::json`.

/// What `status --json` says about the replica set.
#[derive(Clone, Debug)]
struct StatusView {
    generation: u64,
    slots: u64,
    /// (id, member, slots owned).
    workers: Vec<(String, bool, usize)>,
    /// (projection, lag in events).
    lags: Vec<(String, u64)>,
}

impl StatusView {
    fn parse(text: &str) -> Result<Self> {
        let json = JsonParser::parse(text)?;
        let set = json.items().first().context("status --json printed no replica set")?;
        let number = |value: Option<&Json>, what: &str| -> Result<u64> {
            Ok(value.and_then(Json::number).with_context(|| format!("status --json: no {what}"))?
                as u64)
        };
        let generation = number(set.get("generation"), "generation")?;
        let slots = number(set.get("slots"), "slots")?;
        let workers = set
            .get("workers")
            .map(Json::items)
            .unwrap_or_default()
            .iter()
            .map(|w| {
                (
                    w.get("id").and_then(Json::text).unwrap_or_default().to_owned(),
                    w.get("state").and_then(Json::text) == Some("member"),
                    w.get("slots").map_or(0, |s| s.items().len()),
                )
            })
            .collect();
        let lags = set
            .get("projections")
            .map(Json::items)
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    p.get("name").and_then(Json::text).unwrap_or_default().to_owned(),
                    p.get("lag_events").and_then(Json::number).unwrap_or(0.0) as u64,
                )
            })
            .collect();
        Ok(StatusView { generation, slots, workers, lags })
    }

    fn max_lag(&self) -> u64 {
        self.lags.iter().map(|(_, lag)| *lag).max().unwrap_or(0)
    }

    fn members(&self) -> Vec<&str> {
        let mut members: Vec<&str> =
            self.workers.iter().filter(|w| w.1).map(|w| w.0.as_str()).collect();
        members.sort_unstable();
        members
    }

    /// `Ok` when every projection is caught up, every slot owned and the members are exactly
    /// `alive`; otherwise what is still missing.
    fn converged(&self, alive: &[String]) -> Result<(), String> {
        let owned: usize = self.workers.iter().map(|w| w.2).sum();
        let mut alive: Vec<&str> = alive.iter().map(String::as_str).collect();
        alive.sort_unstable();
        let mut missing = Vec::new();
        if self.lags.len() < PROJECTIONS.len() {
            missing.push(format!("{} projections with checkpoints", self.lags.len()));
        }
        for (name, lag) in self.lags.iter().filter(|(_, lag)| *lag > 0) {
            missing.push(format!("{name} lags {lag} events"));
        }
        if owned as u64 != self.slots {
            missing.push(format!("{owned} of {} slots owned", self.slots));
        }
        if self.members() != alive {
            missing.push(format!("members {:?}, live workers {alive:?}", self.members()));
        }
        if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
    }
}

fn status(procs: &Procs) -> Result<StatusView> {
    StatusView::parse(&procs.orchestrator(&["status", "--json"])?)
}

/// What the background poll of `status --json` (once a second) has seen.
#[derive(Default)]
struct Polls {
    count: u32,
    failures: u32,
    max_lag: u64,
}

fn poll_status(procs: &Procs, stop: &AtomicBool, polls: &Mutex<Polls>) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let seen = status(procs);
        {
            let mut polls = polls.lock().unwrap_or_else(|e| e.into_inner());
            polls.count += 1;
            match seen {
                Ok(view) => {
                    polls.max_lag = polls.max_lag.max(view.max_lag());
                }
                Err(_) => polls.failures += 1,
            }
        }
        let rest = Duration::from_secs(1).saturating_sub(started.elapsed());
        let wake = Instant::now() + rest;
        while Instant::now() < wake && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

enum State {
    Running,
    /// SIGSTOPped until `until`.
    Stopped {
        since: Instant,
        until: Instant,
        /// The wall clock at SIGSTOP, to compare with the workers' log timestamps.
        stopped_at: SystemTime,
    },
    /// SIGTERMed at `since`, expected to leave.
    Leaving {
        since: Instant,
    },
}

struct Worker {
    id: String,
    child: Child,
    state: State,
}

/// One stream of appends: a `demo append` process, started again for the rest of its window
/// when it fails (a terminated connection ends it).
struct Appender {
    number: u64,
    start_at: Duration,
    end_at: Duration,
    events: u64,
    /// Events per second wanted.
    per_second: f64,
    /// `--rate` that gives about `per_second`.
    rate: Option<u64>,
    child: Option<Child>,
    /// Processes started so far.
    runs: u32,
    /// Processes that failed.
    failures: u32,
    exit: Option<ExitStatus>,
}

struct Chaos<'a> {
    procs: &'a Procs,
    options: &'a Options,
    /// Admin URL and database name on PostgreSQL.
    postgres: Option<(String, String)>,
    started: Instant,
    workers: Vec<Worker>,
    next_worker: u32,
    appenders: Vec<Appender>,
    faults: BTreeMap<Fault, u32>,
    replacements: u32,
    evicted_while_stopped: u32,
    violations: Vec<String>,
}

impl Drop for Chaos<'_> {
    /// Nothing outlives the run, even when it stops early.
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = signal(&worker.child, "CONT");
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
        for appender in &mut self.appenders {
            if let Some(child) = &mut appender.child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Chaos<'_> {
    fn log(&self, message: &str) {
        println!("[{:>6.1}s] {message}", self.started.elapsed().as_secs_f64());
    }

    fn start_worker(&mut self, why: &str) -> Result<()> {
        self.next_worker += 1;
        let id = format!("chaos-w{}", self.next_worker);
        let mut args = vec!["demo", "worker", "--worker-id", &id, "--strategy"];
        args.push(&self.options.strategy);
        args.extend(WORKER_TIMINGS);
        let child = self
            .procs
            .spawn(&args, &format!("{id}.log"))
            .with_context(|| format!("cannot start {id}"))?;
        self.log(&format!("start {id} (pid {}): {why}", child.id()));
        self.workers.push(Worker { id, child, state: State::Running });
        Ok(())
    }

    /// Indexes of the running (not stopped, not leaving) workers, oldest first.
    fn running(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| matches!(self.workers[i].state, State::Running))
            .collect()
    }

    /// Ids of the workers that should be members: running or stopped, not leaving.
    fn alive_ids(&self) -> Vec<String> {
        self.workers
            .iter()
            .filter(|w| !matches!(w.state, State::Leaving { .. }))
            .map(|w| w.id.clone())
            .collect()
    }

    fn inject(&mut self, planned: &Planned) -> Result<()> {
        let running = self.running();
        let alive = self.alive_ids().len();
        let mut fault = planned.fault;
        if fault == Fault::Join && alive >= MAX_WORKERS {
            fault = Fault::Term;
        }
        if running.is_empty() || matches!(fault, Fault::Term | Fault::Pause) && running.len() <= 1 {
            // Keep at least one worker running: grow instead. (A kill -9 of the last one is
            // always followed by a replacement.)
            fault = Fault::Join;
        }
        *self.faults.entry(fault).or_default() += 1;
        let target = running.get((planned.pick % running.len().max(1) as u64) as usize).copied();
        match (fault, target) {
            (Fault::Join, _) | (_, None) => self.start_worker("joins")?,
            (Fault::Term, Some(i)) => {
                signal(&self.workers[i].child, "TERM")?;
                self.workers[i].state = State::Leaving { since: Instant::now() };
                self.log(&format!("SIGTERM {} (graceful leave)", self.workers[i].id));
            }
            (Fault::Kill, Some(i)) => {
                let mut worker = self.workers.remove(i);
                worker.child.kill().with_context(|| format!("cannot kill {}", worker.id))?;
                worker.child.wait()?;
                let replace = planned.replace || running.len() <= 1;
                self.log(&format!(
                    "kill -9 {} (pid {}){}",
                    worker.id,
                    worker.child.id(),
                    if replace { ", a replacement starts" } else { "" }
                ));
                if replace {
                    self.replacements += 1;
                    self.start_worker(&format!("replaces {}", worker.id))?;
                }
            }
            (Fault::Pause, Some(i)) => {
                signal(&self.workers[i].child, "STOP")?;
                let now = Instant::now();
                self.workers[i].state = State::Stopped {
                    since: now,
                    until: now + planned.pause,
                    stopped_at: SystemTime::now(),
                };
                self.log(&format!(
                    "SIGSTOP {} for {:.1}s (stale timeout 3s: it must be evicted, then fenced as a zombie)",
                    self.workers[i].id,
                    planned.pause.as_secs_f64()
                ));
            }
            (Fault::DropConnections, _) => {
                let (admin, database) = self.postgres.clone().context("no PostgreSQL here")?;
                let killed = psql(
                    &admin,
                    &format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                    ),
                )?;
                self.log(&format!(
                    "pg_terminate_backend: {} connections to {database} terminated (workers, appenders, status)",
                    killed.trim()
                ));
            }
        }
        Ok(())
    }

    /// SIGCONTs stopped workers whose pause is over (all of them when `all`).
    fn resume(&mut self, all: bool) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.workers.len() {
            let State::Stopped { since, until, stopped_at } = self.workers[i].state else {
                continue;
            };
            if !all && now < until {
                continue;
            }
            let id = self.workers[i].id.clone();
            // The leader's log says whether the stopped worker was evicted while stopped.
            let evictions =
                evictions(&self.procs.dir, &id, &utc(stopped_at), &utc(SystemTime::now()));
            let evicted = match evictions.first() {
                Some((at, by)) => {
                    self.evicted_while_stopped += 1;
                    format!(
                        "evicted while stopped ({by} logged `Stale worker cleaned` at {at}); now a zombie"
                    )
                }
                None => {
                    let mut text =
                        "not evicted while stopped (no `Stale worker cleaned` for it in any log)"
                            .to_owned();
                    if let Some(waiting) = self.waiting_on_locks() {
                        text.push_str(&format!("; {waiting}"));
                    }
                    text
                }
            };
            signal(&self.workers[i].child, "CONT")?;
            self.workers[i].state = State::Running;
            self.log(&format!(
                "SIGCONT {id} after {:.1}s stopped: {evicted}",
                since.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }

    /// On PostgreSQL: the sessions of the run's database waiting on a lock, and on whom (a
    /// stopped worker in the middle of a transaction holds its locks while stopped).
    fn waiting_on_locks(&self) -> Option<String> {
        let (admin, database) = self.postgres.as_ref()?;
        let waiting = psql(
            admin,
            &format!(
                "SELECT a.pid || ' waits for ' || array_to_string(pg_blocking_pids(a.pid), ',') \
                 || ' (' || left(regexp_replace(a.query, '\\s+', ' ', 'g'), 60) || ')' \
                 FROM pg_stat_activity a WHERE a.datname = '{database}' \
                 AND cardinality(pg_blocking_pids(a.pid)) > 0 ORDER BY a.pid"
            ),
        )
        .ok()?;
        let waiting: Vec<&str> = waiting.lines().filter(|l| !l.is_empty()).collect();
        if waiting.is_empty() {
            return None;
        }
        let holders = psql(
            admin,
            &format!(
                "SELECT b.pid || ' ' || b.state || ' after (' \
                 || left(regexp_replace(b.query, '\\s+', ' ', 'g'), 60) || ')' \
                 FROM pg_stat_activity b WHERE b.pid IN (SELECT unnest(pg_blocking_pids(a.pid)) \
                 FROM pg_stat_activity a WHERE a.datname = '{database}') ORDER BY b.pid"
            ),
        )
        .unwrap_or_default();
        let holders: Vec<&str> = holders.lines().filter(|l| !l.is_empty()).collect();
        Some(format!(
            "{} sessions were waiting on locks at SIGCONT: {}; lock holders: {}",
            waiting.len(),
            waiting.join("; "),
            holders.join("; ")
        ))
    }

    /// Notices workers that exited: expected after SIGTERM, a violation otherwise. A worker
    /// that does not leave within `LEAVE_WITHIN` of its SIGTERM is killed, and that is a violation.
    fn reap(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.workers.len() {
            let exit = self.workers[i].child.try_wait()?;
            let worker = &self.workers[i];
            match (&worker.state, exit) {
                (State::Leaving { since }, Some(status)) => {
                    let message = format!(
                        "{} left after {:.1}s ({status})",
                        worker.id,
                        since.elapsed().as_secs_f64()
                    );
                    if !status.success() {
                        self.violations.push(format!(
                            "{} exited with {status} after SIGTERM (see {}.log)",
                            worker.id, worker.id
                        ));
                    }
                    self.log(&message);
                    self.workers.remove(i);
                    continue;
                }
                (State::Leaving { since }, None) if since.elapsed() > LEAVE_WITHIN => {
                    let message = format!(
                        "{} did not leave within {LEAVE_WITHIN:?} of SIGTERM: kill -9 (see {}.log)",
                        worker.id, worker.id
                    );
                    self.log(&message);
                    self.violations.push(message);
                    let mut worker = self.workers.remove(i);
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    continue;
                }
                (_, Some(status)) => {
                    let message =
                        format!("{} exited by itself ({status}); see {}.log", worker.id, worker.id);
                    self.log(&message);
                    self.violations.push(message);
                    self.workers.remove(i);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        if self.running().is_empty() {
            self.start_worker("keeps one worker running")?;
        }
        Ok(())
    }

    fn spawn_appender(&mut self, index: usize, events: u64) -> Result<String> {
        let appender = &self.appenders[index];
        let events = events.to_string();
        let rate = appender.rate.map(|r| r.to_string());
        let mut args = vec!["demo", "append", "--events", &events, "--aggregates", AGGREGATES];
        if let Some(rate) = &rate {
            args.extend(["--rate", rate]);
        }
        match self.options.store {
            Store::Postgres => args.extend(["--concurrency", "4", "--hold-open", "20"]),
            Store::Sqlite => args.extend(["--concurrency", "2"]),
        }
        let log = match appender.runs {
            0 => format!("append-{}.log", appender.number),
            runs => format!("append-{}.{}.log", appender.number, runs + 1),
        };
        let child = self.procs.spawn(&args, &log)?;
        let message = format!("(pid {}, log {log}): {}", child.id(), args.join(" "));
        let appender = &mut self.appenders[index];
        appender.child = Some(child);
        appender.runs += 1;
        Ok(message)
    }

    /// Starts appenders whose moment came; notices those that finished; starts a failed one
    /// again for the rest of its window (the events that exist are what `demo verify` counts).
    fn appenders(&mut self) -> Result<()> {
        let elapsed = self.started.elapsed();
        for index in 0..self.appenders.len() {
            let appender = &mut self.appenders[index];
            let number = appender.number;
            if appender.exit.is_some() {
                continue;
            }
            let Some(child) = &mut appender.child else {
                if elapsed >= appender.start_at {
                    let events = appender.events;
                    let started = self.spawn_appender(index, events)?;
                    self.log(&format!("appender {number} starts {started}"));
                }
                continue;
            };
            let Some(status) = child.try_wait()? else { continue };
            appender.child = None;
            if status.success() {
                appender.exit = Some(status);
                self.log(&format!("appender {number} finished"));
                continue;
            }
            appender.failures += 1;
            let left = appender.end_at.saturating_sub(elapsed);
            if left < Duration::from_secs(1) {
                appender.exit = Some(status);
                self.log(&format!("appender {number} failed ({status}): tolerated"));
                continue;
            }
            let events = (appender.per_second * left.as_secs_f64()).ceil() as u64;
            let started = self.spawn_appender(index, events.max(1))?;
            self.log(&format!(
                "appender {number} failed ({status}; tolerated): again for the {:.1}s left {started}",
                left.as_secs_f64()
            ));
        }
        Ok(())
    }

    fn appending(&self) -> bool {
        self.appenders.iter().any(|a| a.exit.is_none())
    }

    /// One step of the main loop.
    fn tick(&mut self) -> Result<()> {
        self.resume(false)?;
        self.reap()?;
        self.appenders()?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }
}

/// Appenders of `events` in all, starting at 2%, 12%, 22%, 32% of the run, each spread over 60%
/// of it. `--rate` makes each of its tasks sleep 1/rate after every append, on top of the append
/// itself (and on PostgreSQL up to 20 ms held open); the rate passed makes up for that.
fn plan_appenders(options: &Options) -> Vec<Appender> {
    let run = options.duration.as_secs_f64();
    let (concurrency, per_append_ms) = match options.store {
        Store::Postgres => (4.0, 14.0),
        Store::Sqlite => (2.0, 2.0),
    };
    (0..APPENDERS)
        .map(|i| {
            let events = options.events / APPENDERS + u64::from(i < options.events % APPENDERS);
            let per_second = events as f64 / (run * 0.6);
            let sleep_ms = concurrency * 1000.0 / per_second - per_append_ms;
            let rate = (sleep_ms >= 1.0).then(|| (concurrency * 1000.0 / sleep_ms).ceil() as u64);
            let start = run * (0.02 + 0.1 * i as f64);
            Appender {
                number: i + 1,
                start_at: Duration::from_secs_f64(start),
                end_at: Duration::from_secs_f64(start + run * 0.6),
                events,
                per_second,
                rate,
                child: None,
                runs: 0,
                failures: 0,
                exit: None,
            }
        })
        .collect()
}

/// `base` (a server URL, with or without a database) pointing at `database`.
fn with_database(base: &str, database: &str) -> String {
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let query = rest[authority_end..].find('?').map_or("", |q| &rest[authority_end + q..]);
    format!("{scheme}://{}/{database}{query}", &rest[..authority_end])
}

fn psql(url: &str, sql: &str) -> Result<String> {
    let output = Command::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .context("cannot run psql (needed for the PostgreSQL chaos run)")?;
    if !output.status.success() {
        bail!("psql -c {sql:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `time` in UTC as the workers' logs print it: `2026-01-31T23:59:59.123456Z`.
fn utc(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since_epoch.subsec_micros()
    )
}

/// A log line without its ANSI colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `Stale worker cleaned` lines about worker `id` in any worker log with a timestamp in
/// [`from`, `to`]: (timestamp, the worker whose log says so).
fn evictions(dir: &Path, id: &str, from: &str, to: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(by) = name.strip_prefix("chaos-").and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("Stale worker cleaned")).map(plain) {
            let at = line.split_whitespace().next().unwrap_or_default();
            let about = line.split("worker_id=").nth(1).and_then(|w| w.split_whitespace().next());
            if about == Some(id) && (from..=to).contains(&at) {
                found.push((at.to_owned(), format!("chaos-{by}")));
            }
        }
    }
    found.sort();
    found
}

/// Lines of the worker logs that contain `needle`.
fn count_in_logs(dir: &Path, needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chaos-"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.lines().filter(|line| line.contains(needle)).count()
        })
        .sum()
}

/// Runs `demo verify`: (passed, report).
fn verify(procs: &Procs) -> Result<(bool, String)> {
    let output = procs.command(&["demo", "verify"]).output().context("cannot run demo verify")?;
    let mut report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if report.is_empty() {
        report = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    }
    Ok((output.status.success(), report))
}

/// Whether a failed report can never pass later: an event applied twice, or out of order.
fn definitive_failure(report: &str) -> bool {
    report.lines().any(|line| line.starts_with("out of order:"))
        || report.lines().any(|line| {
            // "<projection>: R applied, O exactly once, by W workers"
            let numbers: Vec<u64> =
                line.split([' ', ',']).filter_map(|word| word.parse().ok()).collect();
            line.contains(" applied, ") && numbers.len() >= 2 && numbers[0] > numbers[1]
        })
}

fn events_appended(report: &str) -> Option<u64> {
    report.lines().find_map(|line| line.strip_prefix("events appended: ")?.trim().parse().ok())
}

/// On a failed check: the rows that show what went wrong, straight from the database.
fn evidence(procs: &Procs, options: &Options, postgres: &Option<(String, String)>) -> String {
    let missing = format!(
        "WITH p(name) AS (VALUES ('{}'), ('{}')) \
         SELECT p.name AS projection, e.global_position, e.aggregate_id, e.aggregate_version, e.slot \
         FROM orch_events e CROSS JOIN p WHERE NOT EXISTS (SELECT 1 FROM demo_audit a \
         WHERE a.projection = p.name AND a.global_position = e.global_position) \
         ORDER BY 1, 2 LIMIT 30",
        PROJECTIONS[0], PROJECTIONS[1]
    );
    let queries = [
        (
            "applied more than once",
            "SELECT projection, global_position, aggregate_id, aggregate_version, slot, times, \
             handled_seq, worker_id, handled_at FROM demo_audit WHERE times <> 1 \
             ORDER BY projection, global_position LIMIT 30"
                .to_owned(),
        ),
        ("never applied", missing),
        (
            "applied per worker",
            "SELECT projection, worker_id, count(*) AS events, min(handled_at) AS first, \
             max(handled_at) AS last FROM demo_audit GROUP BY projection, worker_id \
             ORDER BY projection, worker_id"
                .to_owned(),
        ),
    ];
    let mut out = String::new();
    for (title, sql) in queries {
        let result = match (options.store, postgres) {
            (Store::Postgres, Some((admin, database))) => {
                let output = Command::new("psql")
                    .args(["-X", "-d", &with_database(admin, database), "-c", &sql])
                    .output();
                output.map(|o| {
                    String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr)
                })
            }
            _ => Command::new("sqlite3")
                .args(["-header", "-column"])
                .arg(procs.dir.join("chaos.db"))
                .arg(&sql)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr)
                }),
        };
        out.push_str(&format!("--- {title}:\n"));
        match result {
            Ok(text) => out.push_str(text.trim_end()),
            Err(err) => out.push_str(&format!("(could not query: {err})")),
        }
        out.push('\n');
    }
    out
}

pub(crate) fn chaos(args: &[String]) -> Result<()> {
    let options = parse_options(args)?;
    build_orchestrator()?;
    let dir_name = format!("chaos-{}", options.store.name());
    let mut procs = Procs::new(&dir_name)?;
    let mut postgres = None;
    let database_url = match options.store {
        Store::Sqlite => format!("sqlite:{}", procs.dir.join("chaos.db").display()),
        Store::Postgres => {
            let base = std::env::var("ORCH_CHAOS_POSTGRES_URL")
                .unwrap_or_else(|_| DEFAULT_POSTGRES.into());
            let database = format!("orch_chaos_{}", options.seed);
            let admin = with_database(&base, "postgres");
            psql(&admin, &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))?;
            psql(&admin, &format!("CREATE DATABASE {database}"))?;
            postgres = Some((admin, database.clone()));
            with_database(&base, &database)
        }
    };
    procs.database_url = Some(database_url.clone());
    println!(
        "==> chaos on {} ({database_url}), seed {}{}, strategy {}, {} workers, {} events, {:.0}s of faults",
        options.store.name(),
        options.seed,
        if options.seed_from_clock { " (from the clock)" } else { "" },
        options.strategy,
        options.workers,
        options.events,
        options.duration.as_secs_f64()
    );
    println!("    logs in {}", procs.dir.display());
    procs.orchestrator(&["migrate"])?;

    let stop = AtomicBool::new(false);
    let polls = Mutex::new(Polls::default());
    let started = Instant::now();
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| poll_status(&procs, &stop, &polls));
        let outcome = run(&procs, &options, postgres.clone());
        stop.store(true, Ordering::Relaxed);
        outcome
    });
    let outcome = outcome?;
    let total = started.elapsed();
    let polls = polls.into_inner().unwrap_or_else(|e| e.into_inner());

    let replay = format!(
        "cargo xtask chaos --store {} --workers {} --events {} --duration {}s --seed {} --strategy {}",
        options.store.name(),
        options.workers,
        options.events,
        options.duration.as_secs(),
        options.seed,
        options.strategy
    );
    let faults: Vec<String> = outcome
        .faults
        .iter()
        .map(|(fault, n)| match fault {
            Fault::Kill => format!("{} {n} ({} replaced)", fault.label(), outcome.replacements),
            Fault::Pause => {
                format!(
                    "{} {n} ({} evicted while stopped)",
                    fault.label(),
                    outcome.evicted_while_stopped
                )
            }
            _ => format!("{} {n}", fault.label()),
        })
        .collect();
    let appended = events_appended(&outcome.report)
        .map_or("unknown (no verify report)".to_owned(), |n| n.to_string());
    let passed = outcome.verified && outcome.violations.is_empty();
    println!("\n==> chaos summary");
    println!("store:            {} ({database_url})", options.store.name());
    println!("seed:             {}  (replay: {replay})", options.seed);
    println!("strategy:         {}", options.strategy);
    println!(
        "duration:         {:.0}s of faults, {:.1}s in all (appends done at {:.1}s)",
        options.duration.as_secs_f64(),
        total.as_secs_f64(),
        outcome.appends_done.as_secs_f64()
    );
    println!(
        "workers:          {} at the start, {} processes in all, {} at the end",
        options.workers, outcome.processes, outcome.final_workers
    );
    println!(
        "events appended:  {appended} (asked {}; {} appender processes, {} failed)",
        options.events, outcome.appender_runs, outcome.appenders_failed
    );
    println!(
        "faults injected:  {}: {}",
        outcome.faults.values().sum::<u32>(),
        if faults.is_empty() { "none".to_owned() } else { faults.join(", ") }
    );
    println!(
        "rebalances:       generation {} at the end; {} `Stale worker cleaned`, {} `Commit fenced` \
         in the worker logs",
        outcome.generation.map_or("unknown".to_owned(), |g| g.to_string()),
        count_in_logs(&procs.dir, "Stale worker cleaned"),
        count_in_logs(&procs.dir, "Commit fenced")
    );
    println!(
        "max lag seen:     {} events (status polled {} times, {} failed)",
        polls.max_lag, polls.count, polls.failures
    );
    match outcome.converged_in {
        Some(took) => println!("time to converge: {:.1}s", took.as_secs_f64()),
        None => println!(
            "time to converge: never within {CONVERGE_WITHIN:?} ({})",
            outcome.not_converged
        ),
    }
    println!("verify:");
    for line in outcome.report.lines() {
        println!("    {line}");
    }
    for violation in &outcome.violations {
        println!("violation:        {violation}");
    }
    println!("verdict:          {}", if passed { "PASS" } else { "FAIL" });
    if !passed {
        let evidence = evidence(&procs, &options, &postgres);
        let file = procs.dir.join("evidence.txt");
        let _ = std::fs::write(&file, &evidence);
        println!("\n{evidence}");
        bail!(
            "chaos run failed (seed {}; replay: {replay}); logs and evidence in {}",
            options.seed,
            display(&procs.dir)
        );
    }
    Ok(())
}

fn display(dir: &Path) -> String {
    dir.strip_prefix(crate::project_root()).unwrap_or(dir).display().to_string()
}

/// What the run found.
struct Outcome {
    faults: BTreeMap<Fault, u32>,
    replacements: u32,
    evicted_while_stopped: u32,
    violations: Vec<String>,
    processes: u32,
    final_workers: usize,
    appender_runs: u32,
    appenders_failed: u32,
    appends_done: Duration,
    converged_in: Option<Duration>,
    not_converged: String,
    verified: bool,
    report: String,
    generation: Option<u64>,
}

fn run(procs: &Procs, options: &Options, postgres: Option<(String, String)>) -> Result<Outcome> {
    let mut chaos = Chaos {
        procs,
        options,
        postgres,
        started: Instant::now(),
        workers: Vec::new(),
        next_worker: 0,
        appenders: plan_appenders(options),
        faults: BTreeMap::new(),
        replacements: 0,
        evicted_while_stopped: 0,
        violations: Vec::new(),
    };
    for _ in 0..options.workers {
        chaos.start_worker("initial worker")?;
    }
    let plan = schedule(options.seed, options.store, options.duration);
    chaos.log(&format!("{} faults scheduled over {:?}", plan.len(), options.duration));
    let mut next = plan.iter().peekable();
    while chaos.started.elapsed() < options.duration {
        while let Some(planned) = next.next_if(|p| chaos.started.elapsed() >= p.at) {
            chaos.inject(planned)?;
        }
        chaos.tick()?;
    }

    chaos.log("no more faults: resume stopped workers, wait for the appenders");
    chaos.resume(true)?;
    let appends_deadline = Instant::now() + Duration::from_secs(180).max(options.duration * 2);
    while chaos.appending() {
        if Instant::now() > appends_deadline {
            for appender in &mut chaos.appenders {
                if let (Some(child), None) = (&mut appender.child, appender.exit) {
                    let _ = child.kill();
                    appender.exit = Some(child.wait()?);
                }
            }
            chaos.violations.push("appenders still running 3 minutes after the faults".into());
            break;
        }
        chaos.tick()?;
    }
    let appends_done = chaos.started.elapsed();
    while chaos.running().len() < 2 {
        chaos.start_worker("at least two workers for the end")?;
    }

    chaos.log("appends over: waiting for the cluster to converge and demo verify to pass");
    let converging = Instant::now();
    let mut converged_in = None;
    let mut not_converged = String::from("no status yet");
    let mut verified = false;
    let mut report = String::new();
    let mut generation = None;
    while converging.elapsed() < CONVERGE_WITHIN {
        chaos.reap()?;
        match status(procs) {
            Ok(view) => {
                generation = Some(view.generation);
                match view.converged(&chaos.alive_ids()) {
                    Ok(()) => {
                        let (passed, text) = verify(procs)?;
                        report = text;
                        if passed {
                            verified = true;
                            converged_in = Some(converging.elapsed());
                            chaos.log(&format!(
                                "converged: generation {}, members {:?}, no lag; demo verify passed",
                                view.generation,
                                view.members()
                            ));
                            break;
                        }
                        not_converged = "demo verify fails".to_owned();
                        if definitive_failure(&report) {
                            chaos.log("demo verify found events applied twice or out of order");
                            break;
                        }
                    }
                    Err(missing) => not_converged = missing,
                }
            }
            Err(err) => not_converged = format!("status failed: {err:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    if report.is_empty() {
        report = verify(procs)?.1;
    }
    if converged_in.is_none() {
        chaos.log(&format!("did not converge: {not_converged}"));
    }

    let final_workers = chaos.workers.len();
    chaos.log(&format!("SIGTERM the {final_workers} workers"));
    for worker in &mut chaos.workers {
        signal(&worker.child, "TERM")?;
        worker.state = State::Leaving { since: Instant::now() };
    }
    while !chaos.workers.is_empty() {
        let mut i = 0;
        while i < chaos.workers.len() {
            let worker = &mut chaos.workers[i];
            let State::Leaving { since } = worker.state else { unreachable!("all leaving") };
            if let Some(status) = worker.child.try_wait()? {
                if !status.success() {
                    chaos.violations.push(format!(
                        "{} exited with {status} after SIGTERM (see {}.log)",
                        worker.id, worker.id
                    ));
                }
                chaos.workers.remove(i);
                continue;
            }
            if since.elapsed() > LEAVE_WITHIN {
                chaos.violations.push(format!(
                    "{} did not leave within {LEAVE_WITHIN:?} of SIGTERM (see {}.log)",
                    worker.id, worker.id
                ));
                let _ = worker.child.kill();
                let _ = worker.child.wait();
                chaos.workers.remove(i);
                continue;
            }
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    chaos.log("every worker left");

    Ok(Outcome {
        faults: std::mem::take(&mut chaos.faults),
        replacements: chaos.replacements,
        evicted_while_stopped: chaos.evicted_while_stopped,
        violations: std::mem::take(&mut chaos.violations),
        processes: chaos.next_worker,
        final_workers,
        appender_runs: chaos.appenders.iter().map(|a| a.runs).sum(),
        appenders_failed: chaos.appenders.iter().map(|a| a.failures).sum(),
        appends_done,
        converged_in,
        not_converged,
        verified,
        report,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_json() {
        let text = r#"[{"replica_set":"main-projections","generation":7,"strategy":null,"slots":4,"workers":[{"id":"chaos-w1","partition":0,"partitions":2,"state":"member","heartbeat_age_ms":12,"slots":[0,1]},{"id":"chaos-w\"2","partition":null,"partitions":2,"state":"joining","heartbeat_age_ms":3,"slots":[2,3]}],"projections":[{"name":"demo_audit","lag_events":5,"lag_seconds":0.250},{"name":"demo_audit_batch","lag_events":0,"lag_seconds":0.000}]}]"#;
        let view = StatusView::parse(text).unwrap();
        assert_eq!(view.generation, 7);
        assert_eq!(view.slots, 4);
        assert_eq!(view.max_lag(), 5);
        assert_eq!(view.members(), vec!["chaos-w1"]);
        assert_eq!(view.workers[1].0, "chaos-w\"2");
        assert!(view.converged(&["chaos-w1".into()]).is_err());
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = schedule(7, Store::Postgres, Duration::from_secs(60));
        let b = schedule(7, Store::Postgres, Duration::from_secs(60));
        assert!(!a.is_empty());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.at == y.at && x.fault == y.fault && x.pick == y.pick)
        );
        assert!(
            schedule(7, Store::Sqlite, Duration::from_secs(60))
                .iter()
                .all(|p| p.fault != Fault::DropConnections)
        );
    }

    #[test]
    fn reads_durations_and_urls() {
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("4h").is_err());
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert!(definitive_failure("demo_audit: 10 applied, 9 exactly once, by 3 workers"));
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_micros(1_764_288_239_691_531)),
            "2025-11-28T00:03:59.691531Z"
        );
        assert_eq!(
            plain("\u{1b}[2m2026-11-28T00:03:59.691531Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026-11-28T00:03:59.691531Z  WARN x"
        );
        assert!(!definitive_failure("demo_audit: 9 applied, 9 exactly once, by 3 workers"));
    }
}
