//! The dead-letter port on SQLite (failure policy `park`).
//!
//! `park` and `resolve` write in the projection's transaction (`BEGIN IMMEDIATE`, so under
//! SQLite's single write lock); the letters to park travel as one JSON array (`json_each`), so a
//! batch parks in one statement whatever its size. Times are SQLite's clock in milliseconds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use orchestrator_core::ports::{
    DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId, DeadLetterRequest,
    DeadLetterStore, NewDeadLetter, StoreResult,
};
use orchestrator_core::{Event, Position, ReplicaSetName, Slot, StreamId};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::error::classify;
use crate::event_store::{EVENT_COLUMNS, event_from_row};
use crate::{NOW_MS, SqliteStore, SqliteTx, Tables};

/// The filter on `?2` id, `?3` projection, `?4` key; a null parameter matches all.
const FILTER: &str = "(?2 IS NULL OR id = ?2) AND (?3 IS NULL OR projection = ?3) \
     AND (?4 IS NULL OR partition_key = ?4)";

/// The columns [`letter_from_row`] reads.
const LETTER_COLUMNS: &str = "id, projection, partition_key, slot, bounded_context, aggregate_type, \
     aggregate_id, commit_position, global_position, event_type, error, attempts, first_failed_at, \
     last_failed_at, requested";

/// The dead-letter store's statements, built once when the store opens.
#[derive(Debug)]
pub(crate) struct DeadLetterSql {
    /// Parks letters given as a JSON array, adding to the letter of a position parked already.
    park: String,
    /// Lists the parked keys of a projection in the slots of a JSON array.
    parked_keys: String,
    /// Lists the letters matching [`FILTER`].
    list: String,
    /// Counts the letters of each projection.
    counts: String,
    /// Marks every letter of each key with a letter matching [`FILTER`].
    request: String,
    /// Lists the keys marked for a retry or a skip.
    requests: String,
    /// Reads the parked events of one key, with their letters' ids.
    parked_events: String,
    /// Logs the letters of one key as skipped.
    log_skipped: String,
    /// Deletes the letters of one key.
    delete_key: String,
}

impl DeadLetterSql {
    pub(crate) fn new(t: &Tables) -> Self {
        Self {
            park: format!(
                "INSERT INTO {t} (replica_set, projection, partition_key, slot, bounded_context, \
                     aggregate_type, aggregate_id, commit_position, global_position, event_type, error, \
                     attempts, first_failed_at, last_failed_at) \
                 SELECT ?1, ?2, json_extract(value, '$.partition_key'), json_extract(value, '$.slot'), \
                     json_extract(value, '$.bounded_context'), json_extract(value, '$.aggregate_type'), \
                     json_extract(value, '$.aggregate_id'), json_extract(value, '$.commit_position'), \
                     json_extract(value, '$.global_position'), json_extract(value, '$.event_type'), \
                     json_extract(value, '$.error'), json_extract(value, '$.attempts'), {NOW_MS}, {NOW_MS} \
                 FROM json_each(?3) WHERE true \
                 ON CONFLICT (replica_set, projection, global_position) DO UPDATE SET \
                     error = excluded.error, attempts = {t}.attempts + excluded.attempts, \
                     last_failed_at = excluded.last_failed_at, requested = NULL",
                t = t.dead_letters
            ),
            parked_keys: format!(
                "SELECT DISTINCT slot, partition_key FROM {} \
                 WHERE replica_set = ?1 AND projection = ?2 AND slot IN (SELECT value FROM json_each(?3)) \
                 ORDER BY slot, partition_key",
                t.dead_letters
            ),
            list: format!(
                "SELECT {LETTER_COLUMNS} FROM {} WHERE replica_set = ?1 AND {FILTER} \
                 ORDER BY commit_position, global_position, projection",
                t.dead_letters
            ),
            counts: format!(
                "SELECT projection, count(*) FROM {} WHERE replica_set = ? GROUP BY projection",
                t.dead_letters
            ),
            request: format!(
                "UPDATE {t} SET requested = ?5 WHERE replica_set = ?1 AND (projection, partition_key) IN \
                     (SELECT projection, partition_key FROM {t} WHERE replica_set = ?1 AND {FILTER})",
                t = t.dead_letters
            ),
            requests: format!(
                "SELECT projection, MIN(slot), partition_key, MIN(requested) FROM {} \
                 WHERE replica_set = ? AND requested IS NOT NULL \
                 GROUP BY projection, partition_key ORDER BY projection, partition_key",
                t.dead_letters
            ),
            parked_events: format!(
                "SELECT {EVENT_COLUMNS}, d.letter_id FROM {events} AS e \
                 JOIN (SELECT id AS letter_id, global_position AS letter_position FROM {letters} \
                       WHERE replica_set = ? AND projection = ? AND partition_key = ?) AS d \
                   ON e.global_position = d.letter_position \
                 ORDER BY e.global_position",
                events = t.events,
                letters = t.dead_letters
            ),
            log_skipped: format!(
                "INSERT INTO {skipped} (id, replica_set, projection, partition_key, commit_position, \
                     global_position, aggregate, event_type, error, attempts, first_failed_at, skipped_at) \
                 SELECT id, replica_set, projection, partition_key, commit_position, global_position, \
                     bounded_context || '/' || aggregate_type || '/' || aggregate_id, event_type, error, \
                     attempts, first_failed_at, {NOW_MS} \
                 FROM {letters} WHERE replica_set = ? AND projection = ? AND partition_key = ?",
                skipped = t.skipped_letters,
                letters = t.dead_letters
            ),
            delete_key: format!(
                "DELETE FROM {} WHERE replica_set = ? AND projection = ? AND partition_key = ?",
                t.dead_letters
            ),
        }
    }
}

fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn action(value: Option<&str>) -> Option<DeadLetterAction> {
    match value {
        Some("retry") => Some(DeadLetterAction::Retry),
        Some("skip") => Some(DeadLetterAction::Skip),
        _ => None,
    }
}

fn letter_from_row(row: &SqliteRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        projection: row.try_get("projection")?,
        key: row.try_get("partition_key")?,
        slot: Slot(row.try_get::<i64, _>("slot")? as u32),
        stream: StreamId {
            bounded_context: row.try_get("bounded_context")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
        },
        position: Position {
            commit: row.try_get::<i64, _>("commit_position")? as u64,
            global: row.try_get::<i64, _>("global_position")? as u64,
        },
        event_type: row.try_get("event_type")?,
        error: row.try_get("error")?,
        attempts: row.try_get::<i64, _>("attempts")?.clamp(0, i64::from(u32::MAX)) as u32,
        first_failed_at: from_millis(row.try_get("first_failed_at")?),
        last_failed_at: from_millis(row.try_get("last_failed_at")?),
        requested: action(row.try_get::<Option<String>, _>("requested")?.as_deref()),
    })
}

/// The letters as one JSON array, one object per position (letters of one position combined:
/// attempts added, the last error kept; one statement cannot write a row twice).
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
                "error": l.error,
                "attempts": l.attempts,
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

#[async_trait]
impl DeadLetterStore for SqliteStore {
    async fn park(
        &self,
        tx: &mut SqliteTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        if letters.is_empty() {
            return Ok(());
        }
        sqlx::query(&self.sql.dead_letters.park)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(letters_json(letters))
            .execute(&mut **tx)
            .await
            .map_err(|e| classify("park dead letters", e))?;
        Ok(())
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
        let wanted = serde_json::Value::from(slots.iter().map(|s| s.0).collect::<Vec<u32>>());
        let rows: Vec<(i64, String)> = sqlx::query_as(&self.sql.dead_letters.parked_keys)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(wanted.to_string())
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
        let rows = sqlx::query(&self.sql.dead_letters.list)
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
        let rows: Vec<(String, i64)> = sqlx::query_as(&self.sql.dead_letters.counts)
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
        let what = "request a retry or skip of dead letters";
        // Every letter of each key that has a matching letter: keys move as a whole.
        let mut tx = self.begin_write(what).await?;
        let marked = sqlx::query(&self.sql.dead_letters.request)
            .bind(replica_set.as_str())
            .bind(filter.id)
            .bind(filter.projection.as_deref())
            .bind(filter.key.as_deref())
            .bind(action.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| classify(what, e))?;
        tx.commit().await.map_err(|e| classify(what, e))?;
        Ok(marked.rows_affected())
    }

    async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>> {
        // One row per key: its slot and the (alphabetically first) action asked for.
        let rows: Vec<(String, i64, String, String)> =
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
            .collect()
    }

    async fn resolve(
        &self,
        tx: &mut SqliteTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        let err = |e| classify("resolve dead letters", e);
        let sql = &self.sql.dead_letters;
        if action == DeadLetterAction::Skip {
            sqlx::query(&sql.log_skipped)
                .bind(replica_set.as_str())
                .bind(projection)
                .bind(key)
                .execute(&mut **tx)
                .await
                .map_err(err)?;
        }
        let deleted = sqlx::query(&sql.delete_key)
            .bind(replica_set.as_str())
            .bind(projection)
            .bind(key)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        Ok(deleted.rows_affected())
    }
}
