//! The dead-letter port on PostgreSQL (failure policy `park`).
//!
//! The two writes that happen inside a projection's transaction, [`Fencing::park`] and
//! [`Fencing::resolve`], are written once here against [`FencingTx`], like the fenced commit, so
//! `orchestrator-diesel` runs the very same statements on its connection. Every parameter of those
//! statements is bound as text and cast in SQL; the letters to park travel as one JSON array
//! (`jsonb_to_recordset`), so a batch parks in one statement whatever its size.
//! The administrative reads and the operator's requests run on the store's pool.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use orchestrator_core::ports::{
    DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId, DeadLetterRequest,
    DeadLetterStore, NewDeadLetter, StoreResult,
};
use orchestrator_core::{Event, ReplicaSetName, Slot, StreamId};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::classify;
use crate::event_store::{EVENT_COLUMNS, event_from_row};
use crate::fencing::{Fencing, FencingTx};
use crate::{PgStore, PgTx, Tables};

/// What failed, in error messages.
const PARK: &str = "park dead letters";
const RESOLVE: &str = "resolve dead letters";

impl Fencing {
    /// Parks `letters` of `projection` inside `tx`, as
    /// [`DeadLetterStore::park`] specifies, short of committing: they are kept only if the
    /// transaction's fenced commit succeeds. Letters of one position are combined first (their
    /// attempts added, the last error kept), since one statement cannot write a row twice.
    pub async fn park<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let rows = letters_json(letters);
        tx.execute_text(PARK, self.park_sql(), &[replica_set.as_str(), projection, &rows]).await
    }

    /// Deletes every letter of `key` inside `tx`, recording each in the log of skipped letters when
    /// `action` is [`DeadLetterAction::Skip`], as [`DeadLetterStore::resolve`] specifies, short of
    /// committing; the number of letters deleted.
    pub async fn resolve<T: FencingTx + ?Sized>(
        &self,
        tx: &mut T,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        tx.execute_count(
            RESOLVE,
            self.resolve_sql(),
            &[replica_set.as_str(), projection, key, action.as_str()],
        )
        .await
    }
}

/// `$1` replica set, `$2` projection, `$3` the letters as a JSON array of objects.
pub(crate) fn park_sql(t: &Tables) -> String {
    format!(
        "INSERT INTO {letters} AS d (replica_set, projection, partition_key, slot, bounded_context, \
                 aggregate_type, aggregate_id, commit_position, global_position, event_type, error, attempts) \
             SELECT $1::text, $2::text, l.partition_key, l.slot, l.bounded_context, l.aggregate_type, \
                 l.aggregate_id, l.commit_position, l.global_position, l.event_type, l.error, l.attempts \
             FROM jsonb_to_recordset($3::text::jsonb) AS l(partition_key text, slot integer, \
                 bounded_context text, aggregate_type text, aggregate_id text, commit_position bigint, \
                 global_position bigint, event_type text, error text, attempts integer) \
             ON CONFLICT (replica_set, projection, global_position) DO UPDATE SET \
                 error = excluded.error, attempts = d.attempts + excluded.attempts, \
                 last_failed_at = clock_timestamp(), requested = NULL",
        letters = t.dead_letters
    )
}

/// `$1` replica set, `$2` projection, `$3` key, `$4` the action (`retry`, `skip`). The log's
/// insert and the delete read the same snapshot, so they see the same letters.
pub(crate) fn resolve_sql(t: &Tables) -> String {
    format!(
        "WITH logged AS ( \
                 INSERT INTO {skipped} (id, replica_set, projection, partition_key, commit_position, \
                     global_position, aggregate, event_type, error, attempts, first_failed_at) \
                 SELECT id, replica_set, projection, partition_key, commit_position, global_position, \
                     bounded_context || '/' || aggregate_type || '/' || aggregate_id, event_type, error, \
                     attempts, first_failed_at \
                 FROM {letters} \
                 WHERE replica_set = $1::text AND projection = $2::text AND partition_key = $3::text \
                   AND $4::text = 'skip') \
             DELETE FROM {letters} \
             WHERE replica_set = $1::text AND projection = $2::text AND partition_key = $3::text",
        skipped = t.skipped_letters,
        letters = t.dead_letters
    )
}

/// The letters as `park_sql`'s JSON array, one object per position.
fn letters_json(letters: &[NewDeadLetter]) -> String {
    let mut by_position: BTreeMap<u64, NewDeadLetter> = BTreeMap::new();
    for letter in letters {
        by_position
            .entry(letter.position.global)
            .and_modify(|kept| {
                kept.attempts = kept.attempts.saturating_add(letter.attempts);
                kept.error.clone_from(&letter.error);
            })
            .or_insert_with(|| letter.clone());
    }
    let rows: Vec<serde_json::Value> = by_position
        .values()
        .map(|l| {
            serde_json::json!({
                "partition_key": l.key,
                "slot": l.slot.0,
                "bounded_context": l.stream.bounded_context,
                "aggregate_type": l.stream.aggregate_type,
                "aggregate_id": l.stream.aggregate_id,
                "commit_position": l.position.commit,
                "global_position": l.position.global,
                "event_type": l.event_type,
                // PostgreSQL's text (and jsonb) cannot hold NUL.
                "error": l.error.replace('\0', "\u{FFFD}"),
                "attempts": l.attempts.min(i32::MAX as u32),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Microseconds since the Unix epoch as a time.
fn from_micros(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

fn action(value: Option<&str>) -> Option<DeadLetterAction> {
    match value {
        Some("retry") => Some(DeadLetterAction::Retry),
        Some("skip") => Some(DeadLetterAction::Skip),
        _ => None,
    }
}

/// The columns [`letter_from_row`] reads.
const LETTER_COLUMNS: &str = "id, projection, partition_key, slot, bounded_context, aggregate_type, \
     aggregate_id, commit_position, global_position, event_type, error, attempts, \
     (EXTRACT(EPOCH FROM first_failed_at) * 1000000)::bigint AS first_failed_us, \
     (EXTRACT(EPOCH FROM last_failed_at) * 1000000)::bigint AS last_failed_us, requested";

/// The filter on `$2` id, `$3` projection, `$4` key; a null parameter matches all.
const FILTER: &str = "($2::bigint IS NULL OR id = $2) AND ($3::text IS NULL OR projection = $3) \
     AND ($4::text IS NULL OR partition_key = $4)";

fn letter_from_row(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        projection: row.try_get("projection")?,
        key: row.try_get("partition_key")?,
        slot: Slot(row.try_get::<i32, _>("slot")? as u32),
        stream: StreamId {
            bounded_context: row.try_get("bounded_context")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
        },
        position: orchestrator_core::Position {
            commit: row.try_get::<i64, _>("commit_position")? as u64,
            global: row.try_get::<i64, _>("global_position")? as u64,
        },
        event_type: row.try_get("event_type")?,
        error: row.try_get("error")?,
        attempts: row.try_get::<i32, _>("attempts")?.max(0) as u32,
        first_failed_at: from_micros(row.try_get("first_failed_us")?),
        last_failed_at: from_micros(row.try_get("last_failed_us")?),
        requested: action(row.try_get::<Option<&str>, _>("requested")?),
    })
}

#[async_trait]
impl DeadLetterStore for PgStore {
    async fn park(
        &self,
        tx: &mut PgTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        self.fencing().park(tx, replica_set, projection, letters).await
    }

    async fn parked_keys(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<Vec<(Slot, String)>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<i32> = slots.iter().map(|s| s.0 as i32).collect();
        let rows: Vec<(i32, String)> = sqlx::query_as(&self.sql.dead_letters.parked_keys)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(&wanted)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify("list parked keys", e))?;
        Ok(rows.into_iter().map(|(slot, key)| (Slot(slot as u32), key)).collect())
    }

    async fn dead_letters(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
    ) -> StoreResult<Vec<DeadLetter>> {
        let err = |e| classify("list dead letters", e);
        let rows = sqlx::query(&self.sql.dead_letters.dead_letters)
            .bind(replica_set.as_str())
            .bind(filter.id)
            .bind(filter.projection.as_deref())
            .bind(filter.key.as_deref())
            .fetch_all(&self.pool)
            .await
            .map_err(err)?;
        rows.iter().map(|row| letter_from_row(row).map_err(err)).collect()
    }

    async fn dead_letter_counts(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<BTreeMap<String, u64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&self.sql.dead_letters.dead_letter_counts)
            .bind(replica_set.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify("count dead letters", e))?;
        Ok(rows.into_iter().map(|(p, n)| (p, n.max(0) as u64)).collect())
    }

    async fn request(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        // Every letter of each key that has a matching letter: keys move as a whole.
        let marked = sqlx::query(&self.sql.dead_letters.request)
            .bind(replica_set.as_str())
            .bind(filter.id)
            .bind(filter.projection.as_deref())
            .bind(filter.key.as_deref())
            .bind(action.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| classify("request a retry or skip of dead letters", e))?;
        Ok(marked.rows_affected())
    }

    async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>> {
        let rows: Vec<(String, i32, String, String)> =
            sqlx::query_as(&self.sql.dead_letters.requests)
                .bind(replica_set.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| classify("list dead-letter requests", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(projection, slot, key, requested)| {
                Some(DeadLetterRequest {
                    projection,
                    slot: Slot(slot as u32),
                    key,
                    action: action(Some(&requested))?,
                })
            })
            .collect())
    }

    async fn parked_events(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>> {
        let err = |e| classify("read parked events", e);
        let rows = sqlx::query(&self.sql.dead_letters.parked_events)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(key)
            .fetch_all(&self.pool)
            .await
            .map_err(err)?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("letter_id").map_err(err)?;
                Ok((id, event_from_row(row)?))
            })
            .collect::<StoreResult<Vec<_>>>()
    }

    async fn resolve(
        &self,
        tx: &mut PgTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        self.fencing().resolve(tx, replica_set, projection, key, action).await
    }
}

/// The dead-letter store's administrative statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct DeadLetterSql {
    /// The parked keys of the wanted slots.
    parked_keys: String,
    /// The letters the filter matches, in stream order.
    dead_letters: String,
    /// Letters per projection.
    dead_letter_counts: String,
    /// Marks every letter of each matching key with the operator's request.
    request: String,
    /// One request per key.
    requests: String,
    /// A key's parked events, in stream order, with their letters' ids.
    parked_events: String,
}

impl DeadLetterSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            parked_keys: format!(
                "SELECT DISTINCT slot, partition_key FROM {} \
                 WHERE replica_set = $1 AND projection = $2 AND slot = ANY($3) \
                 ORDER BY slot, partition_key",
                t.dead_letters
            ),
            dead_letters: format!(
                "SELECT {LETTER_COLUMNS} FROM {} WHERE replica_set = $1 AND {FILTER} \
                 ORDER BY commit_position, global_position, projection",
                t.dead_letters
            ),
            dead_letter_counts: format!(
                "SELECT projection, count(*) FROM {} WHERE replica_set = $1 GROUP BY projection",
                t.dead_letters
            ),
            request: format!(
                "UPDATE {t} SET requested = $5 WHERE replica_set = $1 AND (projection, partition_key) IN \
                     (SELECT projection, partition_key FROM {t} WHERE replica_set = $1 AND {FILTER})",
                t = t.dead_letters
            ),
            requests: format!(
                "SELECT DISTINCT ON (projection, partition_key) projection, slot, partition_key, requested \
                 FROM {} WHERE replica_set = $1 AND requested IS NOT NULL \
                 ORDER BY projection, partition_key, requested",
                t.dead_letters
            ),
            parked_events: format!(
                "SELECT {EVENT_COLUMNS}, d.letter_id FROM {events} AS e \
                 JOIN (SELECT id AS letter_id, global_position AS letter_position FROM {letters} \
                       WHERE replica_set = $1 AND projection = $2 AND partition_key = $3) AS d \
                   ON e.global_position = d.letter_position \
                 ORDER BY e.transaction_id, e.global_position",
                events = t.events,
                letters = t.dead_letters
            ),
        }
    }
}
