//! Transactional projections written with [diesel](https://diesel.rs) through diesel-async, on the
//! PostgreSQL adapter's schema, with the same exactly-once guarantee as `PgTx`.
//!
//! [`DieselStore`] is every port of `orchestrator-core`. Its transaction, [`DieselTx`], is a
//! pooled [`AsyncPgConnection`] with a transaction open: a projection's handler runs its diesel
//! queries on it (`&mut **tx`), and the store's `commit` runs the PostgreSQL adapter's fenced
//! commit on that same connection before `COMMIT`: the replica set's row locked `FOR SHARE`, the
//! epoch check and the checkpoint upsert, in one statement. The read model's writes, the checkpoints
//! and the ownership check therefore commit or roll back together, exactly as with sqlx.
//!
//! Everything that does not happen inside the projection's transaction (reading events,
//! coordination, loading checkpoints, units of work, the change feed) is delegated to an inner
//! [`PgStore`] on the same database; the fenced commit's SQL and its steps are the adapter's
//! [`Fencing`], run here through diesel's connection ([`FencingTx`]). Nothing of the coordination
//! SQL is copied, and the tables are the PostgreSQL adapter's: a projection can move between the
//! sqlx and the diesel API without migrating anything (its checkpoints are kept under its name).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use orchestrator_core::TablePrefix;
//! use orchestrator_diesel::DieselStore;
//! use orchestrator_postgres::PgStore;
//!
//! let url = std::env::var("DATABASE_URL")?;
//! let pool = PgStore::connect_pool(&url, 10).await?;
//! let pg = PgStore::open(pool, TablePrefix::default()).await?;
//! let store = DieselStore::open(pg, DieselStore::connect_pool(&url, 4).await?).await?;
//! // Orchestrator::new(store, settings)?.run(shutdown, projections), where each projection
//! // implements Projection<DieselTx>.
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod error;
mod fencing;
pub mod testing;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AnsiTransactionManager, AsyncConnection, TransactionManager};
use orchestrator_core::ports::{
    Appended, Backlog, CheckpointStore, CoordinationStore, DeadLetter, DeadLetterAction,
    DeadLetterFilter, DeadLetterId, DeadLetterRequest, DeadLetterStore, EventStore, Fence,
    HeartbeatAck, NewDeadLetter, ReadRequest, StoreError, StoreResult, UnitOfWorkStore,
};
use orchestrator_core::{
    Epoch, Event, ExpectedVersion, Generation, GenerationPlan, Incarnation, NewEvent, PartitionKey,
    Position, ReplicaSetName, Slot, SlotCount, Snapshot, StreamId, WorkerId,
};
use orchestrator_postgres::{PgChangeFeed, PgStore, PgUnitOfWork};

pub use diesel_async::AsyncPgConnection;
pub use error::classify as classify_error;
pub use orchestrator_postgres::{Fencing, FencingTx};

/// A pool of diesel-async PostgreSQL connections (bb8).
pub type DieselPool = Pool<AsyncPgConnection>;

/// The session settings every connection of [`DieselStore::connect_pool`] gets, as
/// `PgStore::tune` gives sqlx's: a frozen worker's open transaction is ended by the server after
/// 60 s instead of holding its locks for ever (its commit then fails and it is fenced).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[("idle_in_transaction_session_timeout", "60s")];

/// Every port on PostgreSQL, with projections' transactions on diesel-async connections. Cloning
/// shares the pools.
#[derive(Clone)]
pub struct DieselStore {
    pg: PgStore,
    pool: DieselPool,
    fencing: Fencing,
}

impl std::fmt::Debug for DieselStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DieselStore").field("pg", &self.pg).field("pool", &self.pool).finish()
    }
}

/// The transaction a transactional projection writes its read model through: a pooled diesel-async
/// connection with a transaction open. Run diesel queries on `&mut **tx` (or [`DieselTx::conn`]);
/// `conn.transaction(...)` inside a handler nests as a savepoint.
///
/// The store's `commit` checks the fence and commits. Dropping it without `commit` keeps nothing:
/// the pool sees a connection still in a transaction and closes it, so the server rolls back.
pub struct DieselTx {
    conn: PooledConnection<'static, AsyncPgConnection>,
}

impl std::fmt::Debug for DieselTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DieselTx").finish_non_exhaustive()
    }
}

impl DieselTx {
    /// The connection, inside the transaction.
    pub fn conn(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

impl std::ops::Deref for DieselTx {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for DieselTx {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

#[derive(QueryableByName)]
struct Identity {
    #[diesel(sql_type = diesel::sql_types::Text)]
    identity: String,
}

impl DieselStore {
    /// A store whose projections' transactions run on `pool`, and everything else on `pg`.
    ///
    /// Both must reach the same database and resolve the same tables (same search path): the
    /// commit checks ownership against the rows coordination writes. This is checked here, and a
    /// mismatch is `Misconfigured`.
    pub async fn open(pg: PgStore, pool: DieselPool) -> StoreResult<Self> {
        use diesel_async::RunQueryDsl;
        let fencing = pg.fencing();
        let sql = fencing.identity_sql();
        let ours: String = sqlx::query_scalar(sql)
            .fetch_one(pg.pool())
            .await
            .map_err(|e| orchestrator_postgres::classify_error("open the diesel store", e))?;
        let mut conn =
            pool.get().await.map_err(|e| error::classify_pool("open the diesel store", e))?;
        let theirs = diesel::sql_query(sql)
            .get_result::<Identity>(&mut *conn)
            .await
            .map_err(|e| classify_error("open the diesel store", e))?
            .identity;
        drop(conn);
        if ours != theirs || ours.ends_with("/missing") {
            return Err(StoreError::Misconfigured {
                message: format!(
                    "the diesel pool and the PostgreSQL store must reach the same tables: \
                     the store's slots table is {ours}, the diesel pool's {theirs} \
                     (database/table oid; check the URL and the search_path)"
                ),
                source: None,
            });
        }
        Ok(Self { pg, pool, fencing })
    }

    /// Connects a pool of at most `max_connections` diesel-async connections to `url`, each with
    /// [`SESSION_SETTINGS`], a 5 s wait for a free connection, and no test query on checkout
    /// (a connection found closed is dropped when it comes back).
    pub async fn connect_pool(url: &str, max_connections: u32) -> StoreResult<DieselPool> {
        Self::connect_pool_with(url, max_connections, &[]).await
    }

    /// [`DieselStore::connect_pool`] with more session settings (`set_config(name, value)` on
    /// each new connection, after [`SESSION_SETTINGS`], so they can override them), such as a
    /// `search_path` or an `application_name`.
    pub async fn connect_pool_with(
        url: &str,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> StoreResult<DieselPool> {
        use diesel_async::RunQueryDsl;
        let settings: Vec<(String, String)> = SESSION_SETTINGS
            .iter()
            .chain(settings)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        config.custom_setup = Box::new(move |url| {
            let url = url.to_owned();
            let settings = settings.clone();
            Box::pin(async move {
                let mut conn = AsyncPgConnection::establish(&url).await?;
                for (name, value) in &settings {
                    diesel::sql_query("SELECT set_config($1, $2, false)")
                        .bind::<diesel::sql_types::Text, _>(name)
                        .bind::<diesel::sql_types::Text, _>(value)
                        .execute(&mut conn)
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                }
                Ok(conn)
            })
        });
        let manager = AsyncDieselConnectionManager::new_with_config(url, config);
        DieselPool::builder()
            .max_size(max_connections.max(1))
            .connection_timeout(Duration::from_secs(5))
            .test_on_check_out(false)
            .build(manager)
            .await
            .map_err(|e| {
                error::classify_pool(
                    "connect to PostgreSQL",
                    diesel_async::pooled_connection::bb8::RunError::User(e),
                )
            })
    }

    /// The PostgreSQL store everything but the projections' transactions goes through.
    pub fn pg(&self) -> &PgStore {
        &self.pg
    }

    /// The diesel pool, for the application's own queries.
    pub fn pool(&self) -> &DieselPool {
        &self.pool
    }

    /// Listens for the store's notifications (see `PgStore::change_feed`).
    pub async fn change_feed(&self) -> StoreResult<PgChangeFeed> {
        self.pg.change_feed().await
    }

    async fn finish(
        &self,
        mut tx: DieselTx,
        what: &str,
        checked: StoreResult<()>,
    ) -> StoreResult<()> {
        let conn = &mut *tx.conn;
        match checked {
            Ok(()) => AnsiTransactionManager::commit_transaction(conn)
                .await
                .map_err(|e| classify_error(what, e)),
            Err(err) => {
                // A failed rollback leaves the connection in a transaction: the pool drops it.
                let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                Err(err)
            }
        }
    }
}

#[async_trait]
impl CheckpointStore for DieselStore {
    type Tx = DieselTx;

    async fn load(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<BTreeMap<Slot, Position>> {
        self.pg.load(replica_set, projection, slots).await
    }

    fn is_store_failure(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        crate::error::is_store_failure(error)
    }

    async fn begin(&self) -> StoreResult<DieselTx> {
        let what = "begin a transaction";
        let mut conn = self.pool.get_owned().await.map_err(|e| error::classify_pool(what, e))?;
        AnsiTransactionManager::begin_transaction(&mut *conn)
            .await
            .map_err(|e| classify_error(what, e))?;
        Ok(DieselTx { conn })
    }

    async fn commit(
        &self,
        mut tx: DieselTx,
        fence: &Fence,
        projection: &str,
        checkpoints: &BTreeMap<Slot, Position>,
    ) -> StoreResult<()> {
        let checked = self.fencing.commit(&mut tx, fence, projection, checkpoints).await;
        self.finish(tx, "commit checkpoints", checked).await
    }

    async fn projections(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<String>> {
        self.pg.projections(replica_set).await
    }

    async fn remove(&self, replica_set: &ReplicaSetName, projection: &str) -> StoreResult<()> {
        self.pg.remove(replica_set, projection).await
    }

    async fn stop_projection(
        &self,
        replica_set: &ReplicaSetName,
        stop: &orchestrator_core::ports::ProjectionStop,
    ) -> StoreResult<()> {
        self.pg.stop_projection(replica_set, stop).await
    }

    async fn stopped_projections(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<Vec<orchestrator_core::ports::StoppedProjection>> {
        self.pg.stopped_projections(replica_set).await
    }

    async fn resume_projection(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<bool> {
        self.pg.resume_projection(replica_set, projection).await
    }

    async fn reset(
        &self,
        mut tx: DieselTx,
        replica_set: &ReplicaSetName,
        projection: &str,
    ) -> StoreResult<()> {
        let checked = self.fencing.reset(&mut tx, replica_set, projection).await;
        self.finish(tx, "reset a projection", checked).await
    }
}

/// Dead letters: parking and resolving happen in the projection's transaction, so they run the
/// PostgreSQL adapter's statements (`Fencing::park`, `Fencing::resolve`) on the diesel connection;
/// everything else is the PostgreSQL store's.
#[async_trait]
impl DeadLetterStore for DieselStore {
    async fn park(
        &self,
        tx: &mut DieselTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        self.fencing.park(tx, replica_set, projection, letters).await
    }

    async fn parked_keys(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<Vec<(Slot, String)>> {
        self.pg.parked_keys(replica_set, projection, slots).await
    }

    async fn dead_letters(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
    ) -> StoreResult<Vec<DeadLetter>> {
        self.pg.dead_letters(replica_set, filter).await
    }

    async fn dead_letter_counts(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<BTreeMap<String, u64>> {
        self.pg.dead_letter_counts(replica_set).await
    }

    async fn request(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.pg.request(replica_set, filter, action).await
    }

    async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>> {
        self.pg.requests(replica_set).await
    }

    async fn parked_events(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>> {
        self.pg.parked_events(replica_set, projection, key).await
    }

    async fn resolve(
        &self,
        tx: &mut DieselTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.fencing.resolve(tx, replica_set, projection, key, action).await
    }
}

#[async_trait]
impl EventStore for DieselStore {
    fn slot_count(&self) -> SlotCount {
        self.pg.slot_count()
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        self.pg.append(stream, expected, events).await
    }

    async fn append_with_key<'k>(
        &self,
        stream: &StreamId,
        key: Option<&'k PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<Appended> {
        self.pg.append_with_key(stream, key, expected, events).await
    }

    async fn read_stream(&self, stream: &StreamId, from_version: u64) -> StoreResult<Vec<Event>> {
        self.pg.read_stream(stream, from_version).await
    }

    async fn read(&self, request: &ReadRequest) -> StoreResult<Vec<Event>> {
        self.pg.read(request).await
    }

    async fn backlog(&self, request: &ReadRequest) -> StoreResult<Backlog> {
        self.pg.backlog(request).await
    }

    async fn read_horizon_stall(&self) -> StoreResult<Option<Duration>> {
        self.pg.read_horizon_stall().await
    }
}

/// Units of work stay on sqlx: the application's appends and rows share `PgUnitOfWork`'s
/// transaction.
#[async_trait]
impl UnitOfWorkStore for DieselStore {
    type UnitOfWork = PgUnitOfWork;

    async fn begin_unit_of_work(&self, streams: &[StreamId]) -> StoreResult<PgUnitOfWork> {
        self.pg.begin_unit_of_work(streams).await
    }
}

#[async_trait]
impl CoordinationStore for DieselStore {
    async fn register(
        &self,
        replica_set: &ReplicaSetName,
        slot_count: SlotCount,
        worker: &WorkerId,
    ) -> StoreResult<Incarnation> {
        self.pg.register(replica_set, slot_count, worker).await
    }

    async fn heartbeat(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        lease: Duration,
    ) -> StoreResult<HeartbeatAck> {
        self.pg.heartbeat(replica_set, worker, incarnation, lease).await
    }

    async fn snapshot(&self, replica_set: &ReplicaSetName) -> StoreResult<Snapshot> {
        self.pg.snapshot(replica_set).await
    }

    async fn create_generation(
        &self,
        replica_set: &ReplicaSetName,
        plan: &GenerationPlan,
    ) -> StoreResult<()> {
        self.pg.create_generation(replica_set, plan).await
    }

    async fn release_slot(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        slot: Slot,
        epoch: Epoch,
    ) -> StoreResult<()> {
        self.pg.release_slot(replica_set, worker, slot, epoch).await
    }

    async fn ack_generation(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
        generation: Generation,
    ) -> StoreResult<()> {
        self.pg.ack_generation(replica_set, worker, incarnation, generation).await
    }

    async fn deregister(
        &self,
        replica_set: &ReplicaSetName,
        worker: &WorkerId,
        incarnation: Incarnation,
    ) -> StoreResult<()> {
        self.pg.deregister(replica_set, worker, incarnation).await
    }

    async fn recent_generations(
        &self,
        replica_set: &ReplicaSetName,
        limit: usize,
    ) -> StoreResult<Vec<orchestrator_core::ports::GenerationRecord>> {
        self.pg.recent_generations(replica_set, limit).await
    }
}
