//! Cases for the [`EventStore`] contract.

use orchestrator_core::ports::{EventStore, ReadRequest, StoreError};
use orchestrator_core::{
    Event, EventId, ExpectedVersion, NewEvent, Position, Scope, Slot, StreamId, Tracing,
};
use std::time::Duration;

use crate::Harness;

/// A distinct event id for each `n`.
pub fn event_id(n: u64) -> EventId {
    EventId(orchestrator_core::Uuid::from_u64_pair(0, n))
}

/// `n` events of type `type_` with ids starting at `first_id`.
pub fn new_events(first_id: u64, n: u64, type_: &str) -> Vec<NewEvent> {
    (first_id..first_id + n)
        .map(|id| NewEvent {
            event_id: event_id(id),
            event_type: type_.to_owned(),
            event_version: 1,
            payload: format!("{{\"n\":{id}}}").into_bytes(),
            metadata: "{}".to_owned(),
            tracing: Tracing {
                causation_id: Some(format!("cause-{id}")),
                correlation_id: Some("corr".to_owned()),
                trace_id: None,
            },
        })
        .collect()
}

pub(crate) fn order(id: &str) -> StreamId {
    StreamId::new("sales", "Order", id)
}

fn all_slots_from_start<S: EventStore>(store: &S) -> Vec<(Slot, Position)> {
    store.slot_count().all().map(|slot| (slot, Position::START)).collect()
}

pub(crate) async fn read_all<H: Harness>(h: &H) -> Vec<Event> {
    h.settle().await;
    let store = h.store();
    let request =
        ReadRequest { cursors: all_slots_from_start(store), scope: Scope::all(), limit: 10_000 };
    store.read(&request).await.expect("read")
}

/// Versions continue from 1 per stream; global positions increase; fields round-trip.
pub async fn append_assigns_versions_and_positions<H: Harness>(h: &H) {
    let store = h.store();
    let first = store
        .append(&order("o-1"), ExpectedVersion::NoStream, new_events(1, 2, "Placed"))
        .await
        .unwrap();
    assert_eq!(first.version, 2);
    assert_eq!(first.last_global - first.first_global, 1);
    let second = store
        .append(&order("o-1"), ExpectedVersion::Exact(2), new_events(3, 1, "Paid"))
        .await
        .unwrap();
    assert_eq!(second.version, 3);
    assert!(second.first_global > first.last_global);

    let events = read_all(h).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events.iter().map(|e| e.aggregate_version).collect::<Vec<_>>(), vec![1, 2, 3]);
    let e = &events[0];
    let sent = &new_events(1, 1, "Placed")[0];
    assert_eq!(e.stream, order("o-1"));
    assert_eq!(e.event_id, sent.event_id);
    assert_eq!(e.event_type, "Placed");
    assert_eq!(e.event_version, 1);
    assert_eq!(e.payload, sent.payload);
    assert_eq!(e.metadata, "{}");
    assert_eq!(e.tracing, sent.tracing);
    assert_eq!(e.position.global, first.first_global);
    assert!(e.created_at.as_millis() > 0);
}

/// `NoStream` on a stream with events is a `VersionConflict` carrying the actual version.
pub async fn append_no_stream_conflicts_when_stream_exists<H: Harness>(h: &H) {
    let store = h.store();
    store
        .append(&order("o-1"), ExpectedVersion::NoStream, new_events(1, 1, "Placed"))
        .await
        .unwrap();
    let err = store
        .append(&order("o-1"), ExpectedVersion::NoStream, new_events(2, 1, "Placed"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { actual: 1, .. }), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(read_all(h).await.len(), 1);
}

/// `Exact(v)` fails unless the stream is at `v`, including `Exact(0)` on a missing stream.
pub async fn append_exact_version_conflicts_when_version_differs<H: Harness>(h: &H) {
    let store = h.store();
    let err = store
        .append(&order("o-1"), ExpectedVersion::Exact(1), new_events(1, 1, "Placed"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { actual: 0, .. }), "{err}");
    store
        .append(&order("o-1"), ExpectedVersion::Exact(0), new_events(2, 2, "Placed"))
        .await
        .unwrap();
    let err = store
        .append(&order("o-1"), ExpectedVersion::Exact(1), new_events(4, 1, "Paid"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { actual: 2, .. }), "{err}");
    assert_eq!(read_all(h).await.len(), 2);
}

/// `Any` appends whatever the version.
pub async fn append_any_never_conflicts<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..3 {
        let appended = store
            .append(&order("o-1"), ExpectedVersion::Any, new_events(i * 10, 2, "X"))
            .await
            .unwrap();
        assert_eq!(appended.version, (i + 1) * 2);
    }
}

/// A duplicate event id fails the whole batch; nothing of it is written.
pub async fn duplicate_event_id_is_rejected_and_nothing_is_written<H: Harness>(h: &H) {
    let store = h.store();
    store.append(&order("o-1"), ExpectedVersion::Any, new_events(1, 1, "Placed")).await.unwrap();
    let mut batch = new_events(2, 2, "Placed");
    batch[1].event_id = event_id(1);
    let err = store.append(&order("o-2"), ExpectedVersion::Any, batch).await.unwrap_err();
    assert!(matches!(err, StoreError::DuplicateEvent { .. }), "{err}");
    assert_eq!(read_all(h).await.len(), 1);
    // The stream did not come into existence.
    store
        .append(&order("o-2"), ExpectedVersion::NoStream, new_events(5, 1, "Placed"))
        .await
        .unwrap();
}

/// An empty append writes nothing and reports the current version.
pub async fn empty_append_writes_nothing<H: Harness>(h: &H) {
    let store = h.store();
    store.append(&order("o-1"), ExpectedVersion::Any, new_events(1, 2, "Placed")).await.unwrap();
    let appended =
        store.append(&order("o-1"), ExpectedVersion::Exact(2), Vec::new()).await.unwrap();
    assert_eq!(appended.version, 2);
    assert!(appended.first_global > appended.last_global);
    assert_eq!(read_all(h).await.len(), 2);
}

/// Each event's slot is `fnv1a_32(aggregate_id) mod slot_count`.
pub async fn slot_is_hash_of_aggregate_id<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..20 {
        let id = format!("agg-{i}");
        store.append(&order(&id), ExpectedVersion::NoStream, new_events(i, 1, "X")).await.unwrap();
    }
    for event in read_all(h).await {
        assert_eq!(event.slot, store.slot_count().slot_of(&event.stream.aggregate_id));
    }
}

/// Only events of the requested slots come back, each strictly after its slot's cursor.
pub async fn read_returns_only_requested_slots_after_their_cursors<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..40 {
        let id = format!("agg-{}", i % 10);
        store.append(&order(&id), ExpectedVersion::Any, new_events(i, 1, "X")).await.unwrap();
    }
    let all = read_all(h).await;
    let (a, b) = (all[0].slot, all.iter().map(|e| e.slot).find(|s| *s != all[0].slot).unwrap());
    let cursor_a = all.iter().filter(|e| e.slot == a).nth(1).unwrap().position;
    let request = ReadRequest {
        cursors: vec![(a, cursor_a), (b, Position::START)],
        scope: Scope::all(),
        limit: 1000,
    };
    let got = store.read(&request).await.unwrap();
    let expected: Vec<_> = all
        .iter()
        .filter(|e| (e.slot == a && e.position > cursor_a) || e.slot == b)
        .map(|e| e.position)
        .collect();
    assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), expected);
}

/// Scope filters by aggregate type and bounded context.
pub async fn read_filters_by_scope<H: Harness>(h: &H) {
    let store = h.store();
    let streams = [
        StreamId::new("sales", "Order", "1"),
        StreamId::new("sales", "Customer", "2"),
        StreamId::new("billing", "Order", "3"),
    ];
    for (i, stream) in streams.iter().enumerate() {
        store
            .append(stream, ExpectedVersion::NoStream, new_events(i as u64, 1, "X"))
            .await
            .unwrap();
    }
    h.settle().await;
    let scope =
        Scope { aggregate_types: vec!["Order".into()], bounded_contexts: vec!["sales".into()] };
    let request = ReadRequest { cursors: all_slots_from_start(store), scope, limit: 100 };
    let got = store.read(&request).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].stream, streams[0]);
}

/// Reads come in ascending position order, at most `limit` at a time, and resume after a cursor.
pub async fn read_pages_with_limit_in_position_order<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..25 {
        store
            .append(&order(&format!("agg-{i}")), ExpectedVersion::Any, new_events(i, 1, "X"))
            .await
            .unwrap();
    }
    h.settle().await;
    let mut cursors = all_slots_from_start(store);
    let mut seen = Vec::new();
    loop {
        let request = ReadRequest { cursors: cursors.clone(), scope: Scope::all(), limit: 7 };
        let page = store.read(&request).await.unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        for event in &page {
            let cursor = cursors.iter_mut().find(|(slot, _)| *slot == event.slot).unwrap();
            cursor.1 = event.position;
            seen.push(event.position);
        }
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "positions ascend: {seen:?}");
}

/// Every slot at a cursor of its own (some at the start, some part way), a subset of the slots at
/// one common cursor, with and without a scope, at limits from 1 to all: each read returns the
/// first `limit` events after the cursors, in scope, in position order, also where one slot
/// holds most of them.
pub async fn read_at_differing_cursors_returns_the_first_events_after_each<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..240u64 {
        let type_ = if i % 3 == 0 { "Invoice" } else { "Order" };
        // The first 100 are one busy aggregate's, so one slot fills whole reads.
        let id = if i < 100 { "busy".to_owned() } else { format!("agg-{}", i % 48) };
        let stream = StreamId::new("sales", type_, id);
        store.append(&stream, ExpectedVersion::Any, new_events(i, 1, "X")).await.unwrap();
    }
    let all = read_all(h).await;
    assert_eq!(all.len(), 240);
    let mut slots: Vec<Slot> = all.iter().map(|e| e.slot).collect();
    slots.sort();
    slots.dedup();
    // Slot i's cursor: at its (i mod 4)-th event, the start for 0.
    let differing: Vec<(Slot, Position)> = slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let nth = all.iter().filter(|e| e.slot == *slot).nth(i % 4);
            (
                *slot,
                if i % 4 == 0 {
                    Position::START
                } else {
                    nth.map_or(Position::START, |e| e.position)
                },
            )
        })
        .collect();
    let common = all[50].position;
    let subset: Vec<(Slot, Position)> = slots.iter().step_by(2).map(|s| (*s, common)).collect();
    let orders = Scope { aggregate_types: vec!["Order".into()], bounded_contexts: vec![] };
    for cursors in [&differing, &subset] {
        for scope in [Scope::all(), orders.clone()] {
            for limit in [1, 3, 17, 100, 1000] {
                let request = ReadRequest { cursors: cursors.clone(), scope: scope.clone(), limit };
                let got: Vec<Position> =
                    store.read(&request).await.unwrap().iter().map(|e| e.position).collect();
                let expected: Vec<Position> = all
                    .iter()
                    .filter(|e| scope.includes(&e.stream))
                    .filter(|e| cursors.iter().any(|(s, at)| *s == e.slot && e.position > *at))
                    .take(limit)
                    .map(|e| e.position)
                    .collect();
                let shape = if cursors.len() == slots.len() { "differing" } else { "common" };
                assert_eq!(got, expected, "{shape} cursors, {scope:?}, limit {limit}");
            }
        }
    }
}

/// Events of one stream come back in version order, interleaved with other streams.
pub async fn read_keeps_version_order_per_stream<H: Harness>(h: &H) {
    let store = h.store();
    for round in 0..5 {
        for agg in 0..4 {
            let id = round * 4 + agg;
            store
                .append(
                    &order(&format!("agg-{agg}")),
                    ExpectedVersion::Exact(round),
                    new_events(id, 1, "X"),
                )
                .await
                .unwrap();
        }
    }
    let events = read_all(h).await;
    for agg in 0..4 {
        let versions: Vec<u64> = events
            .iter()
            .filter(|e| e.stream.aggregate_id == format!("agg-{agg}"))
            .map(|e| e.aggregate_version)
            .collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    }
}

/// `backlog` counts the events after each slot's cursor in scope, up to the request's limit, and
/// ages the next events by the store's clock.
pub async fn backlog_counts_events_after_the_cursors_in_scope<H: Harness>(h: &H) {
    let store = h.store();
    for i in 0..40 {
        let id = format!("agg-{}", i % 10);
        store.append(&order(&id), ExpectedVersion::Any, new_events(i, 1, "X")).await.unwrap();
    }
    let customer = StreamId::new("sales", "Customer", "agg-1");
    store.append(&customer, ExpectedVersion::Any, new_events(100, 3, "Y")).await.unwrap();
    let all = read_all(h).await;
    let (a, b) = (all[0].slot, all.iter().map(|e| e.slot).find(|s| *s != all[0].slot).unwrap());
    let cursor_a = all.iter().filter(|e| e.slot == a).nth(1).unwrap().position;
    let scope = Scope { aggregate_types: vec!["Order".into()], bounded_contexts: vec![] };
    let mut request = ReadRequest {
        cursors: vec![(a, cursor_a), (b, Position::START)],
        scope: scope.clone(),
        limit: 1000,
    };
    let expected = all
        .iter()
        .filter(|e| e.stream.aggregate_type == "Order")
        .filter(|e| (e.slot == a && e.position > cursor_a) || e.slot == b)
        .count() as u64;
    assert!(expected > 1);
    h.advance(Duration::from_millis(300)).await;
    let backlog = store.backlog(&request).await.unwrap();
    assert_eq!(backlog.events, expected);
    let age = backlog.oldest_age.expect("an age when events are behind");
    assert!(age >= Duration::from_millis(250) && age < Duration::from_secs(600), "{age:?}");
    request.limit = 1;
    assert_eq!(store.backlog(&request).await.unwrap().events, 1, "the limit caps the count");

    let everything =
        ReadRequest { cursors: all_slots_from_start(store), scope: Scope::all(), limit: 1000 };
    assert_eq!(store.backlog(&everything).await.unwrap().events, 43);
    let last = all.last().unwrap().position;
    let caught_up = ReadRequest {
        cursors: store.slot_count().all().map(|slot| (slot, last)).collect(),
        scope: Scope::all(),
        limit: 100,
    };
    let backlog = store.backlog(&caught_up).await.unwrap();
    assert_eq!((backlog.events, backlog.oldest_age), (0, None));
    let nothing = ReadRequest { cursors: vec![], scope, limit: 100 };
    assert_eq!(store.backlog(&nothing).await.unwrap().events, 0);
}

/// `head`, where the store implements it, is the last committed global position (none before the
/// first append).
pub async fn head_is_the_last_committed_position<H: Harness>(h: &H) {
    let store = h.store();
    let empty = store.head().await.unwrap();
    assert!(matches!(empty, None | Some(0)), "no events: {empty:?}");
    store.append(&order("h-1"), ExpectedVersion::Any, new_events(900, 3, "Placed")).await.unwrap();
    let last = store
        .append(&order("h-2"), ExpectedVersion::Any, new_events(910, 2, "Placed"))
        .await
        .unwrap()
        .last_global;
    if let Some(head) = store.head().await.unwrap() {
        assert_eq!(head, last, "the last appended event's position");
        let read = read_all(h).await;
        assert!(read.iter().all(|e| e.position.global <= head));
    }
}
