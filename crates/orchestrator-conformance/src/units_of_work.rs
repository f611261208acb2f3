//! Cases for the [`UnitOfWork`] contract: the application's appends and its own rows in one
//! transaction, with the streams locked before anything is written.

use std::time::Duration;

use orchestrator_core::ExpectedVersion;
use orchestrator_core::ports::{EventStore, StoreError, UnitOfWork, UnitOfWorkStore};

use crate::Harness;
use crate::events::{new_events, order, read_all};

/// Long enough for a racing unit of work to be waiting on a stream lock.
const RACE_PAUSE: Duration = Duration::from_millis(100);

/// Appends to several streams and the application's row commit together; inside, the unit of
/// work reads its own appends; outside, nothing shows before commit.
pub async fn unit_of_work_commits_appends_and_rows_together<H: Harness>(h: &H) {
    let store = h.store();
    let (a, b) = (order("a"), order("b"));
    store.append(&a, ExpectedVersion::NoStream, new_events(1, 1, "Opened")).await.unwrap();
    let mut unit = store.begin_unit_of_work(&[a.clone(), b.clone()]).await.unwrap();
    let current = unit.read_stream(&a, 0).await.unwrap();
    assert_eq!(current.len(), 1);
    let version =
        unit.append(&a, ExpectedVersion::Exact(1), new_events(2, 2, "Moved")).await.unwrap();
    assert_eq!(version, 3);
    assert_eq!(
        unit.read_stream(&a, 2)
            .await
            .unwrap()
            .iter()
            .map(|e| e.aggregate_version)
            .collect::<Vec<_>>(),
        vec![2, 3],
        "the unit of work reads its own appends"
    );
    unit.append(&b, ExpectedVersion::NoStream, new_events(4, 1, "Opened")).await.unwrap();
    h.put_row_in_unit(&mut unit, "command-1", "done").await;
    assert_eq!(store.read_stream(&a, 0).await.unwrap().len(), 1, "invisible before commit");
    assert!(store.read_stream(&b, 0).await.unwrap().is_empty());
    assert_eq!(h.get_row("command-1").await, None);

    let appended = unit.commit().await.unwrap();
    assert_eq!(appended.iter().map(|a| a.version).collect::<Vec<_>>(), vec![3, 1]);
    assert_eq!(store.read_stream(&a, 0).await.unwrap().len(), 3);
    let b_events = store.read_stream(&b, 0).await.unwrap();
    assert_eq!(b_events.len(), 1);
    assert_eq!(b_events[0].position, appended[1].last_position);
    assert_eq!(h.get_row("command-1").await.as_deref(), Some("done"));
    assert_eq!(read_all(h).await.len(), 4);
}

/// Dropping a unit of work keeps none of its appends or rows, and releases its streams.
pub async fn dropped_unit_of_work_keeps_nothing<H: Harness>(h: &H) {
    let store = h.store();
    let mut unit = store.begin_unit_of_work(&[order("a")]).await.unwrap();
    unit.append(&order("a"), ExpectedVersion::NoStream, new_events(1, 2, "X")).await.unwrap();
    h.put_row_in_unit(&mut unit, "command-1", "done").await;
    drop(unit);
    assert!(store.read_stream(&order("a"), 0).await.unwrap().is_empty());
    assert_eq!(h.get_row("command-1").await, None);
    assert!(read_all(h).await.is_empty());
    // The stream is free again and never existed.
    store.append(&order("a"), ExpectedVersion::NoStream, new_events(1, 1, "X")).await.unwrap();
}

/// A unit of work may append only to the streams it declared (and so locked) when it began.
pub async fn undeclared_stream_is_refused<H: Harness>(h: &H) {
    let store = h.store();
    let mut unit = store.begin_unit_of_work(&[order("a")]).await.unwrap();
    let err =
        unit.append(&order("b"), ExpectedVersion::Any, new_events(1, 1, "X")).await.unwrap_err();
    assert!(matches!(err, StoreError::UndeclaredStream { .. }), "{err}");
    unit.append(&order("a"), ExpectedVersion::Any, new_events(2, 1, "X")).await.unwrap();
    unit.commit().await.unwrap();
    assert!(store.read_stream(&order("b"), 0).await.unwrap().is_empty());
    assert_eq!(store.read_stream(&order("a"), 0).await.unwrap().len(), 1);
}

/// Inside a unit of work, versions, duplicates and malformed input are checked as by `append`.
pub async fn unit_of_work_checks_versions_like_append<H: Harness>(h: &H) {
    let store = h.store();
    store.append(&order("a"), ExpectedVersion::NoStream, new_events(1, 1, "X")).await.unwrap();
    let mut unit = store.begin_unit_of_work(&[order("a")]).await.unwrap();
    let err = unit
        .append(&order("a"), ExpectedVersion::NoStream, new_events(2, 1, "X"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { actual: 1, .. }), "{err}");
    let err =
        unit.append(&order("a"), ExpectedVersion::Any, new_events(1, 1, "X")).await.unwrap_err();
    assert!(matches!(err, StoreError::DuplicateEvent { .. }), "{err}");
    drop(unit);
    let mut unit = store.begin_unit_of_work(&[order("a")]).await.unwrap();
    unit.append(&order("a"), ExpectedVersion::Exact(1), new_events(3, 1, "X")).await.unwrap();
    let err = unit
        .append(&order("a"), ExpectedVersion::Exact(1), new_events(4, 1, "X"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { actual: 2, .. }), "its own append counts");
    let mut bad = new_events(5, 1, "X");
    bad[0].metadata = "[]".to_owned();
    let err = unit.append(&order("a"), ExpectedVersion::Any, bad).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err}");
    unit.commit().await.unwrap();
    assert_eq!(store.read_stream(&order("a"), 0).await.unwrap().len(), 2);
}

/// Two units of work race on one stream; the first writes an unrelated row before its append and
/// pauses; the second waits for the stream. Readers by position still get the stream in version
/// order (on PostgreSQL: the second's transaction id is taken after the first committed).
pub async fn racing_units_of_work_keep_one_stream_in_version_order<H: Harness>(h: &H) {
    let store = h.store().clone();
    let stream = order("a");
    let mut first = store.begin_unit_of_work(std::slice::from_ref(&stream)).await.unwrap();
    let racer = {
        let store = store.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let mut second = store.begin_unit_of_work(std::slice::from_ref(&stream)).await?;
            let head = second.read_stream(&stream, 0).await?.len() as u64;
            second
                .append(&stream, ExpectedVersion::Exact(head), new_events(10, 1, "Second"))
                .await?;
            second.commit().await
        })
    };
    tokio::time::sleep(RACE_PAUSE).await;
    h.put_row_in_unit(&mut first, "unrelated", "first write").await;
    tokio::time::sleep(RACE_PAUSE).await;
    first.append(&stream, ExpectedVersion::NoStream, new_events(1, 1, "First")).await.unwrap();
    first.commit().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), racer)
        .await
        .expect("the second unit of work finishes")
        .unwrap()
        .unwrap();
    assert_eq!(second[0].version, 2, "it waited for the first and saw its append");

    let read = read_all(h).await;
    let types: Vec<_> = read.iter().map(|e| (e.aggregate_version, e.event_type.as_str())).collect();
    assert_eq!(types, vec![(1, "First"), (2, "Second")], "position order is version order");
    assert!(read[0].position < read[1].position);
    assert_eq!(h.get_row("unrelated").await.as_deref(), Some("first write"));
}

/// Units of work that declare the same streams in different orders never deadlock: streams are
/// locked in one global order.
pub async fn units_of_work_on_the_same_streams_in_any_order_do_not_deadlock<H: Harness>(h: &H) {
    let store = h.store().clone();
    let streams = [order("a"), order("b"), order("c")];
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let store = store.clone();
        let mut declared = streams.to_vec();
        declared.rotate_left(i as usize % 3);
        if i % 2 == 1 {
            declared.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let mut unit = store.begin_unit_of_work(&declared).await?;
            for (j, stream) in declared.iter().enumerate() {
                let id = 100 + i * 10 + j as u64;
                unit.append(stream, ExpectedVersion::Any, new_events(id, 1, "X")).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            unit.commit().await
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("no deadlock")
            .unwrap()
            .unwrap();
    }
    for stream in &streams {
        let versions: Vec<u64> = store
            .read_stream(stream, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.aggregate_version)
            .collect();
        assert_eq!(versions, vec![1, 2, 3, 4]);
    }
}
