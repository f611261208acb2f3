//! Sticky, balanced assignment of slots to the members of a generation.

use std::collections::BTreeMap;

use crate::ids::WorkerId;
use crate::slot::{Slot, SlotCount};

/// Computes the owner of every slot for `members`, moving as few slots as possible from `previous`.
///
/// - Balanced: owners' slot counts differ by at most one.
/// - Sticky: a member keeps as many of its previous slots as its share allows; members that held
///   more keep the larger shares. From a balanced start, adding one member to N moves at most
///   `ceil(S / (N + 1))` slots (all to the newcomer); removing one moves only the leaver's slots.
/// - Deterministic: the result depends only on the arguments (members sorted by id).
///
/// `previous[slot]` is the slot's owner before; owners that are not members are ignored.
/// Returns one owner per slot, in slot order; empty when there are no members.
pub fn assign(
    slot_count: SlotCount,
    members: &[WorkerId],
    previous: &[Option<WorkerId>],
) -> Vec<WorkerId> {
    let mut members: Vec<&WorkerId> = members.iter().collect();
    members.sort();
    members.dedup();
    if members.is_empty() {
        return Vec::new();
    }
    let n_slots = slot_count.get() as usize;
    let previous_owner = |slot: usize| previous.get(slot).and_then(Option::as_ref);

    let mut held: BTreeMap<&WorkerId, usize> = members.iter().map(|m| (*m, 0)).collect();
    for slot in 0..n_slots {
        if let Some(count) = previous_owner(slot).and_then(|owner| held.get_mut(owner)) {
            *count += 1;
        }
    }

    // The `n_slots % n` larger shares go to the members that already hold the most.
    let mut by_holdings = members.clone();
    by_holdings.sort_by(|a, b| held[b].cmp(&held[a]).then_with(|| a.cmp(b)));
    let (share, n_larger) = (n_slots / members.len(), n_slots % members.len());
    let quota: BTreeMap<&WorkerId, usize> = by_holdings
        .iter()
        .enumerate()
        .map(|(rank, m)| (*m, share + usize::from(rank < n_larger)))
        .collect();

    let mut owners: Vec<Option<&WorkerId>> = vec![None; n_slots];
    let mut kept: BTreeMap<&WorkerId, usize> = members.iter().map(|m| (*m, 0)).collect();
    for (slot, owner) in owners.iter_mut().enumerate() {
        let Some(member) = previous_owner(slot)
            .and_then(|prev| members.binary_search(&prev).ok())
            .map(|idx| members[idx])
        else {
            continue;
        };
        let count = kept.get_mut(member).expect("every member has a count");
        if *count < quota[member] {
            *count += 1;
            *owner = Some(member);
        }
    }

    let mut free = owners.iter_mut().filter(|owner| owner.is_none());
    for member in &members {
        for _ in kept[member]..quota[member] {
            if let Some(owner) = free.next() {
                *owner = Some(*member);
            }
        }
    }

    owners.into_iter().map(|owner| owner.expect("quotas sum to the slot count").clone()).collect()
}

/// Number of slots each member owns, by member.
pub fn holdings(owners: &[WorkerId]) -> BTreeMap<&WorkerId, usize> {
    let mut counts = BTreeMap::new();
    for owner in owners {
        *counts.entry(owner).or_insert(0) += 1;
    }
    counts
}

/// Slots whose owner differs between two assignments of the same slot count.
pub fn moved_slots(before: &[Option<WorkerId>], after: &[WorkerId]) -> Vec<Slot> {
    after
        .iter()
        .enumerate()
        .filter(|(slot, owner)| before.get(*slot).and_then(Option::as_ref) != Some(*owner))
        .map(|(slot, _)| Slot(slot as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<WorkerId> {
        names.iter().map(|n| WorkerId::new(*n).unwrap()).collect()
    }

    fn some(owners: &[WorkerId]) -> Vec<Option<WorkerId>> {
        owners.iter().cloned().map(Some).collect()
    }

    #[test]
    fn one_member_owns_everything() {
        let owners = assign(SlotCount::new(8).unwrap(), &ids(&["a"]), &[]);
        assert_eq!(owners, ids(&["a"; 8]));
    }

    #[test]
    fn a_joiner_takes_slots_only_from_others() {
        let count = SlotCount::new(8).unwrap();
        let two = assign(count, &ids(&["a", "b"]), &[]);
        assert_eq!(two, ids(&["a", "a", "a", "a", "b", "b", "b", "b"]));
        let three = assign(count, &ids(&["a", "b", "c"]), &some(&two));
        assert_eq!(three, ids(&["a", "a", "a", "c", "b", "b", "b", "c"]));
        assert_eq!(moved_slots(&some(&two), &three), vec![Slot(3), Slot(7)]);
    }

    #[test]
    fn a_leaver_only_frees_its_own_slots() {
        let count = SlotCount::new(8).unwrap();
        let three = ids(&["a", "a", "a", "c", "b", "b", "b", "c"]);
        let two = assign(count, &ids(&["a", "b"]), &some(&three));
        assert_eq!(two, ids(&["a", "a", "a", "a", "b", "b", "b", "b"]));
    }

    #[test]
    fn no_members_no_owners() {
        assert!(assign(SlotCount::new(4).unwrap(), &[], &[]).is_empty());
    }
}
