//! Mapping of sqlx/PostgreSQL errors onto the ports' `StoreError`, in one place.

use orchestrator_core::ports::StoreError;

/// SQLSTATEs after which the same call may succeed later: serialization failure, deadlock, lock
/// timeout, server shutting down or starting, too many connections, connection exceptions, and a
/// session the server ended for idling in (or overrunning) its transaction: a frozen worker's
/// commit, which is retried from the stored checkpoints like any lost connection.
const TRANSIENT: &[&str] =
    &["40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "25P03", "25P04"];

/// Classifies an sqlx error of the operation `what` as a port error: transient failures
/// (connection loss, restart, serialization failure, deadlock, pool timeout) become
/// `Unavailable`, setup mistakes (missing schema, bad credentials, unknown database, bad URL)
/// `Misconfigured`. Exposed for applications that run their own queries next to the store.
pub fn classify(what: &str, err: sqlx::Error) -> StoreError {
    let message = format!("{what}: {err}");
    match &err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if TRANSIENT.contains(&code.as_str()) || code.starts_with("08") {
                StoreError::unavailable(message, err)
            } else if matches!(code.as_str(), "42P01" | "42703" | "42883") {
                StoreError::Misconfigured {
                    message: format!(
                        "{message} (the schema is missing or old: run `orchestrator migrate`)"
                    ),
                    source: Some(err.into()),
                }
            } else if matches!(code.as_str(), "28P01" | "28000" | "3D000" | "42501") {
                StoreError::Misconfigured { message, source: Some(err.into()) }
            } else {
                StoreError::other(message, err)
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::unavailable(message, err),
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => {
            StoreError::Misconfigured { message, source: Some(err.into()) }
        }
        _ => StoreError::other(message, err),
    }
}

/// The detail of a unique violation on `constraint`, if `err` is one.
pub(crate) fn unique_violation_detail(err: &sqlx::Error, constraint: &str) -> Option<String> {
    let sqlx::Error::Database(db) = err else { return None };
    if !db.is_unique_violation() || db.constraint() != Some(constraint) {
        return None;
    }
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    Some(pg.detail().unwrap_or_default().to_owned())
}
