//! An isolated PostgreSQL schema per test with a [`DieselStore`] on it, for this crate's tests and
//! for users' own: the PostgreSQL adapter's `TestSchema` plus a diesel pool on the same schema.

use orchestrator_core::SlotCount;
use orchestrator_postgres::testing::{DEFAULT_TEST_URL, TestSchema as PgTestSchema};

use crate::{DieselPool, DieselStore};

/// A migrated store in a schema of its own, dropped by [`TestSchema::drop_schema`]. The diesel
/// connections, like the sqlx ones, end transactions left idle for 3 s and carry the schema's name
/// as `application_name` (so [`TestSchema::kill_connections`] ends them too).
#[derive(Debug)]
pub struct TestSchema {
    /// The store under test.
    pub store: DieselStore,
    /// Its diesel pool (search path set to the schema).
    pub diesel: DieselPool,
    /// The PostgreSQL adapter's test schema underneath: its `store`, its sqlx `pool`, its name.
    pub pg: PgTestSchema,
}

impl TestSchema {
    /// Creates a fresh schema on the server at `ORCH_TEST_POSTGRES_URL` (or the PostgreSQL
    /// adapter's default) and migrates it with `slot_count` slots.
    ///
    /// When the server cannot be reached this prints why and returns `None`, so the test skips;
    /// with `REQUIRE_POSTGRES=1` (set by CI) it panics instead.
    pub async fn start(slot_count: SlotCount) -> Option<Self> {
        let pg = PgTestSchema::start(slot_count).await?;
        let url =
            std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned());
        let settings = [
            ("search_path", pg.schema.as_str()),
            ("application_name", pg.schema.as_str()),
            ("idle_in_transaction_session_timeout", "3s"),
        ];
        let diesel = DieselStore::connect_pool_with(&url, 8, &settings)
            .await
            .unwrap_or_else(|e| panic!("the diesel pool on {url} failed: {e}"));
        let store = DieselStore::open(pg.store.clone(), diesel.clone())
            .await
            .unwrap_or_else(|e| panic!("the diesel store on {url} failed: {e}"));
        Some(Self { store, diesel, pg })
    }

    /// Terminates every server session of this schema (sqlx's and diesel's), as a database
    /// restart or failover would; returns how many were ended.
    pub async fn kill_connections(&self) -> Result<i64, sqlx::Error> {
        self.pg.kill_connections().await
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) {
        drop(self.store);
        drop(self.diesel);
        self.pg.drop_schema().await;
    }
}
