//! Mapping of sqlx/SQLite errors onto the ports' `StoreError`, in one place.

use orchestrator_core::ports::StoreError;

/// Classifies an sqlx error of the operation `what` as a port error: a busy or locked database
/// and pool timeouts become `Unavailable`, a missing schema or unusable file `Misconfigured`.
/// Exposed for applications that run their own queries next to the store.
pub fn classify(what: &str, err: sqlx::Error) -> StoreError {
    let message = format!("{what}: {err}");
    match &err {
        sqlx::Error::Database(db) => {
            // Primary result code is the low byte of the extended code.
            let primary = db.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
            let text = db.message();
            if matches!(primary, Some(5 | 6)) {
                // SQLITE_BUSY / SQLITE_LOCKED: another writer holds the database.
                StoreError::unavailable(message, err)
            } else if text.contains("no such table") || text.contains("no such column") {
                StoreError::Misconfigured {
                    message: format!(
                        "{message} (the schema is missing or old: run `orchestrator migrate`)"
                    ),
                    source: Some(err.into()),
                }
            } else if matches!(primary, Some(14 | 23 | 26)) {
                // CANTOPEN, AUTH, NOTADB: the file is not usable as a database.
                StoreError::Misconfigured { message, source: Some(err.into()) }
            } else {
                StoreError::other(message, err)
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::unavailable(message, err),
        sqlx::Error::Configuration(_) => {
            StoreError::Misconfigured { message, source: Some(err.into()) }
        }
        _ => StoreError::other(message, err),
    }
}

/// Whether `err` is a unique violation mentioning `column`.
pub(crate) fn is_unique_violation_on(err: &sqlx::Error, column: &str) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation() && db.message().contains(column))
}
