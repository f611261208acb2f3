//! Shutdown is honoured at any moment, also while the database is unreachable: a worker talks to
//! real PostgreSQL through a TCP proxy the test can cut, as a network partition or a database that
//! went away would. Cut before registering, the worker retries registration (with backoff, at the
//! engine's deadlines) and a shutdown ends it at once; cut while it processes, a shutdown ends it
//! within `coordination_timeout` (its leave deadline) although it can neither commit nor
//! deregister.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_core::{ReplicaSetName, SlotCount, TablePrefix, WorkerId};
use orchestrator_postgres::PgStore;
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema};
use orchestrator_runtime::{Orchestrator, Projection, RunError, Settings};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Forwards connections to the PostgreSQL server until cut; after that, connecting is refused
/// and every forwarded connection is closed.
struct Proxy {
    port: u16,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(server: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let server = server.clone();
                connections.spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(server).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self { port, tasks }
    }

    /// Closes the listener and every connection (dropping the task set aborts them).
    fn cut(&mut self) {
        self.tasks.abort_all();
    }
}

fn settings() -> Settings {
    let mut settings = Settings::new(ReplicaSetName::new("shutdown").unwrap());
    settings.worker_id = WorkerId::new("w1").unwrap();
    settings.timing.heartbeat_interval = Duration::from_millis(200);
    settings.timing.stale_worker_timeout = Duration::from_millis(1500);
    settings.timing.coordination_timeout = Duration::from_secs(4);
    settings.timing.registration_wait = Duration::from_millis(100);
    settings.timing.poll_interval = Duration::from_millis(100);
    settings.idle_poll = Duration::from_millis(20);
    settings.slots = SlotCount::new(16).unwrap();
    settings
}

/// A store on `schema` whose connections go through `proxy`.
async fn store_through(proxy: &Proxy, schema: &TestSchema) -> PgStore {
    let url = std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
    let options: PgConnectOptions = url.parse().unwrap();
    let options = PgStore::tune(options.host("127.0.0.1").port(proxy.port))
        .options([("search_path", schema.schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(options)
        .await
        .unwrap();
    PgStore::open(pool, TablePrefix::default()).await.unwrap()
}

fn upstream() -> String {
    let url = std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
    let options: PgConnectOptions = url.parse().unwrap();
    format!("{}:{}", options.get_host(), options.get_port())
}

struct Idle;

#[async_trait::async_trait]
impl<Tx: Send + 'static> Projection<Tx> for Idle {
    fn name(&self) -> &str {
        "idle"
    }
    async fn handle(
        &self,
        _tx: &mut Tx,
        _event: &orchestrator_core::Event,
    ) -> Result<(), orchestrator_core::ports::BoxError> {
        Ok(())
    }
}

/// Runs a worker on `store`; returns its shutdown sender and its task.
fn spawn(store: PgStore) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), RunError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = Orchestrator::new(store, settings()).unwrap();
    let projections: Vec<Arc<dyn Projection<_>>> = vec![Arc::new(Idle)];
    let task = tokio::spawn(worker.run(
        async {
            let _ = stopped.await;
        },
        projections,
    ));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_worker_retrying_registration_against_an_unreachable_database() {
    let Some(schema) = TestSchema::start(SlotCount::new(16).unwrap()).await else { return };
    let mut proxy = Proxy::start(upstream()).await;
    let store = store_through(&proxy, &schema).await;
    proxy.cut();
    let (stop, task) = spawn(store);
    // Long enough for several registration attempts to fail.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!task.is_finished(), "it keeps retrying while the database is unreachable");
    let asked = Instant::now();
    stop.send(()).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), task).await.expect("it exits");
    assert!(outcome.unwrap().is_ok(), "a shutdown before joining is a clean exit");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "exited {:?} after the shutdown",
        asked.elapsed()
    );
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_worker_whose_database_went_away_within_the_leave_deadline() {
    let Some(schema) = TestSchema::start(SlotCount::new(16).unwrap()).await else { return };
    let mut proxy = Proxy::start(upstream()).await;
    let store = store_through(&proxy, &schema).await;
    let (stop, task) = spawn(store);
    // Let it join and own its slots.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let owned: i64 = sqlx::query_scalar("SELECT count(*) FROM orch_slots WHERE owner = 'w1'")
            .fetch_one(&schema.pool)
            .await
            .unwrap();
        if owned == 16 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never owned its slots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    stop.send(()).unwrap();
    let coordination_timeout = settings().timing.coordination_timeout;
    let outcome = tokio::time::timeout(coordination_timeout * 2, task)
        .await
        .expect("it exits within its leave deadline, not retrying forever");
    assert!(outcome.unwrap().is_ok());
    let took = asked.elapsed();
    assert!(
        took < coordination_timeout + Duration::from_secs(2),
        "exited {took:?} after the shutdown"
    );
    schema.drop_schema().await;
}
