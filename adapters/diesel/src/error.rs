//! Mapping of diesel, diesel-async and bb8 errors onto the ports' `StoreError`, by the rules of the
//! PostgreSQL adapter's `classify_error`: transient failures are `Unavailable` (retried), setup
//! mistakes `Misconfigured`, everything else `Other`.

use diesel::result::{ConnectionError, DatabaseErrorKind, Error};
use diesel_async::pooled_connection::PoolError;
use diesel_async::pooled_connection::bb8::RunError;
use orchestrator_core::ports::StoreError;

/// Messages of transient server errors diesel reports as `DatabaseErrorKind::Unknown` (it keeps
/// no SQLSTATE): deadlock (40P01), lock timeout (55P03), server shutting down or starting
/// (57P01..57P03), too many connections (53300). PostgreSQL's messages in English, its default.
const TRANSIENT: &[&str] = &[
    "deadlock detected",
    "could not obtain lock",
    "canceling statement due to lock timeout",
    "terminating connection",
    "the database system is",
    "too many clients",
    "remaining connection slots are reserved",
];

/// Classifies a diesel error of the operation `what`. Exposed for applications that run their own
/// diesel queries next to the store and want the same retry decisions.
pub fn classify(what: &str, err: Error) -> StoreError {
    let message = format!("{what}: {err}");
    match &err {
        Error::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::SerializationFailure => StoreError::unavailable(message, err),
            DatabaseErrorKind::Unknown => {
                let text = info.message();
                if TRANSIENT.iter().any(|t| text.contains(t)) {
                    StoreError::unavailable(message, err)
                } else if text.contains("does not exist") && !text.contains("savepoint") {
                    StoreError::Misconfigured {
                        message: format!(
                            "{message} (the schema is missing or old: run `orchestrator migrate`)"
                        ),
                        source: Some(err.into()),
                    }
                } else if text.contains("authentication failed")
                    || text.contains("permission denied")
                {
                    StoreError::Misconfigured { message, source: Some(err.into()) }
                } else {
                    StoreError::other(message, err)
                }
            }
            _ => StoreError::other(message, err),
        },
        // The connection's transaction state was lost (a query cancelled mid-flight): the pool
        // drops that connection; another one may work.
        Error::BrokenTransactionManager => StoreError::unavailable(message, err),
        _ => StoreError::other(message, err),
    }
}

/// Classifies a failure to establish a connection.
pub(crate) fn classify_connect(what: &str, err: ConnectionError) -> StoreError {
    match err {
        ConnectionError::CouldntSetupConfiguration(inner) => classify(what, inner),
        ConnectionError::InvalidConnectionUrl(_) => StoreError::Misconfigured {
            message: format!("{what}: {err}"),
            source: Some(err.into()),
        },
        other => StoreError::unavailable(format!("{what}: {other}"), other),
    }
}

/// Classifies a failure to get a connection from the pool.
pub(crate) fn classify_pool(what: &str, err: RunError) -> StoreError {
    match err {
        RunError::User(PoolError::ConnectionError(e)) => classify_connect(what, e),
        RunError::User(PoolError::QueryError(e)) => classify(what, e),
        RunError::TimedOut => StoreError::Unavailable {
            message: format!("{what}: timed out waiting for a diesel connection"),
            source: None,
        },
    }
}
