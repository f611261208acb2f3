//! Slots: the fixed hash buckets that are the unit of ownership and of checkpointing.

use std::fmt;

use thiserror::Error;

/// FNV-1a, 32 bits, over the bytes of a partition key.
///
/// The same function as the Go library behind the seed guide, so a key lands in the same bucket.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| (hash ^ u32::from(*byte)).wrapping_mul(PRIME))
}

/// One hash bucket of a replica set, `0..SlotCount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u32);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The slot count was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid slot count {0}: must be a power of two between 1 and 65536")]
pub struct InvalidSlotCount(pub u64);

/// Number of slots of a replica set: a power of two from 1 to 65536, fixed for the life of the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotCount(u32);

impl SlotCount {
    /// The default, 256: fine enough to balance up to a few dozen workers, small enough to list.
    pub const DEFAULT: Self = Self(256);
    /// The largest slot count accepted.
    pub const MAX: u32 = 1 << 16;

    /// Validates a slot count.
    pub fn new(count: u64) -> Result<Self, InvalidSlotCount> {
        if count == 0 || count > u64::from(Self::MAX) || !count.is_power_of_two() {
            return Err(InvalidSlotCount(count));
        }
        Ok(Self(count as u32))
    }

    /// The count as a number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The slot of a partition key: `fnv1a_32(key) mod count`.
    pub fn slot_of(self, partition_key: &str) -> Slot {
        self.slot_of_hash(fnv1a_32(partition_key.as_bytes()))
    }

    /// The slot of an already computed FNV-1a hash.
    pub fn slot_of_hash(self, hash: u32) -> Slot {
        // A power of two: the remainder is a mask.
        Slot(hash & (self.0 - 1))
    }

    /// Every slot, in order.
    pub fn all(self) -> impl Iterator<Item = Slot> {
        (0..self.0).map(Slot)
    }

    /// Whether `slot` belongs to a replica set of this size.
    pub fn contains(self, slot: Slot) -> bool {
        slot.0 < self.0
    }
}

impl Default for SlotCount {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for SlotCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        // Test vectors from the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn slot_is_hash_mod_count() {
        let count = SlotCount::new(256).unwrap();
        for key in ["order-1", "order-2", "a", ""] {
            assert_eq!(count.slot_of(key).0, fnv1a_32(key.as_bytes()) % 256);
        }
        assert_eq!(SlotCount::new(1).unwrap().slot_of("anything"), Slot(0));
    }

    #[test]
    fn slot_count_must_be_a_power_of_two() {
        for bad in [0, 3, 100, 1 << 17] {
            assert_eq!(SlotCount::new(bad), Err(InvalidSlotCount(bad)));
        }
        assert_eq!(SlotCount::new(65536).unwrap().get(), 65536);
        assert_eq!(SlotCount::default().all().count(), 256);
    }
}
