//! Mapping of sqlx/SQLite errors onto the ports' `StoreError`, in one place.

use orchestrator_core::ports::{ErrorKind as Kind, StoreError};

/// What kind of failure an sqlx error is.
fn kind(err: &sqlx::Error) -> Kind {
    match err {
        sqlx::Error::Database(db) => {
            // Primary result code is the low byte of the extended code.
            let primary = db.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
            let text = db.message();
            if matches!(primary, Some(5 | 6)) {
                // SQLITE_BUSY / SQLITE_LOCKED: another writer holds the database.
                Kind::Transient
            } else if text.contains("no such table") || text.contains("no such column") {
                Kind::MissingSchema
            } else if matches!(primary, Some(14 | 23 | 26)) {
                // CANTOPEN, AUTH, NOTADB: the file is not usable as a database.
                Kind::Misconfigured
            } else {
                Kind::Other
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Kind::Transient,
        sqlx::Error::Configuration(_) => Kind::Misconfigured,
        _ => Kind::Other,
    }
}

/// Classifies an sqlx error of the operation `what` as a port error: a busy or locked database
/// and pool timeouts become `Unavailable`, a missing schema or unusable file `Misconfigured`.
/// Exposed for applications that run their own queries next to the store.
pub fn classify(what: &str, err: sqlx::Error) -> StoreError {
    StoreError::classified(kind(&err), format!("{what}: {err}"), err)
}

/// Whether `error` or one of its sources is a transient store failure: a retryable
/// `StoreError`, or an sqlx error that [`classify`] would call `Unavailable` (a busy database
/// met by a handler's own query).
pub(crate) fn is_store_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    orchestrator_core::ports::is_store_failure_of::<sqlx::Error>(error, kind)
}

/// Whether `err` is a unique violation mentioning `column`.
pub(crate) fn is_unique_violation_on(err: &sqlx::Error, column: &str) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation() && db.message().contains(column))
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
