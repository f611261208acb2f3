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
    if is_transient(&err) {
        return StoreError::unavailable(message, err);
    }
    let Error::DatabaseError(DatabaseErrorKind::Unknown, info) = &err else {
        return StoreError::other(message, err);
    };
    let text = info.message();
    if text.contains("does not exist") && !text.contains("savepoint") {
        StoreError::Misconfigured {
            message: format!(
                "{message} (the schema is missing or old: run `orchestrator migrate`)"
            ),
            source: Some(err.into()),
        }
    } else if text.contains("authentication failed") || text.contains("permission denied") {
        StoreError::Misconfigured { message, source: Some(err.into()) }
    } else {
        StoreError::other(message, err)
    }
}

/// Whether retrying may succeed: a lost or closed connection, a serialization failure, one of the
/// transient server errors of [`TRANSIENT`], or a transaction state lost with a cancelled query
/// (the pool drops that connection; another one may work).
fn is_transient(err: &Error) -> bool {
    match err {
        Error::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::SerializationFailure,
            _,
        ) => true,
        Error::DatabaseError(DatabaseErrorKind::Unknown, info) => {
            TRANSIENT.iter().any(|t| info.message().contains(t))
        }
        Error::BrokenTransactionManager => true,
        _ => false,
    }
}

/// Whether `error` or one of its sources is a transient store failure: a retryable
/// `StoreError`, or a diesel error [`classify`] would call `Unavailable` (a handler's own diesel
/// query meeting a lost connection or a serialization failure).
pub(crate) fn is_store_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    use orchestrator_core::ports::ErrorKind;
    orchestrator_core::ports::is_store_failure_of::<Error>(error, |e| {
        if is_transient(e) { ErrorKind::Transient } else { ErrorKind::Other }
    })
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
