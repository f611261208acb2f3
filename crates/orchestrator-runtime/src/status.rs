//! The replica set's picture, read from the database: what `orchestrator status` prints, and the
//! status page served at `/` next to `/metrics` (and by `orchestrator status --serve`).
//!
//! [`read_status`] turns one consistent snapshot of the coordination store, the generation history
//! and each projection's backlog into a [`ReplicaSetStatus`], whose JSON form is the stable
//! `status --json` interface plus the page's extras (`slot_map`, `generations`,
//! `leader`). [`StatusPage`] serves that JSON at `/status.json` and a small self-refreshing page at
//! `/`, embedded in the binary (no asset is fetched at run time).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, DeadLetterStore, EventStore, GenerationRecord, ReadRequest,
    StoppedProjection, StoreError, StoreResult,
};
use orchestrator_core::{ReplicaSetName, Scope, Slot, Snapshot, Strategy};
use serde::Serialize;

use crate::telemetry::Server;

/// What the status page counts of each projection's backlog per refresh: the same cap as the
/// workers' own `projection_lag_events` measurement, so a refresh never counts millions of rows.
pub const PAGE_LAG_LIMIT: u64 = 100_000;

/// Generations of history a picture carries (the SQL stores keep the last 100).
pub const HISTORY: usize = 12;

/// The page refreshes at most this often, however many browsers look at it: requests within this
/// interval share one reading of the database.
const FRESH_FOR: Duration = Duration::from_millis(900);

/// A reading of the database that takes longer fails (the page then says so and keeps its last
/// picture).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The page, embedded: markup, style and script in one small file.
const PAGE: &str = include_str!("status/page.html");

/// How a projection's backlog is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagCount {
    /// Every event after the checkpoints (`orchestrator status`, on demand).
    Exact,
    /// Up to this many (the page, every refresh); a larger backlog reads as the cap, flagged by
    /// `lag_events_capped`.
    UpTo(u64),
}

/// One replica set as `status --json` prints it (an array of these) and the page draws it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaSetStatus {
    /// Its name.
    pub replica_set: String,
    /// The current generation (0 before the first).
    pub generation: u64,
    /// The strategy as configured where the picture was taken: the store does not record the
    /// workers' own setting.
    pub strategy: &'static str,
    /// Its slot count.
    pub slots: u32,
    /// The worker holding the leader lease, while it is unexpired.
    pub leader: Option<String>,
    /// Registered workers, by id.
    pub workers: Vec<WorkerStatus>,
    /// Projections with checkpoints in the replica set, by name.
    pub projections: Vec<ProjectionStatus>,
    /// One entry per slot, in slot order: who owns it and who it is moving to.
    pub slot_map: Vec<SlotStatus>,
    /// The newest generations, newest first.
    pub generations: Vec<GenerationStatus>,
}

/// One registered worker.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Its id.
    pub id: String,
    /// Its index among the members; null while it is joining.
    pub partition: Option<usize>,
    /// How many members share the slots.
    pub partitions: usize,
    /// `member` (of the current generation) or `joining`.
    pub state: &'static str,
    /// Time since its last heartbeat, by the database clock.
    pub heartbeat_age_ms: u64,
    /// The slots it owns.
    pub slots: Vec<u32>,
}

/// How far one projection is behind, over every slot of the replica set.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    /// Its name.
    pub name: String,
    /// Events after the checkpoints (every event counts: the store does not know the projections'
    /// scopes).
    pub lag_events: u64,
    /// Whether `lag_events` is the count's cap rather than the whole backlog.
    pub lag_events_capped: bool,
    /// Age of the oldest of the next events of the slots, in seconds to the millisecond; 0 when
    /// none is waiting.
    pub lag_seconds: f64,
    /// `running` or `stopped`.
    pub state: &'static str,
    /// Where a stopped projection stopped; null while it runs.
    pub stopped: Option<StoppedAt>,
    /// Events parked as dead letters.
    pub dead_letters: u64,
}

/// Where a projection stopped (its `stop` failure policy), as the store recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct StoppedAt {
    /// The failing event's global position.
    pub position: u64,
    /// Its stream (`bounded_context/aggregate_type/aggregate_id`).
    pub aggregate: String,
    /// Its type.
    pub event_type: String,
    /// The handler's last error.
    pub error: String,
    /// Time since it stopped, by the database clock.
    pub age_ms: u64,
}

/// One slot of the slot map.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotStatus {
    /// The worker processing it; null when nobody does.
    pub owner: Option<String>,
    /// The worker it is being handed to; null unless it is moving.
    pub next_owner: Option<String>,
}

/// One generation of the history.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStatus {
    /// Its number.
    pub generation: u64,
    /// Its members.
    pub members: Vec<String>,
    /// The leader that created it.
    pub leader: String,
    /// Time since it was created, by the database clock.
    pub age_ms: u64,
}

/// The strategy as `STRATEGY` spells it.
pub fn strategy_name(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Recreate => "recreate",
        Strategy::Incremental => "incremental",
    }
}

/// Reads the picture of one replica set: its snapshot, generation history and each projection's
/// lag. Fails with [`StoreError::UnknownReplicaSet`] when no worker ever registered in it.
pub async fn read_status<S>(
    store: &S,
    replica_set: &ReplicaSetName,
    strategy: Strategy,
    lag: LagCount,
) -> StoreResult<ReplicaSetStatus>
where
    S: EventStore + CheckpointStore + CoordinationStore + DeadLetterStore,
{
    let snapshot = store.snapshot(replica_set).await?;
    let generations = store.recent_generations(replica_set, HISTORY).await?;
    let projections = lags(store, replica_set, lag).await?;
    Ok(picture(&snapshot, &generations, projections, strategy))
}

/// The backlog of every projection with checkpoints in the replica set, stopped in it or with dead
/// letters in it.
async fn lags<S: EventStore + CheckpointStore + DeadLetterStore>(
    store: &S,
    replica_set: &ReplicaSetName,
    lag: LagCount,
) -> StoreResult<Vec<ProjectionStatus>> {
    let slots: Vec<Slot> = store.slot_count().all().collect();
    let limit = match lag {
        LagCount::Exact => usize::MAX,
        LagCount::UpTo(cap) => usize::try_from(cap).unwrap_or(usize::MAX),
    };
    let stopped = store.stopped_projections(replica_set).await?;
    // One query for every projection's count, per reading.
    let dead_letters = store.dead_letter_counts(replica_set).await?;
    let mut names = store.projections(replica_set).await?;
    // A projection that stopped on its first event, or parked everything it was given, may have
    // no checkpoint yet, and still shows.
    names.extend(stopped.iter().map(|s| s.stop.projection.clone()));
    names.extend(dead_letters.keys().cloned());
    names.sort();
    names.dedup();
    let mut lags = Vec::new();
    for name in names {
        let checkpoints = store.load(replica_set, &name, &slots).await?;
        let request =
            ReadRequest { cursors: checkpoints.into_iter().collect(), scope: Scope::all(), limit };
        let backlog = store.backlog(&request).await?;
        let seconds = backlog.oldest_age.map_or(0.0, |age| age.as_secs_f64());
        let stopped_at = stopped.iter().find(|s| s.stop.projection == name).map(stopped_at);
        lags.push(ProjectionStatus {
            lag_events_capped: matches!(lag, LagCount::UpTo(cap) if backlog.events >= cap),
            lag_events: backlog.events,
            lag_seconds: (seconds * 1000.0).round() / 1000.0,
            state: if stopped_at.is_some() { "stopped" } else { "running" },
            stopped: stopped_at,
            dead_letters: dead_letters.get(&name).copied().unwrap_or(0),
            name,
        });
    }
    Ok(lags)
}

fn stopped_at(stopped: &StoppedProjection) -> StoppedAt {
    StoppedAt {
        position: stopped.stop.position.global,
        aggregate: stopped.stop.aggregate.clone(),
        event_type: stopped.stop.event_type.clone(),
        error: stopped.stop.error.clone(),
        age_ms: u64::try_from(stopped.age.as_millis()).unwrap_or(u64::MAX),
    }
}

fn picture(
    snapshot: &Snapshot,
    generations: &[GenerationRecord],
    projections: Vec<ProjectionStatus>,
    strategy: Strategy,
) -> ReplicaSetStatus {
    let workers = snapshot
        .workers
        .iter()
        .map(|w| WorkerStatus {
            id: w.id.to_string(),
            partition: snapshot.partition_of(&w.id).map(|p| p.index),
            partitions: snapshot.members.len(),
            state: if snapshot.members.contains(&w.id) { "member" } else { "joining" },
            heartbeat_age_ms: u64::try_from(w.heartbeat_age.as_millis()).unwrap_or(u64::MAX),
            slots: snapshot.owned_by(&w.id).iter().map(|(s, _)| s.0).collect(),
        })
        .collect();
    let slot_map = snapshot
        .slots
        .iter()
        .map(|s| SlotStatus {
            owner: s.owner.as_ref().map(ToString::to_string),
            next_owner: s.next_owner.as_ref().map(ToString::to_string),
        })
        .collect();
    let generations = generations
        .iter()
        .map(|g| GenerationStatus {
            generation: g.generation.0,
            members: g.members.iter().map(ToString::to_string).collect(),
            leader: g.leader.to_string(),
            age_ms: u64::try_from(g.age.as_millis()).unwrap_or(u64::MAX),
        })
        .collect();
    ReplicaSetStatus {
        replica_set: snapshot.replica_set.to_string(),
        generation: snapshot.generation.0,
        strategy: strategy_name(strategy),
        slots: snapshot.slot_count.get(),
        leader: snapshot
            .lease
            .as_ref()
            .filter(|lease| !lease.remaining.is_zero())
            .map(|lease| lease.holder.to_string()),
        workers,
        projections,
        slot_map,
        generations,
    }
}

/// A replica set the page shows, with the store to read it from.
#[async_trait]
trait Source: Send + Sync {
    fn replica_set(&self) -> &ReplicaSetName;
    async fn read(&self) -> StoreResult<ReplicaSetStatus>;
}

struct StoreSource<S> {
    store: S,
    replica_set: ReplicaSetName,
    strategy: Strategy,
}

#[async_trait]
impl<S> Source for StoreSource<S>
where
    S: EventStore + CheckpointStore + CoordinationStore + DeadLetterStore + 'static,
{
    fn replica_set(&self) -> &ReplicaSetName {
        &self.replica_set
    }

    async fn read(&self) -> StoreResult<ReplicaSetStatus> {
        read_status(&self.store, &self.replica_set, self.strategy, LagCount::UpTo(PAGE_LAG_LIMIT))
            .await
    }
}

/// The status page: `/` (the page) and `/status.json` (the pictures it draws, the shape of
/// `orchestrator status --json`) for the replica sets it was told to show.
///
/// A worker given a [`crate::Telemetry`] shows its replica set there, so the page is served next to
/// `/metrics`; `orchestrator status --serve` serves one on its own. Cloning shares it.
#[derive(Clone, Default)]
pub struct StatusPage {
    inner: Arc<PageInner>,
}

#[derive(Default)]
struct PageInner {
    sources: Mutex<Vec<Arc<dyn Source>>>,
    /// The last answer and when it was taken.
    last: tokio::sync::Mutex<Option<(Instant, StatusCode, String)>>,
}

impl std::fmt::Debug for StatusPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusPage").field("replica_sets", &self.replica_sets()).finish()
    }
}

impl StatusPage {
    /// A page showing nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Shows `replica_set`, read from `store` (replacing what was shown of it before).
    pub fn show<S>(&self, store: S, replica_set: ReplicaSetName, strategy: Strategy)
    where
        S: EventStore + CheckpointStore + CoordinationStore + DeadLetterStore + 'static,
    {
        let mut sources = self.inner.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.retain(|s| s.replica_set() != &replica_set);
        sources.push(Arc::new(StoreSource { store, replica_set, strategy }));
        sources.sort_by(|a, b| a.replica_set().as_str().cmp(b.replica_set().as_str()));
    }

    /// The replica sets shown.
    pub fn replica_sets(&self) -> Vec<ReplicaSetName> {
        let sources = self.inner.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.iter().map(|s| s.replica_set().clone()).collect()
    }

    /// The routes `/` and `/status.json`, to merge into a server.
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/status.json", get(status_json))
            .with_state(self.clone())
    }

    /// Serves the page alone on `addr` in the background, until the returned handle is dropped.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<Server> {
        Server::start(addr, self.routes()).await
    }

    /// The JSON array of every replica set shown that has workers (200), or the reason the
    /// database could not be read (503, `{"error": ...}`). Readings within a second of each
    /// other are shared.
    pub async fn json(&self) -> (StatusCode, String) {
        let mut last = self.inner.last.lock().await;
        if let Some((at, code, body)) = last.as_ref()
            && at.elapsed() < FRESH_FOR
        {
            return (*code, body.clone());
        }
        let (code, body) = match tokio::time::timeout(READ_TIMEOUT, self.read_all()).await {
            Ok(Ok(pictures)) => match serde_json::to_string(&pictures) {
                Ok(json) => (StatusCode::OK, json),
                Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, error_json(&err.to_string())),
            },
            Ok(Err(err)) => (StatusCode::SERVICE_UNAVAILABLE, error_json(&err.to_string())),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                error_json(&format!(
                    "the database did not answer within {} s",
                    READ_TIMEOUT.as_secs()
                )),
            ),
        };
        *last = Some((Instant::now(), code, body.clone()));
        (code, body)
    }

    async fn read_all(&self) -> StoreResult<Vec<ReplicaSetStatus>> {
        let sources: Vec<Arc<dyn Source>> =
            self.inner.sources.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut pictures = Vec::new();
        for source in sources {
            match source.read().await {
                Ok(picture) => pictures.push(picture),
                // No worker has registered yet: nothing to draw for it.
                Err(StoreError::UnknownReplicaSet(_)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(pictures)
    }
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        PAGE,
    )
        .into_response()
}

async fn status_json(State(page): State<StatusPage>) -> Response {
    let (code, body) = page.json().await;
    (code, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}

#[cfg(test)]
mod tests {
    use orchestrator_core::{
        Epoch, Generation, Incarnation, Lease, SlotCount, SlotRecord, WorkerId, WorkerRecord,
    };

    use super::*;

    fn id(s: &str) -> WorkerId {
        WorkerId::new(s).unwrap()
    }

    fn worker(name: &str, heartbeat_ms: u64) -> WorkerRecord {
        WorkerRecord {
            id: id(name),
            incarnation: Incarnation(1),
            heartbeat_age: Duration::from_millis(heartbeat_ms),
            registered_age: Duration::from_secs(10),
            acked_generation: Generation(2),
            protocol: orchestrator_core::PROTOCOL_VERSION,
        }
    }

    #[test]
    fn the_picture_has_every_slot_its_owner_and_the_moving_ones() {
        let mut snapshot =
            Snapshot::empty(ReplicaSetName::new("rs").unwrap(), SlotCount::new(4).unwrap());
        snapshot.generation = Generation(2);
        snapshot.members = vec![id("a"), id("b")];
        snapshot.workers = vec![worker("a", 120), worker("b", 80), worker("c", 5)];
        snapshot.lease = Some(Lease {
            holder: id("a"),
            incarnation: Incarnation(1),
            remaining: Duration::from_secs(3),
        });
        let owned = |owner: &str, next: Option<&str>| SlotRecord {
            owner: Some(id(owner)),
            epoch: Epoch(1),
            next_owner: next.map(id),
        };
        snapshot.slots = vec![owned("a", None), owned("a", Some("b")), owned("b", None), {
            SlotRecord::default()
        }];
        let history = [GenerationRecord {
            generation: Generation(2),
            members: vec![id("a"), id("b")],
            leader: id("a"),
            age: Duration::from_millis(1500),
        }];
        let view = picture(&snapshot, &history, Vec::new(), Strategy::Incremental);
        let json: serde_json::Value = serde_json::to_value(&view).unwrap();
        assert_eq!(json["generation"], 2);
        assert_eq!(json["strategy"], "incremental");
        assert_eq!(json["slots"], 4);
        assert_eq!(json["leader"], "a");
        assert_eq!(json["slot_map"].as_array().unwrap().len(), 4);
        assert_eq!(json["slot_map"][1]["owner"], "a");
        assert_eq!(json["slot_map"][1]["next_owner"], "b");
        assert!(json["slot_map"][3]["owner"].is_null());
        assert_eq!(json["workers"][0]["slots"], serde_json::json!([0, 1]));
        assert_eq!(json["workers"][0]["partition"], 0);
        assert_eq!(json["workers"][0]["heartbeat_age_ms"], 120);
        assert_eq!(json["workers"][2]["state"], "joining");
        assert!(json["workers"][2]["partition"].is_null());
        assert_eq!(json["generations"][0]["age_ms"], 1500);
        assert_eq!(json["generations"][0]["members"], serde_json::json!(["a", "b"]));
    }

    /// Dead letters are counted per projection (one query), and a projection that has letters or
    /// a stop but no checkpoint yet is listed.
    #[tokio::test]
    async fn projections_show_their_dead_letters_with_or_without_a_checkpoint() {
        use orchestrator_core::ports::{
            CheckpointStore, CoordinationStore, DeadLetterStore, EventStore, Fence, NewDeadLetter,
            ProjectionStop,
        };
        use orchestrator_core::{EventId, ExpectedVersion, NewEvent, Position, StreamId};
        use orchestrator_memory::{ManualClock, MemoryStore};

        let store = MemoryStore::new(SlotCount::new(4).unwrap(), Arc::new(ManualClock::default()));
        let rs = ReplicaSetName::new("rs").unwrap();
        let stream = StreamId::new("bank", "Account", "acct-1");
        let events = (1..=2u8)
            .map(|n| NewEvent::new(EventId::from_bytes([n; 16]), "Deposited", b"{}".to_vec()))
            .collect();
        let appended = store.append(&stream, ExpectedVersion::NoStream, events).await.unwrap();
        store.register(&rs, SlotCount::new(4).unwrap(), &id("a")).await.unwrap();
        let letter = |global: u64| NewDeadLetter {
            position: Position::global(global),
            slot: appended.slot,
            key: "acct-1".to_owned(),
            stream: stream.clone(),
            event_type: "Deposited".to_owned(),
            error: "boom".to_owned(),
            attempts: 1,
        };
        // No checkpoint is committed: an empty commit needs no fence.
        let fence = Fence { replica_set: rs.clone(), worker: id("a"), grants: Default::default() };
        let mut tx = store.begin().await.unwrap();
        store.park(&mut tx, &rs, "balances", &[letter(1), letter(2)]).await.unwrap();
        store.commit(tx, &fence, "balances", &Default::default()).await.unwrap();
        let stop = ProjectionStop {
            projection: "audit".to_owned(),
            position: Position::global(1),
            aggregate: stream.to_string(),
            event_type: "Deposited".to_owned(),
            error: "boom".to_owned(),
        };
        store.stop_projection(&rs, &stop).await.unwrap();

        let status =
            read_status(&store, &rs, Strategy::Incremental, LagCount::Exact).await.unwrap();
        let shown: Vec<(&str, u64, &str, u64)> = status
            .projections
            .iter()
            .map(|p| (p.name.as_str(), p.dead_letters, p.state, p.lag_events))
            .collect();
        assert_eq!(shown, vec![("audit", 0, "stopped", 2), ("balances", 2, "running", 2)]);
    }

    #[test]
    fn the_page_is_self_contained() {
        // Works offline: nothing is loaded from another origin.
        for needle in ["http://", "https://", "<link", "src="] {
            assert!(!PAGE.contains(needle), "the page refers to an external asset: {needle}");
        }
        assert!(PAGE.contains("status.json"));
    }
}
