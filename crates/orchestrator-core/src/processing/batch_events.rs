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

    /// The events `keep` keeps, part by part (so no part grows): a part kept whole stays shared.
    pub fn filter(&self, mut keep: impl FnMut(&Event) -> bool) -> Self {
        let mut kept = Self::default();
        for part in &self.parts {
            let events: Vec<Event> = part.iter().filter(|e| keep(e)).cloned().collect();
            if events.len() == part.len() {
                kept.push(part.clone());
            } else {
                kept.push(Arc::new(events));
            }
        }
        kept
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
