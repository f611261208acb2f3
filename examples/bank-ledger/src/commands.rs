//! The command side: rehydrate an account from its stream, decide, append at the version read,
//! and on a version conflict (another command got there first) read again and decide again.

use orchestrator_core::ports::{EventStore, StoreError};
use orchestrator_core::{ExpectedVersion, NewEvent, StreamId};
use orchestrator_serde::{EventExt, NewEventExt};

use crate::account::{Account, AccountEvent, Command, Refused, decide};

/// The stream of account `id`.
pub fn account_stream(id: &str) -> StreamId {
    StreamId::new("bank", "Account", id)
}

/// What became of a command.
#[derive(Debug)]
pub enum Outcome {
    /// Appended; the account's new version, and how many conflicts were retried first.
    Done {
        /// The stream's version after the append.
        version: u64,
        /// Version conflicts retried.
        retries: u32,
    },
    /// The domain said no.
    Refused(Refused),
}

/// Loads account `id` from its events (every event whose append returned is included).
pub async fn load(store: &impl EventStore, id: &str) -> anyhow::Result<Account> {
    let mut account = Account::default();
    for event in store.read_stream(&account_stream(id), 0).await? {
        account.apply(&event.decode::<AccountEvent>()?);
    }
    Ok(account)
}

/// Runs `command` on account `id`, retrying when another writer appended in between.
pub async fn handle(
    store: &impl EventStore,
    id: &str,
    command: &Command,
) -> anyhow::Result<Outcome> {
    let stream = account_stream(id);
    let mut retries = 0;
    loop {
        let account = load(store, id).await?;
        let events = match decide(&account, command) {
            Ok(events) => events,
            Err(refused) => return Ok(Outcome::Refused(refused)),
        };
        let new: Vec<NewEvent> = events.iter().map(NewEvent::typed).collect::<Result<_, _>>()?;
        let expected = match account.version {
            0 => ExpectedVersion::NoStream,
            version => ExpectedVersion::Exact(version),
        };
        match store.append(&stream, expected, new).await {
            Ok(appended) => return Ok(Outcome::Done { version: appended.version, retries }),
            Err(StoreError::VersionConflict { .. }) => retries += 1,
            Err(err) if err.is_retryable() => {
                retries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}
