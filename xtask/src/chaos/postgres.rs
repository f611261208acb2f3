//! The PostgreSQL side of a chaos run: its own database, connection kills, server restarts and
//! lock diagnostics, through `psql` and `pg_ctlcluster`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use url::Url;

/// The server when `ORCH_CHAOS_POSTGRES_URL` is not set (a URL without a database).
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Where Debian keeps its PostgreSQL clusters (`/etc/postgresql/<version>/<cluster>`).
const CLUSTERS: &str = "/etc/postgresql";

/// The run's database on the server.
#[derive(Debug, Clone)]
pub(crate) struct Postgres {
    /// The server's `postgres` database, for administration.
    admin: String,
    /// The run's database name.
    pub(crate) database: String,
    /// The run's database URL.
    pub(crate) url: String,
    /// The local cluster `pg_ctlcluster` restarts: (version, name).
    cluster: (String, String),
}

impl Postgres {
    /// Drops and creates `orch_chaos_<seed>` on the server of `ORCH_CHAOS_POSTGRES_URL`.
    pub(crate) fn create(seed: u64) -> Result<Self> {
        let server =
            std::env::var("ORCH_CHAOS_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_SERVER.into());
        let cluster = local_cluster(Path::new(CLUSTERS))?;
        let database = format!("orch_chaos_{seed}");
        let admin = with_database(&server, "postgres")?;
        psql(&admin, &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))?;
        psql(&admin, &format!("CREATE DATABASE {database}"))?;
        let url = with_database(&server, &database)?;
        Ok(Self { admin, database, url, cluster })
    }

    /// Terminates every connection to the run's database; how many there were.
    pub(crate) fn terminate_connections(&self) -> Result<String> {
        let killed = psql(
            &self.admin,
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.database
            ),
        )?;
        Ok(killed.trim().to_owned())
    }

    /// Restarts the server (every connection drops; it is down while it restarts), waiting
    /// until it accepts connections again; how long that took.
    pub(crate) fn restart_server(&self) -> Result<Duration> {
        let started = Instant::now();
        let (version, name) = &self.cluster;
        let output = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", version, name, "restart"])
            .output()
            .context("cannot run pg_ctlcluster (needed for PostgreSQL restarts)")?;
        if !output.status.success() {
            bail!(
                "pg_ctlcluster {version} {name} restart failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        while psql(&self.admin, "SELECT 1").is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("PostgreSQL did not come back within 60 s of its restart");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(started.elapsed())
    }

    /// The sessions of the run's database waiting on a lock, and on whom (a stopped worker in
    /// the middle of a transaction holds its locks while stopped).
    pub(crate) fn waiting_on_locks(&self) -> Option<String> {
        let database = &self.database;
        let waiting = psql(
            &self.admin,
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
            &self.admin,
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

    /// `sql`'s result as psql prints a table (for the evidence of a failed run).
    pub(crate) fn table(&self, sql: &str) -> std::io::Result<String> {
        Command::new("psql").args(["-X", "-d", &self.url, "-c", sql]).output().map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
    }
}

/// `server` (a URL with or without a database) pointing at `database`, the rest kept.
fn with_database(server: &str, database: &str) -> Result<String> {
    let mut url = Url::parse(server)
        .with_context(|| format!("ORCH_CHAOS_POSTGRES_URL {server:?} is not a URL"))?;
    if url.cannot_be_a_base() || !matches!(url.scheme(), "postgres" | "postgresql") {
        bail!("ORCH_CHAOS_POSTGRES_URL {server:?}: expected postgres://user@host:port");
    }
    url.set_path(database);
    Ok(url.into())
}

/// The newest cluster under `dir` (`<version>/<name>`, `main` preferred), like `.ci/run` picks.
fn local_cluster(dir: &Path) -> Result<(String, String)> {
    let versions = std::fs::read_dir(dir)
        .with_context(|| format!("no local PostgreSQL clusters in {} to restart", dir.display()))?;
    let mut versions: Vec<(Vec<u64>, String)> = versions
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name.split('.').map(|n| n.parse().ok()).collect::<Option<Vec<u64>>>()?;
            Some((key, name))
        })
        .collect();
    versions.sort();
    let (_, version) =
        versions.pop().with_context(|| format!("no PostgreSQL version under {}", dir.display()))?;
    let name = if dir.join(&version).join("main").is_dir() {
        "main".to_owned()
    } else {
        std::fs::read_dir(dir.join(&version))?
            .flatten()
            .find(|e| e.path().is_dir())
            .and_then(|e| e.file_name().into_string().ok())
            .with_context(|| format!("no PostgreSQL cluster under {}/{version}", dir.display()))?
    };
    Ok((version, name))
}

/// Runs one statement, unaligned and without headers; its output.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgresql://h:5433/", "x").unwrap(), "postgresql://h:5433/x");
        assert!(with_database("127.0.0.1:5432", "x").is_err());
        assert!(with_database("mysql://h/db", "x").is_err());
    }

    #[test]
    fn the_newest_local_cluster() {
        let dir = std::env::temp_dir().join(format!("xtask-clusters-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for path in ["9.6/main", "15/main", "15/other", "13/main", "notes"] {
            std::fs::create_dir_all(dir.join(path)).unwrap();
        }
        assert_eq!(local_cluster(&dir).unwrap(), ("15".to_owned(), "main".to_owned()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(local_cluster(&dir).is_err());
    }
}
