//! `demo verify`: compares the `demo_audit` table with the events table : every event
//! applied exactly once per demo projection, in per-aggregate order. `--json` prints the same
//! findings as one object: `events`, `projections` (each with `name`, `applied`, `exactly_once`,
//! `duplicates`, `missing`, `order_violations`) and `verdict` (`pass` or `fail`).

use anyhow::Result;
use serde::Serialize;

use crate::db::Database;
use crate::demo::PROJECTIONS;

/// How many out-of-order handlings the report spells out (all are counted).
const SHOWN_OUT_OF_ORDER: usize = 20;

/// Per projection: rows, rows applied exactly once, rows applied more than once, distinct workers.
type ProjectionCount = (String, i64, i64, i64, i64);

/// Projection, aggregate, version, and the version handled just before it in that aggregate.
type HandledVersion = (String, String, i64, Option<i64>);

/// Per projection: events never applied.
type MissingCount = (String, i64);

/// What the four queries return.
type Queried = (i64, Vec<ProjectionCount>, Vec<HandledVersion>, Vec<MissingCount>);

/// What `demo verify` found about one projection.
#[derive(Debug, Serialize)]
pub(crate) struct ProjectionVerdict {
    name: String,
    /// Events with a `demo_audit` row: applied at least once.
    applied: i64,
    /// Events applied exactly once (`times = 1`).
    exactly_once: i64,
    /// Events applied more than once.
    duplicates: i64,
    /// Events never applied.
    missing: i64,
    /// Events handled when their aggregate's previous version was not the last one handled.
    order_violations: i64,
    /// Distinct workers that applied events.
    workers: i64,
}

impl ProjectionVerdict {
    fn passed(&self, events: i64) -> bool {
        self.applied == events && self.exactly_once == events && self.order_violations == 0
    }
}

/// Pass or fail, spelled the way the JSON form does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    Pass,
    Fail,
}

/// What `demo verify` found.
#[derive(Debug, Serialize)]
pub(crate) struct Verdict {
    /// Events in the events table.
    events: i64,
    projections: Vec<ProjectionVerdict>,
    /// The first out-of-order handlings, as `<projection> <aggregate>: version V handled after P`.
    out_of_order: Vec<String>,
    verdict: Outcome,
}

impl Verdict {
    pub(crate) fn passed(&self) -> bool {
        self.verdict == Outcome::Pass
    }

    pub(crate) fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events appended: {}", self.events)?;
        for p in &self.projections {
            write!(
                f,
                "{}: {} applied, {} exactly once, by {} workers",
                p.name, p.applied, p.exactly_once, p.workers
            )?;
            if p.duplicates > 0 || p.missing > 0 || p.order_violations > 0 {
                write!(
                    f,
                    " ({} applied more than once, {} missing, {} out of order)",
                    p.duplicates, p.missing, p.order_violations
                )?;
            }
            writeln!(f)?;
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
    const PER_PROJECTION: &str = "SELECT projection, count(*), \
         sum(CASE WHEN times = 1 THEN 1 ELSE 0 END), sum(CASE WHEN times > 1 THEN 1 ELSE 0 END), \
         count(DISTINCT worker_id) FROM demo_audit GROUP BY projection ORDER BY projection";
    const ORDER: &str = "SELECT projection, aggregate_id, aggregate_version, \
         LAG(aggregate_version) OVER (PARTITION BY projection, aggregate_id ORDER BY handled_seq) AS previous \
         FROM demo_audit";
    let names = PROJECTIONS.map(|name| format!("('{name}')")).join(", ");
    let missing = format!(
        "WITH p(name) AS (VALUES {names}) SELECT p.name, count(*) FROM {prefix}events e CROSS JOIN p \
         WHERE NOT EXISTS (SELECT 1 FROM demo_audit a \
         WHERE a.projection = p.name AND a.global_position = e.global_position) GROUP BY p.name"
    );
    let (events, counts, versions, missing): Queried = match db {
        Database::Postgres(store) => (
            sqlx::query_scalar(&count_events).fetch_one(store.pool()).await?,
            sqlx::query_as(PER_PROJECTION).fetch_all(store.pool()).await?,
            sqlx::query_as(ORDER).fetch_all(store.pool()).await?,
            sqlx::query_as(&missing).fetch_all(store.pool()).await?,
        ),
        Database::Sqlite(store) => (
            sqlx::query_scalar(&count_events).fetch_one(store.pool()).await?,
            sqlx::query_as(PER_PROJECTION).fetch_all(store.pool()).await?,
            sqlx::query_as(ORDER).fetch_all(store.pool()).await?,
            sqlx::query_as(&missing).fetch_all(store.pool()).await?,
        ),
    };
    let out_of_order: Vec<HandledVersion> = versions
        .into_iter()
        .filter(|(_, _, version, previous)| *version != previous.unwrap_or(0) + 1)
        .collect();
    let mut names: Vec<&str> = PROJECTIONS.to_vec();
    names.extend(counts.iter().map(|c| c.0.as_str()).filter(|name| !PROJECTIONS.contains(name)));
    let projections: Vec<ProjectionVerdict> = names
        .into_iter()
        .map(|name| {
            let (applied, exactly_once, duplicates, workers) =
                counts.iter().find(|c| c.0 == name).map_or((0, 0, 0, 0), |c| (c.1, c.2, c.3, c.4));
            ProjectionVerdict {
                name: name.to_owned(),
                applied,
                exactly_once,
                duplicates,
                missing: missing.iter().find(|m| m.0 == name).map_or(0, |m| m.1),
                order_violations: out_of_order.iter().filter(|v| v.0 == name).count() as i64,
                workers,
            }
        })
        .collect();
    let verdict =
        if projections.iter().all(|p| p.passed(events)) { Outcome::Pass } else { Outcome::Fail };
    let out_of_order = out_of_order
        .into_iter()
        .take(SHOWN_OUT_OF_ORDER)
        .map(|(projection, aggregate, version, previous)| {
            format!(
                "{projection} {aggregate}: version {version} handled after {}",
                previous.unwrap_or(0)
            )
        })
        .collect();
    Ok(Verdict { events, projections, out_of_order, verdict })
}
