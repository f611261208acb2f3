//! Opening a transaction that a cancelled caller cannot leak into the pool.
//!
//! sqlx's `Pool::begin` is not cancel-safe on PostgreSQL (0.8 and 0.9): it counts the transaction
//! only once `BEGIN`'s reply has been read, so a future dropped while `BEGIN` is in flight (an
//! aborted task, a `select!` or a timeout around a store call) returns its connection to the pool
//! inside a transaction nothing will end. The next borrower's statements then run in it: after a
//! `READ ONLY` snapshot its appends fail, after a plain one its autocommit statements commit only
//! with someone else's `COMMIT`, and the locks they take are held until then.
//!
//! Here the `BEGIN` runs in a task of its own: a caller that goes away leaves the task to finish,
//! and the transaction it opened is then dropped whole, which sqlx does roll back.

use std::borrow::Cow;

use sqlx::{PgPool, Postgres, Transaction};

/// Begins a transaction on a connection of `pool`, with `statement` (a `BEGIN ...`) or a plain
/// `BEGIN`; cancel-safe (see the module docs).
pub(crate) async fn begin(
    pool: &PgPool,
    statement: Option<&'static str>,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    let opening = tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(Cow::Borrowed(statement)).await,
            None => pool.begin().await,
        }
    });
    match opening.await {
        Ok(opened) => opened,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Only a runtime shutting down cancels the task.
        Err(_) => Err(sqlx::Error::PoolClosed),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::postgres::PgPoolOptions;

    use crate::testing::TestSchema;

    /// Whether the pool's (only) connection is inside a transaction: two statements in a row
    /// then run in the same (virtual) transaction.
    async fn in_a_leaked_transaction(pool: &sqlx::PgPool) -> bool {
        let transaction = || {
            sqlx::query_scalar::<_, String>(
                "SELECT virtualtransaction FROM pg_locks \
                 WHERE pid = pg_backend_pid() AND locktype = 'virtualxid'",
            )
            .fetch_one(pool)
        };
        transaction().await.unwrap() == transaction().await.unwrap()
    }

    /// A caller dropped while `BEGIN` is in flight (the statement holds its reply back for
    /// 300 ms) must not leave the connection in the transaction for the next borrower.
    #[tokio::test]
    async fn a_begin_cancelled_in_flight_leaves_no_transaction_behind() {
        let Some(schema) = TestSchema::start(orchestrator_core::SlotCount::default()).await else {
            return;
        };
        let single = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(schema.pool.connect_options().as_ref().clone())
            .await
            .unwrap();
        assert!(
            !in_a_leaked_transaction(&single).await,
            "a clean connection looked like one in a transaction"
        );
        let slow_begin = "BEGIN READ ONLY; SELECT pg_sleep(0.3)";
        let cancelled = tokio::time::timeout(
            Duration::from_millis(100),
            super::begin(&single, Some(slow_begin)),
        )
        .await;
        assert!(cancelled.is_err(), "the begin should still have been in flight");
        assert!(
            !in_a_leaked_transaction(&single).await,
            "the next borrower ran in the leaked transaction"
        );
        sqlx::query("CREATE TEMPORARY TABLE written (x int)").execute(&single).await.unwrap();
        single.close().await;
        schema.drop_schema().await;
    }
}
