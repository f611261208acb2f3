//! TLS to PostgreSQL, as managed services require: a `sslmode=require` URL connects encrypted
//! (the server's `pg_stat_ssl` says so for the session's own backend), `verify-full` with
//! `sslrootcert=` verifies the server's certificate and name, and `verify-full` against a
//! certificate no known root signed is refused.
//!
//! The server must have TLS on (Debian's PostgreSQL does, with its snakeoil certificate for
//! `localhost`; `.ci/run` makes sure). `ORCH_TEST_POSTGRES_URL` is the server (default the local
//! one); `ORCH_TEST_POSTGRES_TLS_URL` the same server by the name its certificate carries (default
//! `postgres://postgres@localhost:5432/postgres`); `ORCH_TEST_POSTGRES_ROOT_CERT` the root that
//! signed it (default: the server's own `ssl_cert_file`, a self-signed certificate).

use orchestrator_postgres::PgStore;
use orchestrator_postgres::testing::DEFAULT_TEST_URL;
use sqlx::PgPool;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// The server's TLS certificate file, when it has TLS on. `None` (the test skips) when the server
/// is unreachable or has TLS off, unless CI requires PostgreSQL (`REQUIRE_POSTGRES=1`).
async fn server_certificate() -> Option<String> {
    let url = env_or("ORCH_TEST_POSTGRES_URL", DEFAULT_TEST_URL);
    let required = std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let skip = |why: String| {
        assert!(!required, "PostgreSQL with TLS is required (REQUIRE_POSTGRES=1): {why}");
        eprintln!("\n*** SKIPPING the TLS test: {why}\n");
        None
    };
    let pool = match PgStore::connect_pool(&with_param(&url, "sslmode=disable"), 1).await {
        Ok(pool) => pool,
        Err(err) => return skip(format!("{url} is not usable ({err})")),
    };
    let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&pool).await.unwrap();
    if ssl != "on" {
        return skip(format!("{url} has ssl = {ssl} (`.ci/run` turns it on)"));
    }
    let file: String = sqlx::query_scalar("SHOW ssl_cert_file").fetch_one(&pool).await.unwrap();
    let data: String = sqlx::query_scalar("SHOW data_directory").fetch_one(&pool).await.unwrap();
    pool.close().await;
    Some(if file.starts_with('/') { file } else { format!("{data}/{file}") })
}

/// Whether this session's own backend is encrypted, and with which protocol.
async fn session_tls(pool: &PgPool) -> (bool, Option<String>) {
    sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn sslmode_require_connects_encrypted() {
    let Some(_) = server_certificate().await else { return };
    let url = with_param(&env_or("ORCH_TEST_POSTGRES_URL", DEFAULT_TEST_URL), "sslmode=require");
    let pool = PgStore::connect_pool(&url, 1).await.expect("sslmode=require connects");
    let (ssl, version) = session_tls(&pool).await;
    assert!(ssl, "pg_stat_ssl says this session is not encrypted");
    assert!(version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")), "{version:?}");
    pool.close().await;
}

#[tokio::test]
async fn verify_full_checks_the_certificate_and_the_name() {
    let Some(certificate) = server_certificate().await else { return };
    let root = env_or("ORCH_TEST_POSTGRES_ROOT_CERT", &certificate);
    let server =
        env_or("ORCH_TEST_POSTGRES_TLS_URL", "postgres://postgres@localhost:5432/postgres");

    let verified = with_param(&server, &format!("sslmode=verify-full&sslrootcert={root}"));
    let pool =
        PgStore::connect_pool(&verified, 1).await.expect("verify-full with the root connects");
    assert!(session_tls(&pool).await.0, "pg_stat_ssl says this session is not encrypted");
    pool.close().await;

    // Without the root, only the compiled-in public roots are trusted: a self-signed or private
    // CA's certificate is refused.
    let unverifiable = with_param(&server, "sslmode=verify-full");
    let err =
        PgStore::connect_pool(&unverifiable, 1).await.expect_err("an unknown issuer is refused");
    let text = err.to_string();
    assert!(
        text.to_lowercase().contains("certificate") || text.to_lowercase().contains("tls"),
        "expected a certificate error: {text}"
    );
}
