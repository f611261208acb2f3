//! Mapping of sqlx/PostgreSQL errors onto the ports' `StoreError`, in one place.

use orchestrator_core::ports::{ErrorKind as Kind, StoreError};

/// SQLSTATEs after which the same call may succeed later: serialization failure, deadlock, lock
/// timeout, server shutting down or starting, too many connections, connection exceptions, and a
/// session the server ended for idling in (or overrunning) its transaction: a frozen worker's
/// commit, which is retried from the stored checkpoints like any lost connection.
const TRANSIENT: &[&str] =
    &["40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300", "25P03", "25P04"];

/// What kind of failure an sqlx error is.
fn kind(err: &sqlx::Error) -> Kind {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if TRANSIENT.contains(&code.as_str()) || code.starts_with("08") {
                Kind::Transient
            } else if matches!(code.as_str(), "42P01" | "42703" | "42883") {
                Kind::MissingSchema
            } else if matches!(code.as_str(), "28P01" | "28000" | "3D000" | "42501") {
                Kind::Misconfigured
            } else {
                Kind::Other
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Kind::Transient,
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => Kind::Misconfigured,
        _ => Kind::Other,
    }
}

/// Classifies an sqlx error of the operation `what` as a port error: transient failures
/// (connection loss, restart, serialization failure, deadlock, pool timeout) become
/// `Unavailable`, setup mistakes (missing schema, bad credentials, unknown database, bad URL)
/// `Misconfigured`. Exposed for applications that run their own queries next to the store.
pub fn classify(what: &str, err: sqlx::Error) -> StoreError {
    StoreError::classified(kind(&err), format!("{what}: {err}"), err)
}

/// Whether `error` or one of its sources is a transient store failure: a retryable
/// `StoreError`, or an sqlx error that [`classify`] would call `Unavailable` (a handler's own
/// query meeting a lost connection, a restart, a serialization failure).
pub(crate) fn is_store_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    orchestrator_core::ports::is_store_failure_of::<sqlx::Error>(error, kind)
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

#[cfg(test)]
mod tests {
    use orchestrator_core::ports::BoxError;

    use super::*;

    /// What a handler returns when its own query fails: the driver's error, boxed, maybe wrapped.
    #[derive(Debug)]
    struct Wrapped(sqlx::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("updating the read model")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_handler_error_from_a_lost_connection_is_a_store_failure() {
        let lost: BoxError = sqlx::Error::PoolTimedOut.into();
        assert!(is_store_failure(&*lost));
        let wrapped: BoxError =
            Wrapped(sqlx::Error::Io(std::io::ErrorKind::BrokenPipe.into())).into();
        assert!(is_store_failure(&*wrapped));
        let ours: BoxError = classify("read", sqlx::Error::PoolTimedOut).into();
        assert!(is_store_failure(&*ours));
    }

    #[test]
    fn a_handler_error_of_its_own_is_not() {
        let own: BoxError = "cannot decode the payload".into();
        assert!(!is_store_failure(&*own));
        let row: BoxError = sqlx::Error::RowNotFound.into();
        assert!(!is_store_failure(&*row));
    }
}
