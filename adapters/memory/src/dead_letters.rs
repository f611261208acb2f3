//! Dead letters in memory: parked and resolved through a [`MemoryTx`], applied only when its
//! commit succeeds, like its read-model writes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use orchestrator_core::ports::{
    DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterId, DeadLetterRequest,
    DeadLetterStore, NewDeadLetter, StoreResult,
};
use orchestrator_core::{Event, ReplicaSetName, Slot, Timestamp};

use crate::store::{MemoryStore, MemoryTx};

/// A dead-letter write buffered in a transaction.
#[derive(Debug)]
pub(crate) enum LetterOp {
    /// Park these letters, at this time.
    Park {
        replica_set: ReplicaSetName,
        projection: String,
        letters: Vec<NewDeadLetter>,
        at: Timestamp,
    },
    /// Delete every letter of a key (logging them when skipped), at this time.
    Resolve {
        replica_set: ReplicaSetName,
        projection: String,
        key: String,
        action: DeadLetterAction,
        at: Timestamp,
    },
}

/// A letter dropped by a skip, as the log keeps it.
#[derive(Debug)]
struct Skipped {
    replica_set: ReplicaSetName,
    letter: DeadLetter,
    at: Timestamp,
}

/// The committed dead letters of every replica set.
#[derive(Debug, Default)]
pub(crate) struct Letters {
    last_id: DeadLetterId,
    by_id: BTreeMap<DeadLetterId, (ReplicaSetName, DeadLetter)>,
    /// (replica set, projection, global position) → id: one letter per event and projection.
    by_event: BTreeMap<(ReplicaSetName, String, u64), DeadLetterId>,
    skipped: Vec<Skipped>,
}

fn time(at: Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(at.as_millis())
}

impl Letters {
    /// Applies a committed transaction's write.
    pub(crate) fn apply(&mut self, op: LetterOp) {
        match op {
            LetterOp::Park { replica_set, projection, letters, at } => {
                for new in letters {
                    let event = (replica_set.clone(), projection.clone(), new.position.global);
                    if let Some(letter) =
                        self.by_event.get(&event).and_then(|id| self.by_id.get_mut(id))
                    {
                        let letter = &mut letter.1;
                        letter.error = new.error;
                        letter.attempts = letter.attempts.saturating_add(new.attempts);
                        letter.last_failed_at = time(at);
                        letter.requested = None;
                        continue;
                    }
                    self.last_id += 1;
                    let id = self.last_id;
                    self.by_event.insert(event, id);
                    let letter = DeadLetter {
                        id,
                        projection: projection.clone(),
                        key: new.key,
                        slot: new.slot,
                        stream: new.stream,
                        position: new.position,
                        event_type: new.event_type,
                        error: new.error,
                        attempts: new.attempts,
                        first_failed_at: time(at),
                        last_failed_at: time(at),
                        requested: None,
                    };
                    self.by_id.insert(id, (replica_set.clone(), letter));
                }
            }
            LetterOp::Resolve { replica_set, projection, key, action, at } => {
                let ids: Vec<DeadLetterId> =
                    self.of_key(&replica_set, &projection, &key).map(|(id, _)| id).collect();
                for id in ids {
                    let Some((rs, letter)) = self.by_id.remove(&id) else { continue };
                    self.by_event.remove(&(
                        rs.clone(),
                        letter.projection.clone(),
                        letter.position.global,
                    ));
                    if action == DeadLetterAction::Skip {
                        self.skipped.push(Skipped { replica_set: rs, letter, at });
                    }
                }
            }
        }
    }

    /// Deletes a projection's letters (`reset`, `remove`), and its log of skipped ones with `log`.
    pub(crate) fn forget(&mut self, replica_set: &ReplicaSetName, projection: &str, log: bool) {
        self.by_id.retain(|_, (rs, l)| !(rs == replica_set && l.projection == projection));
        self.by_event.retain(|(rs, p, _), _| !(rs == replica_set && p == projection));
        if log {
            self.skipped
                .retain(|s| !(&s.replica_set == replica_set && s.letter.projection == projection));
        }
    }

    fn of_replica_set<'a>(
        &'a self,
        replica_set: &'a ReplicaSetName,
    ) -> impl Iterator<Item = &'a DeadLetter> + 'a {
        self.by_id.values().filter(move |(rs, _)| rs == replica_set).map(|(_, l)| l)
    }

    fn of_key<'a>(
        &'a self,
        replica_set: &'a ReplicaSetName,
        projection: &'a str,
        key: &'a str,
    ) -> impl Iterator<Item = (DeadLetterId, &'a DeadLetter)> + 'a {
        self.of_replica_set(replica_set)
            .filter(move |l| l.projection == projection && l.key == key)
            .map(|l| (l.id, l))
    }
}

impl MemoryStore {
    /// The log of skipped dead letters (`orchestrator dlq skip`), oldest first: each letter as it
    /// was dropped, its replica set and when. Processing never reads it; tests and audits do.
    pub fn skipped_letters(&self) -> Vec<(ReplicaSetName, DeadLetter, SystemTime)> {
        self.lock()
            .dead_letters
            .skipped
            .iter()
            .map(|s| (s.replica_set.clone(), s.letter.clone(), time(s.at)))
            .collect()
    }
}

fn matches(filter: &DeadLetterFilter, letter: &DeadLetter) -> bool {
    filter.id.is_none_or(|id| id == letter.id)
        && filter.projection.as_deref().is_none_or(|p| p == letter.projection)
        && filter.key.as_deref().is_none_or(|k| k == letter.key)
}

#[async_trait]
impl DeadLetterStore for MemoryStore {
    async fn park(
        &self,
        tx: &mut MemoryTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        letters: &[NewDeadLetter],
    ) -> StoreResult<()> {
        if !letters.is_empty() {
            tx.letters.push(LetterOp::Park {
                replica_set: replica_set.clone(),
                projection: projection.to_owned(),
                letters: letters.to_vec(),
                at: self.clock.now(),
            });
        }
        Ok(())
    }

    async fn parked_keys(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        slots: &[Slot],
    ) -> StoreResult<Vec<(Slot, String)>> {
        let state = self.lock();
        let keys: BTreeSet<(Slot, String)> = state
            .dead_letters
            .of_replica_set(replica_set)
            .filter(|l| l.projection == projection && slots.contains(&l.slot))
            .map(|l| (l.slot, l.key.clone()))
            .collect();
        Ok(keys.into_iter().collect())
    }

    async fn dead_letters(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
    ) -> StoreResult<Vec<DeadLetter>> {
        let state = self.lock();
        let mut letters: Vec<DeadLetter> = state
            .dead_letters
            .of_replica_set(replica_set)
            .filter(|l| matches(filter, l))
            .cloned()
            .collect();
        letters.sort_by(|a, b| (a.position, &a.projection).cmp(&(b.position, &b.projection)));
        Ok(letters)
    }

    async fn dead_letter_counts(
        &self,
        replica_set: &ReplicaSetName,
    ) -> StoreResult<BTreeMap<String, u64>> {
        let state = self.lock();
        let mut counts = BTreeMap::new();
        for letter in state.dead_letters.of_replica_set(replica_set) {
            *counts.entry(letter.projection.clone()).or_insert(0) += 1;
        }
        Ok(counts)
    }

    async fn request(
        &self,
        replica_set: &ReplicaSetName,
        filter: &DeadLetterFilter,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        let mut state = self.lock();
        let keys: BTreeSet<(String, String)> = state
            .dead_letters
            .of_replica_set(replica_set)
            .filter(|l| matches(filter, l))
            .map(|l| (l.projection.clone(), l.key.clone()))
            .collect();
        let mut marked = 0;
        for (rs, letter) in state.dead_letters.by_id.values_mut() {
            if rs == replica_set && keys.contains(&(letter.projection.clone(), letter.key.clone()))
            {
                letter.requested = Some(action);
                marked += 1;
            }
        }
        Ok(marked)
    }

    async fn requests(&self, replica_set: &ReplicaSetName) -> StoreResult<Vec<DeadLetterRequest>> {
        let state = self.lock();
        let mut requests: BTreeMap<(String, String), DeadLetterRequest> = BTreeMap::new();
        for letter in state.dead_letters.of_replica_set(replica_set) {
            let Some(action) = letter.requested else { continue };
            let request = requests
                .entry((letter.projection.clone(), letter.key.clone()))
                .or_insert_with(|| DeadLetterRequest {
                    projection: letter.projection.clone(),
                    slot: letter.slot,
                    key: letter.key.clone(),
                    action,
                });
            request.action = request.action.min(action);
        }
        Ok(requests.into_values().collect())
    }

    async fn parked_events(
        &self,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
    ) -> StoreResult<Vec<(DeadLetterId, Event)>> {
        let state = self.lock();
        let mut letters: Vec<&DeadLetter> =
            state.dead_letters.of_key(replica_set, projection, key).map(|(_, l)| l).collect();
        letters.sort_by_key(|l| l.position);
        Ok(letters
            .into_iter()
            .filter_map(|letter| {
                let index = state
                    .events
                    .binary_search_by_key(&letter.position.global, |e| e.position.global)
                    .ok()?;
                Some((letter.id, state.events[index].clone()))
            })
            .collect())
    }

    async fn resolve(
        &self,
        tx: &mut MemoryTx,
        replica_set: &ReplicaSetName,
        projection: &str,
        key: &str,
        action: DeadLetterAction,
    ) -> StoreResult<u64> {
        // What the transaction sees: the committed letters of the key and its own earlier writes.
        let mut positions: BTreeSet<u64> = tx
            .committed()
            .dead_letters
            .of_key(replica_set, projection, key)
            .map(|(_, l)| l.position.global)
            .collect();
        for op in &tx.letters {
            match op {
                LetterOp::Park { replica_set: rs, projection: p, letters, .. }
                    if rs == replica_set && p == projection =>
                {
                    positions
                        .extend(letters.iter().filter(|l| l.key == key).map(|l| l.position.global));
                }
                LetterOp::Resolve { replica_set: rs, projection: p, key: k, .. }
                    if rs == replica_set && p == projection && k == key =>
                {
                    positions.clear();
                }
                _ => {}
            }
        }
        tx.letters.push(LetterOp::Resolve {
            replica_set: replica_set.clone(),
            projection: projection.to_owned(),
            key: key.to_owned(),
            action,
            at: self.clock.now(),
        });
        Ok(positions.len() as u64)
    }
}
