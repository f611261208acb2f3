//! The status page next to `/metrics`: `/` serves the embedded page, `/status.json` the picture
//! of the replica set read from the database (members, slot map, generations, lag), on SQLite and
//! PostgreSQL; and `/metrics` carries the standard process metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::ports::{BoxError, CheckpointStore, EventStore, ProjectionStop};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, Position, ReplicaSetName, SlotCount, StreamId,
    TablePrefix, Timing, Tracing, WorkerId,
};
use orchestrator_postgres::testing::TestSchema;
use orchestrator_runtime::{Orchestrator, Projection, RunError, Settings, Store, Telemetry};
use orchestrator_sqlite::SqliteStore;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SLOTS: u64 = 16;
const RS: &str = "status-page";

/// Does nothing with the events: the page only needs checkpoints to move.
struct Ignore;

#[async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Ignore {
    fn name(&self) -> &str {
        "ignore"
    }

    async fn handle(&self, _tx: &mut Tx, _event: &Event) -> Result<(), BoxError> {
        Ok(())
    }
}

fn settings(worker: &str) -> Settings {
    let mut settings = Settings::new(ReplicaSetName::new(RS).unwrap());
    settings.worker_id = WorkerId::new(worker).unwrap();
    settings.slots = SlotCount::new(SLOTS).unwrap();
    settings.timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        stale_worker_timeout: Duration::from_millis(1500),
        coordination_timeout: Duration::from_secs(1),
        poll_interval: Duration::from_millis(50),
        registration_wait: Duration::from_millis(50),
    };
    settings.idle_poll = Duration::from_millis(20);
    settings
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RunError>>,
}

fn start<S: Store>(store: &S, worker: &str, telemetry: &Telemetry) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let orchestrator =
        Orchestrator::new(store.clone(), settings(worker)).unwrap().with_telemetry(telemetry);
    let projection: Arc<dyn Projection<<S as CheckpointStore>::Tx>> = Arc::new(Ignore);
    let task = tokio::spawn(orchestrator.run(
        async {
            let _ = stopped.await;
        },
        vec![projection],
    ));
    Running { stop, task }
}

async fn append<S: EventStore>(store: &S, n: u64) {
    for i in 0..n {
        let stream = StreamId::new("sales", "Order", format!("order-{i}"));
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&(i + 1).to_be_bytes());
        let event = NewEvent {
            event_id: EventId::from_bytes(id),
            event_type: "Placed".into(),
            event_version: 1,
            payload: Vec::new(),
            metadata: "{}".into(),
            tracing: Tracing::default(),
        };
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
}

/// One HTTP/1.1 GET: (status code, content type, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Polls `/status.json` until `check` holds for the replica set's picture (15 s at most).
async fn wait_for(addr: SocketAddr, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, body) = get(addr, "/status.json").await;
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if code == 200
            && let Some(picture) = json.as_array().and_then(|a| a.first())
            && check(picture)
        {
            return picture.clone();
        }
        assert!(Instant::now() < deadline, "never saw {what}; last answer {code}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn the_page_shows_the_replica_set<S: Store>(store: S) {
    let telemetry = Telemetry::new().unwrap();
    let server = telemetry.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr();

    // Before any worker: the page loads and the JSON is an empty list.
    let (code, content_type, html) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(html.contains("status.json") && html.contains("Slot map"), "{html}");
    let (code, _, body) = get(addr, "/status.json").await;
    assert_eq!((code, body.as_str()), (200, "[]"));

    append(&store, 40).await;
    let a = start(&store, "worker-a", &telemetry);
    let b = start(&store, "worker-b", &telemetry);
    let picture = wait_for(addr, "two members owning every slot, caught up", |p| {
        let members = p["workers"].as_array().map_or(0, |w| {
            w.iter().filter(|w| w["state"] == "member" && w["partitions"] == 2).count()
        });
        let owned = p["slot_map"].as_array().is_some_and(|s| {
            s.iter().all(|slot| slot["owner"].is_string() && slot["next_owner"].is_null())
        });
        let caught_up = p["projections"][0]["lag_events"] == 0;
        members == 2 && owned && caught_up
    })
    .await;
    assert_eq!(picture["replica_set"], RS);
    assert_eq!(picture["slots"], SLOTS);
    assert_eq!(picture["strategy"], "incremental");
    let slot_map = picture["slot_map"].as_array().unwrap();
    assert_eq!(slot_map.len(), SLOTS as usize);
    // The slot map and the workers' slot lists agree.
    for worker in picture["workers"].as_array().unwrap() {
        for slot in worker["slots"].as_array().unwrap() {
            assert_eq!(slot_map[slot.as_u64().unwrap() as usize]["owner"], worker["id"]);
        }
    }
    let generations = picture["generations"].as_array().unwrap();
    assert!(!generations.is_empty(), "{picture}");
    assert_eq!(generations[0]["generation"], picture["generation"]);
    assert_eq!(generations[0]["members"], serde_json::json!(["worker-a", "worker-b"]));
    assert!(
        generations.windows(2).all(|w| w[0]["generation"].as_u64() > w[1]["generation"].as_u64())
    );
    let projection = &picture["projections"][0];
    assert_eq!(projection["name"], "ignore");
    assert_eq!(projection["state"], "running");
    assert_eq!(projection["dead_letters"], 0);
    assert_eq!(projection["lag_events_capped"], false);
    assert!(picture["leader"].is_string(), "{picture}");

    // A leave shows: one member owns everything, in a newer generation.
    let before = picture["generation"].as_u64().unwrap();
    let _ = b.stop.send(());
    b.task.await.unwrap().unwrap();
    wait_for(addr, "worker-a alone", |p| {
        p["generation"].as_u64() > Some(before)
            && p["workers"].as_array().is_some_and(|w| w.len() == 1)
            && p["workers"][0]["slots"].as_array().is_some_and(|s| s.len() == SLOTS as usize)
    })
    .await;

    // A projection stopped by its failure policy shows as stopped, with where and why.
    let stop = ProjectionStop {
        projection: "ignore".to_owned(),
        position: Position { commit: 0, global: 7 },
        aggregate: "sales/Order/order-6".to_owned(),
        event_type: "Placed".to_owned(),
        error: "poison".to_owned(),
    };
    store.stop_projection(&ReplicaSetName::new(RS).unwrap(), &stop).await.unwrap();
    let picture =
        wait_for(addr, "the stopped projection", |p| p["projections"][0]["state"] == "stopped")
            .await;
    let stopped = &picture["projections"][0]["stopped"];
    assert_eq!(stopped["position"], 7, "{picture}");
    assert_eq!(stopped["aggregate"], "sales/Order/order-6");
    assert_eq!(stopped["event_type"], "Placed");
    assert_eq!(stopped["error"], "poison");
    assert!(stopped["age_ms"].is_u64());
    let _ = a.stop.send(());
    a.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_replica_set_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("orch-status-page-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("o.db").display());
    let pool = SqliteStore::connect_pool(&url, 8).await.unwrap();
    orchestrator_sqlite::migrate(&pool, &TablePrefix::default(), SlotCount::new(SLOTS).unwrap())
        .await
        .unwrap();
    let store = SqliteStore::open(pool.clone(), TablePrefix::default()).await.unwrap();
    the_page_shows_the_replica_set(store).await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_replica_set_on_postgres() {
    let Some(schema) = TestSchema::start(SlotCount::new(SLOTS).unwrap()).await else { return };
    the_page_shows_the_replica_set(schema.store.clone()).await;
    schema.drop_schema().await;
}

/// The standard Prometheus process collector set, next to the orchestrator's metrics.
#[tokio::test]
async fn metrics_include_the_process_collector() {
    let telemetry = Telemetry::new().unwrap();
    let body = telemetry.render();
    for name in [
        "process_start_time_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
    ] {
        let value = body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"));
        assert!(value >= 0.0, "{name} = {value}");
    }
    let start = body
        .lines()
        .find_map(|l| l.strip_prefix("process_start_time_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert!((now.as_secs_f64() - start).abs() < 3600.0, "start time {start} is not about now");
}
