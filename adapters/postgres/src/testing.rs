//! An isolated PostgreSQL schema per test, for this crate's tests and for users' own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use orchestrator_core::{SlotCount, TablePrefix};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::{PgStore, migrate};

/// The server tests use when `ORCH_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A migrated store in a schema of its own, dropped by [`TestSchema::drop_schema`]. Its sessions end
/// transactions left idle for 3 s, so a frozen test worker cannot stall the others for long.
#[derive(Debug)]
pub struct TestSchema {
    /// The store under test.
    pub store: PgStore,
    /// Its pool (search path set to the schema).
    pub pool: PgPool,
    /// The schema's name.
    pub schema: String,
    admin: PgPool,
}

impl TestSchema {
    /// Creates a fresh schema on the server at `ORCH_TEST_POSTGRES_URL` (or [`DEFAULT_TEST_URL`])
    /// and migrates it with `slot_count` slots.
    ///
    /// When the server cannot be reached this prints why and returns `None`, so the test skips;
    /// with `REQUIRE_POSTGRES=1` (set by CI) it panics instead.
    pub async fn start(slot_count: SlotCount) -> Option<Self> {
        let url =
            std::env::var("ORCH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned());
        let required = std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        match Self::try_start(&url, slot_count).await {
            Ok(schema) => Some(schema),
            Err(err) if required => {
                panic!("PostgreSQL is required (REQUIRE_POSTGRES=1) but {url} failed: {err}")
            }
            Err(err) => {
                eprintln!(
                    "\n*** SKIPPING PostgreSQL test: {url} is not usable ({err}).\n\
                     *** Set ORCH_TEST_POSTGRES_URL to a reachable server, or REQUIRE_POSTGRES=1 to fail instead.\n"
                );
                None
            }
        }
    }

    async fn try_start(
        url: &str,
        slot_count: SlotCount,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
        let schema = format!(
            "orch_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let options: PgConnectOptions = url.parse()?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await?;
        let pool = PgStore::pool_options(8)
            .connect_with(
                PgStore::tune_with(options, std::time::Duration::from_secs(3))
                    .options([("search_path", schema.as_str())])
                    .application_name(&schema),
            )
            .await?;
        migrate(&pool, &TablePrefix::default(), slot_count).await?;
        let store = PgStore::open(pool.clone(), TablePrefix::default()).await?;
        Ok(Self { store, pool, schema, admin })
    }

    /// Terminates every server session of this schema's pool, as a database restart or failover
    /// would; returns how many were ended.
    pub async fn kill_connections(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) AS t",
        )
        .bind(&self.schema)
        .fetch_one(&self.admin)
        .await
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) {
        self.pool.close().await;
        let _ =
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema)).execute(&self.admin).await;
        self.admin.close().await;
    }
}
