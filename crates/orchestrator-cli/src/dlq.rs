//! `orchestrator dlq list | show | retry | skip`: the dead letters of projections whose failure
//! policy is `park`. `retry` and `skip` only mark the letters (whole keys at a time); the worker
//! owning each key's slot carries the request out through the projection.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use base64::Engine as _;
use orchestrator_core::ports::{
    DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId, DeadLetterStore,
};
use orchestrator_core::{Event, ReplicaSetName, quote};
use serde::Serialize;

use crate::db::Database;

/// Which letters `retry` and `skip` concern.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One letter (and so its whole key).
    Id(DeadLetterId),
    /// Every letter of a projection, or of one of its keys.
    Projection { name: String, key: Option<String> },
}

/// One letter as `dlq list --json` prints it: the stable fields scripts rely on.
#[derive(Debug, Serialize)]
struct LetterJson<'a> {
    id: DeadLetterId,
    projection: &'a str,
    key: &'a str,
    aggregate_id: &'a str,
    position: u64,
    event_type: &'a str,
    error: &'a str,
    attempts: u32,
    first_failed_at: String,
    last_failed_at: String,
    requested: Option<&'static str>,
}

impl<'a> From<&'a DeadLetter> for LetterJson<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        LetterJson {
            id: letter.id,
            projection: &letter.projection,
            key: &letter.key,
            aggregate_id: &letter.stream.aggregate_id,
            position: letter.position.global,
            event_type: &letter.event_type,
            error: &letter.error,
            attempts: letter.attempts,
            first_failed_at: rfc3339(letter.first_failed_at),
            last_failed_at: rfc3339(letter.last_failed_at),
            requested: letter.requested.map(DeadLetterAction::as_str),
        }
    }
}

/// RFC 3339 in UTC, to the millisecond.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

async fn letters(
    db: &Database,
    replica_set: &ReplicaSetName,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>> {
    Ok(match db {
        Database::Postgres(store) => store.dead_letters(replica_set, filter).await?,
        Database::Sqlite(store) => store.dead_letters(replica_set, filter).await?,
    })
}

/// The projections of the replica set that have letters, for error messages.
async fn projections_with_letters(db: &Database, replica_set: &ReplicaSetName) -> Result<String> {
    let counts = match db {
        Database::Postgres(store) => store.dead_letter_counts(replica_set).await?,
        Database::Sqlite(store) => store.dead_letter_counts(replica_set).await?,
    };
    Ok(if counts.is_empty() {
        "none has any".to_owned()
    } else {
        let names: Vec<String> = counts.iter().map(|(p, n)| format!("{p} ({n})")).collect();
        format!("those with dead letters: {}", names.join(", "))
    })
}

/// `dlq list`: every letter of the replica set (or of one projection), as a table or JSON.
pub(crate) async fn list(
    db: &Database,
    replica_set: &ReplicaSetName,
    projection: Option<&str>,
    json: bool,
) -> Result<()> {
    let filter =
        DeadLetterFilter { projection: projection.map(str::to_owned), ..Default::default() };
    let letters = letters(db, replica_set, &filter).await?;
    if json {
        let rows: Vec<LetterJson<'_>> = letters.iter().map(LetterJson::from).collect();
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if letters.is_empty() {
        match projection {
            Some(name) => println!(
                "projection {} of replica set {replica_set} has no dead letters",
                quote(name)
            ),
            None => println!("replica set {replica_set} has no dead letters"),
        }
        return Ok(());
    }
    print!("{}", render_table(&letters));
    Ok(())
}

/// The letters as a table: one line each, the error last (cut to keep lines readable; `dlq show`
/// prints it whole).
fn render_table(letters: &[DeadLetter]) -> String {
    const ERROR_CHARS: usize = 60;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<24} {:<20} {:>10}  {:<20} {:>8}  {:<24} {:<9} ERROR",
        "ID", "PROJECTION", "KEY", "POSITION", "EVENT TYPE", "ATTEMPTS", "LAST FAILED", "REQUESTED"
    );
    for letter in letters {
        let mut error: String = letter.error.replace('\n', " ");
        if error.chars().count() > ERROR_CHARS {
            error = error.chars().take(ERROR_CHARS - 1).collect::<String>() + "…";
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<24} {:<20} {:>10}  {:<20} {:>8}  {:<24} {:<9} {}",
            letter.id,
            letter.projection,
            letter.key,
            letter.position.global,
            letter.event_type,
            letter.attempts,
            rfc3339(letter.last_failed_at),
            letter.requested.map_or("-", DeadLetterAction::as_str),
            error
        );
    }
    let keys: std::collections::BTreeSet<(&str, &str)> =
        letters.iter().map(|l| (l.projection.as_str(), l.key.as_str())).collect();
    let _ = writeln!(out, "{} dead letters of {} keys", letters.len(), keys.len());
    out
}

/// `dlq show ID`: every field of one letter, and its event (payload and metadata).
pub(crate) async fn show(
    db: &Database,
    replica_set: &ReplicaSetName,
    id: DeadLetterId,
) -> Result<()> {
    let filter = DeadLetterFilter { id: Some(id), ..Default::default() };
    let Some(letter) = letters(db, replica_set, &filter).await?.into_iter().next() else {
        bail!("replica set {replica_set} has no dead letter {id} (see `orchestrator dlq list`)");
    };
    let events = match db {
        Database::Postgres(store) => {
            store.parked_events(replica_set, &letter.projection, &letter.key).await?
        }
        Database::Sqlite(store) => {
            store.parked_events(replica_set, &letter.projection, &letter.key).await?
        }
    };
    let event = events.into_iter().find(|(letter_id, _)| *letter_id == id).map(|(_, e)| e);
    print!("{}", render_letter(&letter, event.as_ref()));
    Ok(())
}

fn render_letter(letter: &DeadLetter, event: Option<&Event>) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{name:<16} {value}");
    };
    field("id", &letter.id);
    field("projection", &letter.projection);
    field("key", &letter.key);
    field("slot", &letter.slot);
    field("aggregate", &letter.stream);
    field("aggregate id", &letter.stream.aggregate_id);
    field("position", &letter.position.global);
    field("event type", &letter.event_type);
    field("attempts", &letter.attempts);
    field("first failed at", &rfc3339(letter.first_failed_at));
    field("last failed at", &rfc3339(letter.last_failed_at));
    field("requested", &letter.requested.map_or("none", DeadLetterAction::as_str));
    field("error", &letter.error);
    let Some(event) = event else {
        field("event", &"not found in the event store");
        return out;
    };
    field("event id", &event.event_id);
    field("version", &event.aggregate_version);
    field("event version", &event.event_version);
    let created = SystemTime::UNIX_EPOCH + Duration::from_millis(event.created_at.as_millis());
    field("created at", &rfc3339(created));
    let none = |id: &Option<String>| id.clone().unwrap_or_else(|| "none".to_owned());
    field("causation id", &none(&event.tracing.causation_id));
    field("correlation id", &none(&event.tracing.correlation_id));
    field("trace id", &none(&event.tracing.trace_id));
    field("metadata", &event.metadata);
    match std::str::from_utf8(&event.payload) {
        Ok(text) => field("payload", &text),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(&event.payload);
            field("payload", &format!("(base64, {} bytes) {encoded}", event.payload.len()));
        }
    }
    out
}

/// `dlq retry` and `dlq skip`: marks whole keys; their slots' owners carry it out.
pub(crate) async fn request(
    db: &Database,
    replica_set: &ReplicaSetName,
    target: &Target,
    action: DeadLetterAction,
) -> Result<()> {
    let filter = match target {
        Target::Id(id) => DeadLetterFilter { id: Some(*id), ..Default::default() },
        Target::Projection { name, key } => {
            DeadLetterFilter { projection: Some(name.clone()), key: key.clone(), id: None }
        }
    };
    let matching = letters(db, replica_set, &filter).await?;
    if matching.is_empty() {
        match target {
            Target::Id(id) => bail!(
                "replica set {replica_set} has no dead letter {id} (see `orchestrator dlq list`)"
            ),
            Target::Projection { name, key: None } => bail!(
                "projection {} of replica set {replica_set} has no dead letters; {}",
                quote(name),
                projections_with_letters(db, replica_set).await?
            ),
            Target::Projection { name, key: Some(key) } => bail!(
                "projection {} of replica set {replica_set} has no dead letters of key {}",
                quote(name),
                quote(key)
            ),
        }
    }
    let keys: std::collections::BTreeSet<(&str, &str)> =
        matching.iter().map(|l| (l.projection.as_str(), l.key.as_str())).collect();
    let marked = match db {
        Database::Postgres(store) => store.request(replica_set, &filter, action).await?,
        Database::Sqlite(store) => store.request(replica_set, &filter, action).await?,
    };
    if marked == 0 {
        bail!("the dead letters were resolved meanwhile: nothing was marked");
    }
    let verb = match action {
        DeadLetterAction::Retry => "retry (apply again, in order)",
        DeadLetterAction::Skip => "skip (drop, recorded)",
    };
    let projections: std::collections::BTreeSet<&str> = keys.iter().map(|(p, _)| *p).collect();
    println!(
        "marked {marked} dead letter{} of {} key{} ({}) for {verb}: the worker owning each key's slot carries it out within a heartbeat interval",
        if marked == 1 { "" } else { "s" },
        keys.len(),
        if keys.len() == 1 { "" } else { "s" },
        projections.into_iter().collect::<Vec<_>>().join(", "),
    );
    Ok(())
}
