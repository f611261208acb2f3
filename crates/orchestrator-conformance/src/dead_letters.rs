//! Cases for the [`DeadLetterStore`] contract (failure policy `park`).

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator_core::ports::{
    CheckpointStore, CoordinationStore, DeadLetter, DeadLetterAction, DeadLetterFilter,
    DeadLetterRequest, DeadLetterStore, EventStore, Fence, NewDeadLetter, StoreError, UnitOfWork,
    UnitOfWorkStore,
};
use orchestrator_core::{
    Epoch, Event, ExpectedVersion, PartitionKey, Position, ReplicaSetName, Slot, StreamId,
};

use crate::Harness;
use crate::coordination::{first_generation_in, replica_set, slots, worker};
use crate::events::{new_events, read_all};

/// Registers `leader` in `rs`, gives it the lease and every slot (generation 1), and returns the
/// fence of a commit on every slot.
async fn own_every_slot<S: CoordinationStore>(store: &S, rs: &ReplicaSetName) -> Fence {
    let leader = worker("w1");
    first_generation_in(store, rs, &leader).await;
    let snapshot = store.snapshot(rs).await.unwrap();
    Fence {
        replica_set: rs.clone(),
        worker: leader,
        grants: slots().all().map(|s| (s, snapshot.slots[s.0 as usize].epoch)).collect(),
    }
}

/// The stream of account `id`.
fn account(id: &str) -> StreamId {
    StreamId::new("bank", "Account", id)
}

/// Appends two events to each of `ids` (ids of events from `first_id` on) and returns every
/// event of the store, in position order.
async fn seed<H: Harness>(h: &H, ids: &[&str], first_id: u64) -> Vec<Event> {
    for (n, id) in ids.iter().enumerate() {
        let first = first_id + 2 * n as u64;
        h.store()
            .append(&account(id), ExpectedVersion::NoStream, new_events(first, 2, "Deposited"))
            .await
            .unwrap();
    }
    read_all(h).await
}

/// The letter parking `event` with `error` after `attempts` attempts.
fn letter(event: &Event, error: &str, attempts: u32) -> NewDeadLetter {
    NewDeadLetter::of(event, error, attempts)
}

/// The events of one aggregate.
fn of<'a>(events: &'a [Event], id: &str) -> Vec<&'a Event> {
    events.iter().filter(|e| e.stream.aggregate_id == id).collect()
}

/// Checkpoints moving every slot of `events` to the last of `events` (never backwards, however
/// often it is committed while no event is appended).
fn past(events: &[Event]) -> BTreeMap<Slot, Position> {
    let last = events.iter().map(|e| e.position).max().unwrap_or(Position::START);
    events.iter().map(|e| (e.slot, last)).collect()
}

/// Parks `letters` for `projection` in one transaction, committed under `fence`.
async fn park<H: Harness>(
    h: &H,
    fence: &Fence,
    projection: &str,
    letters: &[NewDeadLetter],
    events: &[Event],
) {
    let store = h.store();
    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &fence.replica_set, projection, letters).await.unwrap();
    store.commit(tx, fence, projection, &past(events)).await.unwrap();
}

async fn list<H: Harness>(h: &H, rs: &ReplicaSetName, filter: DeadLetterFilter) -> Vec<DeadLetter> {
    h.store().dead_letters(rs, &filter).await.unwrap()
}

fn by_projection(projection: &str) -> DeadLetterFilter {
    DeadLetterFilter { projection: Some(projection.to_owned()), ..DeadLetterFilter::default() }
}

fn positions(letters: &[DeadLetter]) -> Vec<Position> {
    letters.iter().map(|l| l.position).collect()
}

/// Letters parked in a transaction exist only once its fenced commit succeeded: a dropped
/// transaction and a fenced commit park nothing. A kept letter carries every field it was given.
pub async fn parked_letters_are_kept_only_when_the_commit_succeeds<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1"], 1).await;
    let first = &events[0];

    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &rs, "balances", &[letter(first, "boom", 3)]).await.unwrap();
    drop(tx);
    assert!(list(h, &rs, DeadLetterFilter::default()).await.is_empty(), "dropped: nothing");

    let mut stale = fence.clone();
    stale.grants.values_mut().for_each(|epoch| *epoch = Epoch::ZERO);
    let mut tx = store.begin().await.unwrap();
    store.park(&mut tx, &rs, "balances", &[letter(first, "boom", 3)]).await.unwrap();
    let err = store.commit(tx, &stale, "balances", &past(&events)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(list(h, &rs, DeadLetterFilter::default()).await.is_empty(), "fenced: nothing");
    assert!(store.dead_letter_counts(&rs).await.unwrap().is_empty());

    let behind = letter(&events[1], "parked behind an earlier letter of its key", 0);
    park(h, &fence, "balances", &[letter(first, "boom", 3), behind], &events).await;
    let letters = list(h, &rs, DeadLetterFilter::default()).await;
    assert_eq!(letters.len(), 2);
    let kept = &letters[0];
    assert_eq!(kept.projection, "balances");
    assert_eq!(kept.key, first.partition_key);
    assert_eq!(kept.slot, first.slot);
    assert_eq!(kept.stream, first.stream);
    assert_eq!(kept.position, first.position);
    assert_eq!(kept.event_type, "Deposited");
    assert_eq!(kept.error, "boom");
    assert_eq!(kept.attempts, 3);
    assert_eq!(kept.requested, None);
    assert!(kept.first_failed_at <= kept.last_failed_at);
    assert_eq!(letters[1].attempts, 0);
    assert_eq!(letters[1].position, events[1].position);
    assert_ne!(letters[0].id, letters[1].id, "ids are unique");
    assert_eq!(
        store.load(&rs, "balances", &[first.slot]).await.unwrap()[&first.slot],
        events[1].position
    );
}

/// Parking an event that is parked already (a retry that failed again) keeps its id and first
/// failure, replaces its error, adds its attempts, refreshes its last failure and clears its
/// request.
pub async fn parking_again_keeps_the_letter_and_adds_attempts<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1"], 1).await;
    park(h, &fence, "balances", &[letter(&events[0], "first error", 3)], &events).await;
    let before = list(h, &rs, DeadLetterFilter::default()).await.remove(0);
    let marked = store
        .request(
            &rs,
            &DeadLetterFilter { id: Some(before.id), ..Default::default() },
            DeadLetterAction::Retry,
        )
        .await
        .unwrap();
    assert_eq!(marked, 1);
    h.advance(Duration::from_millis(30)).await;

    park(h, &fence, "balances", &[letter(&events[0], "second error", 2)], &events).await;
    let after = list(h, &rs, DeadLetterFilter::default()).await;
    assert_eq!(after.len(), 1, "still one letter for the event");
    let after = &after[0];
    assert_eq!(after.id, before.id);
    assert_eq!(after.first_failed_at, before.first_failed_at);
    assert!(after.last_failed_at > before.last_failed_at, "the last failure is refreshed");
    assert_eq!(after.error, "second error");
    assert_eq!(after.attempts, 5);
    assert_eq!(after.requested, None, "the request is cleared");
    assert!(store.requests(&rs).await.unwrap().is_empty());
}

/// `parked_keys` lists the distinct keys with letters of one projection in the given slots.
pub async fn parked_keys_are_listed_per_slot<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let ids = ["acct-1", "acct-2", "acct-3", "acct-4", "acct-5", "acct-6"];
    let events = seed(h, &ids, 1).await;
    let letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    park(h, &fence, "balances", &letters, &events).await;
    park(h, &fence, "audit", &letters[..2], &events).await;

    let mut expected: Vec<(Slot, String)> =
        events.iter().map(|e| (e.slot, e.partition_key.clone())).collect();
    expected.sort();
    expected.dedup();
    let every: Vec<Slot> = slots().all().collect();
    assert_eq!(store.parked_keys(&rs, "balances", &every).await.unwrap(), expected, "one per key");

    let wanted = [events[0].slot];
    let in_slot: Vec<(Slot, String)> =
        expected.iter().filter(|(slot, _)| *slot == events[0].slot).cloned().collect();
    assert_eq!(store.parked_keys(&rs, "balances", &wanted).await.unwrap(), in_slot);
    let elsewhere: Vec<Slot> =
        every.iter().copied().filter(|s| !expected.iter().any(|(k, _)| k == s)).collect();
    assert!(store.parked_keys(&rs, "balances", &elsewhere).await.unwrap().is_empty());
    assert!(store.parked_keys(&rs, "balances", &[]).await.unwrap().is_empty());
    assert_eq!(
        store.parked_keys(&rs, "audit", &every).await.unwrap(),
        vec![(events[0].slot, events[0].partition_key.clone())],
        "per projection"
    );
    assert!(store.parked_keys(&rs, "nothing-parked", &every).await.unwrap().is_empty());
}

/// `dead_letters` lists the letters matching a filter in position order; `dead_letter_counts`
/// counts them per projection, leaving out projections without any.
pub async fn dead_letters_are_listed_filtered_and_counted<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1", "acct-2", "acct-3"], 1).await;
    // Parked out of order, in two transactions.
    let mut letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    letters.reverse();
    park(h, &fence, "balances", &letters[..3], &events).await;
    park(h, &fence, "balances", &letters[3..], &events).await;
    let two = of(&events, "acct-2");
    park(h, &fence, "audit", &[letter(two[0], "audit failed", 4)], &events).await;

    let all = list(h, &rs, DeadLetterFilter::default()).await;
    assert_eq!(all.len(), 7);
    let mut sorted = positions(&all);
    sorted.sort();
    assert_eq!(positions(&all), sorted, "in position order");

    let balances = list(h, &rs, by_projection("balances")).await;
    assert_eq!(positions(&balances), events.iter().map(|e| e.position).collect::<Vec<_>>());
    let audit = list(h, &rs, by_projection("audit")).await;
    assert_eq!(audit.len(), 1);
    assert_eq!((audit[0].error.as_str(), audit[0].attempts), ("audit failed", 4));

    let key = two[0].partition_key.clone();
    let of_key =
        list(h, &rs, DeadLetterFilter { key: Some(key.clone()), ..Default::default() }).await;
    assert_eq!(of_key.len(), 3, "both projections' letters of the key");
    let filter = DeadLetterFilter { projection: Some("balances".into()), key: Some(key), id: None };
    let both = list(h, &rs, filter).await;
    assert_eq!(positions(&both), two.iter().map(|e| e.position).collect::<Vec<_>>());

    let one = list(h, &rs, DeadLetterFilter { id: Some(audit[0].id), ..Default::default() }).await;
    assert_eq!(one, audit);
    let wrong =
        DeadLetterFilter { id: Some(audit[0].id), projection: Some("balances".into()), key: None };
    assert!(list(h, &rs, wrong).await.is_empty(), "every field set must match");
    let unknown = DeadLetterFilter { id: Some(i64::MAX), ..Default::default() };
    assert!(list(h, &rs, unknown).await.is_empty());
    assert!(list(h, &rs, by_projection("nothing-parked")).await.is_empty());

    let counts = store.dead_letter_counts(&rs).await.unwrap();
    assert_eq!(counts, BTreeMap::from([("audit".to_owned(), 1), ("balances".to_owned(), 6)]));
}

/// `request` marks every letter of each key with a matching letter (by id: its whole key; by
/// projection; by projection and key) and says how many; nothing matching marks nothing.
/// `requests` lists the marked keys, one per (projection, key).
pub async fn requests_mark_whole_keys<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1", "acct-2", "acct-3"], 1).await;
    let letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    park(h, &fence, "balances", &letters, &events).await;
    park(h, &fence, "audit", &letters, &events).await;
    let (one, two) = (of(&events, "acct-1"), of(&events, "acct-2"));
    let request_of = |e: &Event, projection: &str, action| DeadLetterRequest {
        projection: projection.to_owned(),
        slot: e.slot,
        key: e.partition_key.clone(),
        action,
    };

    let rs_ref = &rs;
    let nothing = |filter: DeadLetterFilter| async move {
        assert_eq!(
            store.request(rs_ref, &filter, DeadLetterAction::Retry).await.unwrap(),
            0,
            "{filter:?}"
        );
    };
    nothing(DeadLetterFilter { id: Some(i64::MAX), ..Default::default() }).await;
    nothing(by_projection("nothing-parked")).await;
    nothing(DeadLetterFilter {
        projection: Some("balances".into()),
        key: Some("no-such-key".into()),
        id: None,
    })
    .await;
    assert!(store.requests(&rs).await.unwrap().is_empty());

    // By id: the second letter of acct-1 in balances marks both of that key's letters.
    let second = list(h, &rs, by_projection("balances"))
        .await
        .into_iter()
        .find(|l| l.position == one[1].position)
        .unwrap();
    let by_id = DeadLetterFilter { id: Some(second.id), ..Default::default() };
    assert_eq!(store.request(&rs, &by_id, DeadLetterAction::Retry).await.unwrap(), 2);
    assert_eq!(
        store.requests(&rs).await.unwrap(),
        vec![request_of(one[0], "balances", DeadLetterAction::Retry)]
    );
    let marked = list(h, &rs, by_projection("balances")).await;
    for letter in &marked {
        let expected = (letter.key == one[0].partition_key).then_some(DeadLetterAction::Retry);
        assert_eq!(letter.requested, expected, "{letter:?}");
    }

    // By projection and key, then the whole projection: a later request replaces the action.
    let filter = DeadLetterFilter {
        projection: Some("audit".into()),
        key: Some(two[0].partition_key.clone()),
        id: None,
    };
    assert_eq!(store.request(&rs, &filter, DeadLetterAction::Skip).await.unwrap(), 2);
    assert_eq!(
        store.request(&rs, &by_projection("balances"), DeadLetterAction::Skip).await.unwrap(),
        6
    );
    let mut expected = vec![request_of(two[0], "audit", DeadLetterAction::Skip)];
    expected.extend(
        ["acct-1", "acct-2", "acct-3"]
            .iter()
            .map(|id| request_of(of(&events, id)[0], "balances", DeadLetterAction::Skip)),
    );
    expected.sort();
    let mut requests = store.requests(&rs).await.unwrap();
    requests.sort();
    assert_eq!(requests, expected, "one per (projection, key)");
    let untouched = list(h, &rs, by_projection("audit")).await;
    assert_eq!(untouched.iter().filter(|l| l.requested.is_none()).count(), 4);
}

/// `parked_events` returns one key's events, whole, with their letters' ids, in position order,
/// also where commit order differs from append order (PostgreSQL).
pub async fn parked_events_are_whole_events_in_position_order<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let key = PartitionKey::new("customer-7").unwrap();
    let (a, b) = (account("acct-a"), account("acct-b"));
    if H::CONCURRENT_WRITERS {
        // a's first event takes its transaction id first, b's in between, a's second after it.
        let mut first = store.begin_unit_of_work(std::slice::from_ref(&a)).await.unwrap();
        first
            .append_with_key(&a, Some(&key), ExpectedVersion::NoStream, new_events(1, 1, "Opened"))
            .await
            .unwrap();
        let mut second = store.begin_unit_of_work(std::slice::from_ref(&b)).await.unwrap();
        second
            .append_with_key(&b, Some(&key), ExpectedVersion::NoStream, new_events(2, 1, "Opened"))
            .await
            .unwrap();
        first
            .append_with_key(&a, Some(&key), ExpectedVersion::Exact(1), new_events(3, 1, "Moved"))
            .await
            .unwrap();
        second.commit().await.unwrap();
        first.commit().await.unwrap();
    } else {
        store
            .append_with_key(&a, Some(&key), ExpectedVersion::NoStream, new_events(1, 1, "Opened"))
            .await
            .unwrap();
        store
            .append_with_key(&b, Some(&key), ExpectedVersion::NoStream, new_events(2, 1, "Opened"))
            .await
            .unwrap();
        store
            .append_with_key(&a, Some(&key), ExpectedVersion::Exact(1), new_events(3, 1, "Moved"))
            .await
            .unwrap();
    }
    store
        .append(&account("other"), ExpectedVersion::NoStream, new_events(4, 1, "Opened"))
        .await
        .unwrap();
    let events = read_all(h).await;
    assert_eq!(events.len(), 4);
    let keyed: Vec<Event> =
        events.iter().filter(|e| e.partition_key == "customer-7").cloned().collect();
    assert_eq!(keyed.len(), 3);
    let mut letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    letters.reverse();
    park(h, &fence, "balances", &letters, &events).await;

    if H::CONCURRENT_WRITERS && keyed.iter().any(|e| e.position.commit != 0) {
        // A store with a commit key (PostgreSQL): a's second event reads before b's.
        let globals: Vec<u64> = keyed.iter().map(|e| e.position.global).collect();
        assert!(!globals.is_sorted(), "commit order differs from append order: {globals:?}");
    }
    let parked = store.parked_events(&rs, "balances", "customer-7").await.unwrap();
    let got: Vec<Event> = parked.iter().map(|(_, e)| e.clone()).collect();
    assert_eq!(got, keyed, "the key's events as read, in the read's order");
    let mut sorted: Vec<Position> = got.iter().map(|e| e.position).collect();
    sorted.sort();
    assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), sorted);
    let listed = list(h, &rs, by_projection("balances")).await;
    for (id, event) in &parked {
        let letter = listed.iter().find(|l| l.id == *id).expect("the letter's id");
        assert_eq!(letter.position, event.position);
    }
    assert!(store.parked_events(&rs, "audit", "customer-7").await.unwrap().is_empty());
    assert!(store.parked_events(&rs, "balances", "nobody").await.unwrap().is_empty());
}

/// `resolve` deletes every letter of one key in the transaction, only if it commits, and says how
/// many; a skip records each dropped letter in the log of skipped letters, a retry does not.
pub async fn resolve_deletes_one_key_on_commit_and_logs_skips<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1", "acct-2", "acct-3"], 1).await;
    let letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    park(h, &fence, "balances", &letters, &events).await;
    park(h, &fence, "audit", &letters, &events).await;
    let (one, two) = (of(&events, "acct-1"), of(&events, "acct-2"));
    let (key1, key2) = (one[0].partition_key.clone(), two[0].partition_key.clone());
    let rs_ref = &rs;
    let count = |projection: &'static str| async move {
        store.dead_letter_counts(rs_ref).await.unwrap().get(projection).copied().unwrap_or(0)
    };

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.resolve(&mut tx, &rs, "balances", &key1, DeadLetterAction::Skip).await.unwrap(),
        2
    );
    drop(tx);
    assert_eq!(count("balances").await, 6, "dropped: nothing deleted");

    let mut stale = fence.clone();
    stale.grants.values_mut().for_each(|epoch| *epoch = Epoch::ZERO);
    let mut tx = store.begin().await.unwrap();
    store.resolve(&mut tx, &rs, "balances", &key1, DeadLetterAction::Skip).await.unwrap();
    let err = store.commit(tx, &stale, "balances", &past(&events)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(count("balances").await, 6, "fenced: nothing deleted");
    if let Some(logged) = h.skipped_letters().await {
        assert!(logged.is_empty(), "nothing logged either");
    }

    let skipped: Vec<i64> = list(h, &rs, by_projection("balances"))
        .await
        .into_iter()
        .filter(|l| l.key == key1)
        .map(|l| l.id)
        .collect();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.resolve(&mut tx, &rs, "balances", &key1, DeadLetterAction::Skip).await.unwrap(),
        2
    );
    store.commit(tx, &fence, "balances", &past(&events)).await.unwrap();
    assert_eq!(count("balances").await, 4);
    assert_eq!(count("audit").await, 6, "only that projection's letters");
    let left = list(h, &rs, by_projection("balances")).await;
    assert!(left.iter().all(|l| l.key != key1), "only that key's letters, all of them");
    if let Some(mut logged) = h.skipped_letters().await {
        logged.sort();
        assert_eq!(logged, skipped, "the skip is recorded");
    }

    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.resolve(&mut tx, &rs, "balances", &key2, DeadLetterAction::Retry).await.unwrap(),
        2
    );
    assert_eq!(
        store
            .resolve(&mut tx, &rs, "balances", "no-such-key", DeadLetterAction::Retry)
            .await
            .unwrap(),
        0
    );
    store.commit(tx, &fence, "balances", &past(&events)).await.unwrap();
    assert_eq!(count("balances").await, 2);
    if let Some(logged) = h.skipped_letters().await {
        assert_eq!(logged.len(), 2, "a retry is not logged");
    }
    assert!(store.parked_events(&rs, "balances", &key2).await.unwrap().is_empty());
    assert_eq!(store.parked_events(&rs, "audit", &key2).await.unwrap().len(), 2);
}

/// `reset` and `remove` delete the projection's letters, and only its.
pub async fn reset_and_remove_delete_the_projections_letters<H: Harness>(h: &H) {
    let store = h.store();
    let rs = replica_set();
    let fence = own_every_slot(store, &rs).await;
    let events = seed(h, &["acct-1", "acct-2"], 1).await;
    let letters: Vec<NewDeadLetter> = events.iter().map(|e| letter(e, "boom", 1)).collect();
    for projection in ["rebuilt", "retired", "kept"] {
        park(h, &fence, projection, &letters, &events).await;
    }
    let tx = store.begin().await.unwrap();
    store.reset(tx, &rs, "rebuilt").await.unwrap();
    store.remove(&rs, "retired").await.unwrap();
    let counts = store.dead_letter_counts(&rs).await.unwrap();
    assert_eq!(counts, BTreeMap::from([("kept".to_owned(), 4)]));
    let every: Vec<Slot> = slots().all().collect();
    assert!(store.parked_keys(&rs, "rebuilt", &every).await.unwrap().is_empty());
    assert!(list(h, &rs, by_projection("retired")).await.is_empty());
}

/// Letters, counts, keys, requests and resolutions are per replica set.
pub async fn dead_letters_are_per_replica_set<H: Harness>(h: &H) {
    let store = h.store();
    let (rs, other) = (replica_set(), ReplicaSetName::new("other-set").unwrap());
    let fence = own_every_slot(store, &rs).await;
    let other_fence = own_every_slot(store, &other).await;
    let events = seed(h, &["acct-1"], 1).await;
    let key = events[0].partition_key.clone();
    park(h, &fence, "balances", &[letter(&events[0], "boom", 1)], &events).await;

    let every: Vec<Slot> = slots().all().collect();
    assert!(list(h, &other, DeadLetterFilter::default()).await.is_empty());
    assert!(store.dead_letter_counts(&other).await.unwrap().is_empty());
    assert!(store.parked_keys(&other, "balances", &every).await.unwrap().is_empty());
    assert!(store.parked_events(&other, "balances", &key).await.unwrap().is_empty());
    let id = list(h, &rs, DeadLetterFilter::default()).await[0].id;
    let by_id = DeadLetterFilter { id: Some(id), ..Default::default() };
    assert_eq!(store.request(&other, &by_id, DeadLetterAction::Skip).await.unwrap(), 0);
    assert_eq!(
        store.request(&other, &by_projection("balances"), DeadLetterAction::Skip).await.unwrap(),
        0
    );
    assert!(store.requests(&rs).await.unwrap().is_empty());

    park(h, &other_fence, "balances", &[letter(&events[0], "elsewhere", 2)], &events).await;
    assert_eq!(list(h, &rs, DeadLetterFilter::default()).await[0].error, "boom", "two letters");
    assert_eq!(
        store.request(&other, &by_projection("balances"), DeadLetterAction::Skip).await.unwrap(),
        1
    );
    assert!(store.requests(&rs).await.unwrap().is_empty());
    assert_eq!(store.requests(&other).await.unwrap().len(), 1);
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.resolve(&mut tx, &other, "balances", &key, DeadLetterAction::Skip).await.unwrap(),
        1
    );
    store.commit(tx, &other_fence, "balances", &past(&events)).await.unwrap();
    assert!(list(h, &other, DeadLetterFilter::default()).await.is_empty());
    assert_eq!(list(h, &rs, DeadLetterFilter::default()).await.len(), 1, "the other set's stays");
}
