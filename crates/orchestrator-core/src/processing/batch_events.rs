//! The events of one batch, held as the reads that returned them.

use std::sync::Arc;

use crate::event::Event;

/// The events of one [`Batch`](super::Batch), in order: the events of one or more reads, each
/// kept as it was read (shared with every projection that takes the same read), so that a lane
/// taking several shared batches at once copies no event.
///
/// Each part holds at most one read's events, so at most the batch size; the runtime hands the
/// handler one part per call, all in one transaction.
#[derive(Debug, Clone, Default)]
pub struct BatchEvents {
    parts: Vec<Arc<Vec<Event>>>,
    len: usize,
}

impl BatchEvents {
    /// Events read once, shared as they are.
    pub fn shared(part: Arc<Vec<Event>>) -> Self {
        let mut events = Self::default();
        events.push(part);
        events
    }

    /// Appends a read's events after those held (an empty part is not kept).
    pub fn push(&mut self, part: Arc<Vec<Event>>) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// The parts, in order, none of them empty.
    pub fn parts(&self) -> &[Arc<Vec<Event>>] {
        &self.parts
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The event at `index` over all parts.
    pub fn get(&self, mut index: usize) -> Option<&Event> {
        for part in &self.parts {
            match part.get(index) {
                Some(event) => return Some(event),
                None => index -= part.len(),
            }
        }
        None
    }

    /// The first event.
    pub fn first(&self) -> Option<&Event> {
        self.parts.first().and_then(|part| part.first())
    }

    /// Every event, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.parts.iter().flat_map(|part| part.iter())
    }
}

impl From<Vec<Event>> for BatchEvents {
    fn from(events: Vec<Event>) -> Self {
        Self::shared(Arc::new(events))
    }
}

/// Equal when the events are, however they are split into parts.
impl PartialEq for BatchEvents {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for BatchEvents {}

impl std::ops::Index<usize> for BatchEvents {
    type Output = Event;

    fn index(&self, index: usize) -> &Event {
        self.get(index).unwrap_or_else(|| panic!("index {index} out of {} events", self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, Position, StreamId, Tracing};
    use crate::slot::Slot;
    use crate::time::Timestamp;

    fn event(global: u64) -> Event {
        Event {
            position: Position::global(global),
            stream: StreamId::new("ctx", "type", "id"),
            aggregate_version: global,
            slot: Slot(0),
            partition_key: "id".into(),
            event_id: EventId::from_bytes([0; 16]),
            event_type: "Happened".into(),
            event_version: 1,
            payload: Vec::new(),
            metadata: "{}".into(),
            tracing: Tracing::default(),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn parts_read_as_one_sequence_and_empty_parts_are_dropped() {
        let first = Arc::new(vec![event(1), event(2)]);
        let mut events = BatchEvents::shared(first.clone());
        events.push(Arc::new(Vec::new()));
        events.push(Arc::new(vec![event(3)]));
        assert_eq!(events.len(), 3);
        assert_eq!(events.parts().len(), 2);
        assert!(Arc::ptr_eq(&events.parts()[0], &first), "a shared read is not copied");
        assert_eq!(events[2].position, Position::global(3));
        assert!(events.get(3).is_none());
        let globals: Vec<u64> = events.iter().map(|e| e.position.global).collect();
        assert_eq!(globals, [1, 2, 3]);
        assert_eq!(events, BatchEvents::from(vec![event(1), event(2), event(3)]));
        assert!(BatchEvents::from(Vec::new()).is_empty());
    }
}
