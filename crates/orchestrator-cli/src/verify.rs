//! `demo verify`: compares the `demo_audit` table with the events table (SPEC §7): every event
//! applied exactly once per demo projection, in per-aggregate order.

use anyhow::Result;

use crate::db::Database;
use crate::demo::PROJECTIONS;

/// Per projection: rows, rows applied exactly once, distinct workers.
type ProjectionCount = (String, i64, i64, i64);

/// Projection, aggregate, version, and the version handled just before it in that aggregate.
type HandledVersion = (String, String, i64, Option<i64>);

/// What `demo verify` found.
pub(crate) struct Verdict {
    appended: i64,
    per_projection: Vec<ProjectionCount>,
    out_of_order: Vec<String>,
}

impl Verdict {
    pub(crate) fn passed(&self) -> bool {
        self.out_of_order.is_empty()
            && self.per_projection.len() == PROJECTIONS.len()
            && self
                .per_projection
                .iter()
                .all(|(_, rows, once, _)| *rows == self.appended && *once == self.appended)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events appended: {}", self.appended)?;
        for (projection, rows, once, workers) in &self.per_projection {
            writeln!(f, "{projection}: {rows} applied, {once} exactly once, by {workers} workers")?;
        }
        for problem in &self.out_of_order {
            writeln!(f, "out of order: {problem}")?;
        }
        write!(
            f,
            "verdict: {}",
            if self.passed() {
                "PASS - every event took effect exactly once, in per-aggregate order"
            } else {
                "FAIL"
            }
        )
    }
}

/// Compares demo_audit with the events table: each event applied exactly once per projection,
/// and within each aggregate, handling order (`handled_seq`) follows the versions.
pub(crate) async fn verify(
    db: &Database,
    prefix: &orchestrator_core::TablePrefix,
) -> Result<Verdict> {
    let count_events = format!("SELECT count(*) FROM {prefix}events");
    const PER_PROJECTION: &str = "SELECT projection, count(*), sum(CASE WHEN times = 1 THEN 1 ELSE 0 END), \
         count(DISTINCT worker_id) FROM demo_audit GROUP BY projection ORDER BY projection";
    const ORDER: &str = "SELECT projection, aggregate_id, aggregate_version, \
         LAG(aggregate_version) OVER (PARTITION BY projection, aggregate_id ORDER BY handled_seq) AS previous \
         FROM demo_audit";
    let (appended, per_projection, versions): (i64, Vec<ProjectionCount>, Vec<HandledVersion>) =
        match db {
            Database::Postgres(store) => (
                sqlx::query_scalar(&count_events).fetch_one(store.pool()).await?,
                sqlx::query_as(PER_PROJECTION).fetch_all(store.pool()).await?,
                sqlx::query_as(ORDER).fetch_all(store.pool()).await?,
            ),
            Database::Sqlite(store) => (
                sqlx::query_scalar(&count_events).fetch_one(store.pool()).await?,
                sqlx::query_as(PER_PROJECTION).fetch_all(store.pool()).await?,
                sqlx::query_as(ORDER).fetch_all(store.pool()).await?,
            ),
        };
    let out_of_order = versions
        .into_iter()
        .filter(|(_, _, version, previous)| *version != previous.unwrap_or(0) + 1)
        .map(|(projection, aggregate, version, previous)| {
            format!(
                "{projection} {aggregate}: version {version} handled after {}",
                previous.unwrap_or(0)
            )
        })
        .take(20)
        .collect();
    Ok(Verdict { appended, per_projection, out_of_order })
}
