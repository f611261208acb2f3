//! Units of work in memory: the declared streams are locked at begin, appends and read-model
//! writes are buffered, and commit applies them all under the store's lock at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use orchestrator_core::ports::{
    Appended, StoreError, StoreResult, StreamHead, UnitOfWork, UnitOfWorkStore, check_append,
    check_declared,
};
use orchestrator_core::{Event, ExpectedVersion, NewEvent, PartitionKey, Position, StreamId};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::store::{MemoryStore, MemoryTx, StreamState};

/// One async lock per stream ever locked; units of work hold them until they end.
#[derive(Debug, Default)]
pub(crate) struct StreamLocks(Mutex<BTreeMap<StreamId, Arc<AsyncMutex<()>>>>);

impl StreamLocks {
    /// Locks `streams` in their sorted order, so two units of work never wait on each other.
    async fn lock(&self, streams: &BTreeSet<StreamId>) -> Vec<OwnedMutexGuard<()>> {
        let locks: Vec<_> = {
            let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            streams.iter().map(|s| Arc::clone(map.entry(s.clone()).or_default())).collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        guards
    }
}

/// A unit of work on the in-memory store: appends to its declared streams and read-model writes
/// ([`MemoryUnitOfWork::tx`]), applied together at commit.
#[derive(Debug)]
pub struct MemoryUnitOfWork {
    store: MemoryStore,
    declared: BTreeSet<StreamId>,
    /// The declared streams' locks, released when the unit of work ends.
    _locks: Vec<OwnedMutexGuard<()>>,
    /// Appends in order: the stream, its partition key, and the events with their versions.
    pending: Vec<(StreamId, String, u64, Vec<NewEvent>)>,
    tx: MemoryTx,
}

impl MemoryUnitOfWork {
    /// The transaction the application writes its own rows through, committed with the appends.
    pub fn tx(&mut self) -> &mut MemoryTx {
        &mut self.tx
    }

    /// The stream's head as this unit of work sees it: committed state plus its own appends.
    fn head(&self, stream: &StreamId) -> StreamHead {
        let state = self.store.lock();
        let committed = state.streams.get(stream);
        let mut head = StreamHead {
            version: committed.map_or(0, |s| s.events.len() as u64),
            partition_key: committed.map(|s| s.partition_key.clone()),
        };
        for (s, key, version, _) in &self.pending {
            if s == stream {
                head = StreamHead { version: *version, partition_key: Some(key.clone()) };
            }
        }
        head
    }
}

#[async_trait]
impl UnitOfWorkStore for MemoryStore {
    type UnitOfWork = MemoryUnitOfWork;

    async fn begin_unit_of_work(&self, streams: &[StreamId]) -> StoreResult<MemoryUnitOfWork> {
        let declared: BTreeSet<StreamId> = streams.iter().cloned().collect();
        let locks = self.stream_locks.lock(&declared).await;
        Ok(MemoryUnitOfWork {
            store: self.clone(),
            declared,
            _locks: locks,
            pending: Vec::new(),
            tx: self.transaction(),
        })
    }
}

#[async_trait]
impl UnitOfWork for MemoryUnitOfWork {
    async fn append_with_key(
        &mut self,
        stream: &StreamId,
        key: Option<&PartitionKey>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> StoreResult<u64> {
        check_declared(&self.declared, stream)?;
        let head = self.head(stream);
        let partition_key = check_append(stream, expected, &head, key, &events)?;
        let buffered = self.pending.iter().flat_map(|(_, _, _, events)| events);
        let stored = {
            let state = self.store.lock();
            events.iter().find(|e| state.event_ids.contains(&e.event_id)).map(|e| e.event_id)
        };
        let again = events.iter().find(|e| buffered.clone().any(|b| b.event_id == e.event_id));
        if let Some(event_id) = stored.or(again.map(|e| e.event_id)) {
            return Err(StoreError::DuplicateEvent { event_id });
        }
        let version = head.version + events.len() as u64;
        self.pending.push((stream.clone(), partition_key, version, events));
        Ok(version)
    }

    async fn read_stream(
        &mut self,
        stream: &StreamId,
        from_version: u64,
    ) -> StoreResult<Vec<Event>> {
        let mut events = self.store.lock().stream_events(stream, from_version);
        let now = self.store.clock.now();
        for (s, key, version, new) in &self.pending {
            if s != stream {
                continue;
            }
            let first = version - new.len() as u64 + 1;
            let slot = self.store.slot_count.slot_of(key);
            for (i, new) in new.iter().enumerate() {
                let aggregate_version = first + i as u64;
                if aggregate_version >= from_version {
                    // Not yet positioned: positions are assigned at commit.
                    events.push(stored_event(stream, key, slot, aggregate_version, 0, new, now));
                }
            }
        }
        Ok(events)
    }

    async fn commit(self) -> StoreResult<Vec<Appended>> {
        let now = self.store.clock.now();
        let mut state = self.store.lock();
        let mut results = Vec::with_capacity(self.pending.len());
        for (stream, key, version, events) in self.pending {
            let slot = self.store.slot_count.slot_of(&key);
            let first_global = state.events.len() as u64 + 1;
            let first_version = version - events.len() as u64 + 1;
            for (i, new) in events.iter().enumerate() {
                let index = state.events.len();
                let global = index as u64 + 1;
                state.event_ids.insert(new.event_id);
                let event =
                    stored_event(&stream, &key, slot, first_version + i as u64, global, new, now);
                state.events.push(event);
                state.events_by_slot.entry(slot).or_default().push(index);
                state
                    .streams
                    .entry(stream.clone())
                    .or_insert_with(|| StreamState {
                        partition_key: key.clone(),
                        events: Vec::new(),
                    })
                    .events
                    .push(index);
            }
            let last_global = state.events.len() as u64;
            let written = !events.is_empty();
            results.push(Appended {
                first_global,
                last_global: if written { last_global } else { first_global - 1 },
                version,
                slot,
                last_position: if written {
                    Position::global(last_global)
                } else {
                    Position::START
                },
            });
        }
        self.tx.apply_to(&mut state);
        Ok(results)
    }
}

fn stored_event(
    stream: &StreamId,
    partition_key: &str,
    slot: orchestrator_core::Slot,
    aggregate_version: u64,
    global: u64,
    new: &NewEvent,
    created_at: orchestrator_core::Timestamp,
) -> Event {
    Event {
        position: Position::global(global),
        stream: stream.clone(),
        aggregate_version,
        partition_key: partition_key.to_owned(),
        slot,
        event_id: new.event_id,
        event_type: new.event_type.clone(),
        event_version: new.event_version,
        payload: new.payload.clone(),
        metadata: new.metadata.clone(),
        tracing: new.tracing.clone(),
        created_at,
    }
}
