//! Cases for the application's side of the [`EventStore`] contract: reading one stream, partition
//! keys, and refusing malformed input the same way on every store.

use orchestrator_core::ports::{EventStore, StoreError, UnitOfWork, UnitOfWorkStore};
use orchestrator_core::{ExpectedVersion, PartitionKey, StreamId};

use crate::Harness;
use crate::events::{new_events, order, read_all};

/// `read_stream` returns one stream's events in version order, from a version on.
pub async fn read_stream_returns_one_stream_in_version_order<H: Harness>(h: &H) {
    let store = h.store();
    for round in 0..4 {
        for agg in ["a", "b"] {
            let id = round * 2 + u64::from(agg == "b");
            store
                .append(&order(agg), ExpectedVersion::Exact(round), new_events(id, 1, "X"))
                .await
                .unwrap();
        }
    }
    let a = store.read_stream(&order("a"), 0).await.unwrap();
    assert_eq!(a.iter().map(|e| e.aggregate_version).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(a.iter().all(|e| e.stream == order("a") && e.partition_key == "a"));
    assert!(a.windows(2).all(|w| w[0].position < w[1].position));
    let from_3 = store.read_stream(&order("a"), 3).await.unwrap();
    assert_eq!(from_3.iter().map(|e| e.aggregate_version).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(store.read_stream(&order("a"), 1).await.unwrap(), a, "from 1 is from the start");
    assert!(store.read_stream(&order("a"), 5).await.unwrap().is_empty());
    assert!(store.read_stream(&order("missing"), 0).await.unwrap().is_empty());
}

/// Read-your-writes: an append that returned is in the next stream read, even while another
/// session holds a writing transaction open and another unit of work has appended without
/// committing (both hold back PostgreSQL's read by position, never the stream read).
pub async fn read_stream_sees_an_append_at_once_whatever_else_is_open<H: Harness>(h: &H) {
    let store = h.store();
    let _foreign = h.hold_foreign_transaction().await;
    let mut open = if H::CONCURRENT_WRITERS {
        let mut unit = store.begin_unit_of_work(&[order("other")]).await.unwrap();
        unit.append(&order("other"), ExpectedVersion::Any, new_events(90, 1, "X")).await.unwrap();
        Some(unit)
    } else {
        None
    };
    let appended = store
        .append(&order("mine"), ExpectedVersion::NoStream, new_events(1, 1, "Opened"))
        .await
        .unwrap();
    let events = store.read_stream(&order("mine"), 0).await.unwrap();
    assert_eq!(events.len(), 1, "the append that returned is read back at once");
    assert_eq!(events[0].position.global, appended.last_global);
    assert_eq!(events[0].position, appended.last_position);
    assert_eq!(events[0].slot, appended.slot);
    store
        .append(&order("mine"), ExpectedVersion::Exact(1), new_events(2, 1, "Deposited"))
        .await
        .unwrap();
    assert_eq!(store.read_stream(&order("mine"), 0).await.unwrap().len(), 2);
    assert!(store.read_stream(&order("other"), 0).await.unwrap().is_empty(), "not committed");
    if let Some(unit) = open.take() {
        unit.commit().await.unwrap();
        assert_eq!(store.read_stream(&order("other"), 0).await.unwrap().len(), 1);
    }
}

/// A stream's partition key is fixed at its first append: the given key, else its aggregate id.
/// It picks the slot; later appends may omit it, and giving another one is refused.
pub async fn partition_key_is_fixed_at_the_first_append<H: Harness>(h: &H) {
    let store = h.store();
    let key = PartitionKey::new("customer-7").unwrap();
    store
        .append_with_key(
            &order("o-1"),
            Some(&key),
            ExpectedVersion::NoStream,
            new_events(1, 2, "X"),
        )
        .await
        .unwrap();
    let later = store
        .append(&order("o-1"), ExpectedVersion::Exact(2), new_events(3, 1, "Y"))
        .await
        .unwrap();
    assert_eq!(later.slot, store.slot_count().slot_of("customer-7"));
    let other = PartitionKey::new("customer-8").unwrap();
    let err = store
        .append_with_key(&order("o-1"), Some(&other), ExpectedVersion::Any, new_events(4, 1, "Z"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::PartitionKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("customer-7"), "{err}");
    store
        .append_with_key(
            &order("o-1"),
            Some(&key),
            ExpectedVersion::Exact(3),
            new_events(5, 1, "Z"),
        )
        .await
        .unwrap();
    store.append(&order("o-2"), ExpectedVersion::NoStream, new_events(6, 1, "X")).await.unwrap();

    let stream = store.read_stream(&order("o-1"), 0).await.unwrap();
    assert_eq!(stream.len(), 4, "the refused append wrote nothing");
    for event in &stream {
        assert_eq!(event.partition_key, "customer-7");
        assert_eq!(event.slot, store.slot_count().slot_of("customer-7"));
    }
    let plain = store.read_stream(&order("o-2"), 0).await.unwrap();
    assert_eq!(plain[0].partition_key, "o-2");
    assert_eq!(plain[0].slot, store.slot_count().slot_of("o-2"));
    let read = read_all(h).await;
    assert!(read.iter().all(|e| e.slot == store.slot_count().slot_of(&e.partition_key)));
}

/// Aggregates that share a partition key share its slot, and a reader gets their events in the
/// order they were appended (one worker handles the key, in order).
pub async fn aggregates_sharing_a_partition_key_share_a_slot_in_append_order<H: Harness>(h: &H) {
    let store = h.store();
    let key = PartitionKey::new("tenant-1").unwrap();
    let mut appended = Vec::new();
    for i in 0..6 {
        let stream = order(&format!("agg-{}", i % 3));
        let a = store
            .append_with_key(&stream, Some(&key), ExpectedVersion::Any, new_events(i, 1, "X"))
            .await
            .unwrap();
        appended.push(a.last_global);
    }
    let read: Vec<_> = read_all(h).await;
    assert!(read.iter().all(|e| e.slot == store.slot_count().slot_of("tenant-1")));
    assert_eq!(read.iter().map(|e| e.position.global).collect::<Vec<_>>(), appended);
}

/// Malformed input is refused before anything is written, with the same typed error on every
/// store: metadata that is not a JSON object (or holds a NUL), an empty event type, an empty part
/// of the stream id.
pub async fn malformed_appends_are_refused_and_write_nothing<H: Harness>(h: &H) {
    let store = h.store();
    for metadata in ["", "[]", "null", "\"text\"", "{\"a\":", "{\"a\":\"\\u0000\"}"] {
        let mut events = new_events(1, 2, "X");
        events[1].metadata = metadata.to_owned();
        let err = store.append(&order("o-1"), ExpectedVersion::Any, events).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidEvent { .. }), "{metadata:?}: {err}");
        assert!(!err.is_retryable());
    }
    let mut events = new_events(1, 1, "X");
    events[0].event_type.clear();
    let err = store.append(&order("o-1"), ExpectedVersion::Any, events).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err}");
    for stream in [
        StreamId::new("", "Order", "1"),
        StreamId::new("sales", "", "1"),
        StreamId::new("sales", "Order", ""),
    ] {
        let err =
            store.append(&stream, ExpectedVersion::Any, new_events(1, 1, "X")).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidStream { .. }), "{stream}: {err}");
    }
    assert!(read_all(h).await.is_empty(), "nothing was written");
    assert!(store.read_stream(&order("o-1"), 0).await.unwrap().is_empty());
    // A well-formed append afterwards works.
    let mut events = new_events(1, 1, "X");
    events[0].metadata = "{\"user\":\"ann\",\"tags\":[1,2]}".to_owned();
    store.append(&order("o-1"), ExpectedVersion::NoStream, events).await.unwrap();
    let stored = store.read_stream(&order("o-1"), 0).await.unwrap();
    // Stores may normalize the text (PostgreSQL's jsonb does); the object is kept.
    assert!(stored[0].metadata.contains("\"ann\""), "{}", stored[0].metadata);
}
