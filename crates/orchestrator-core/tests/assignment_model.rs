//! Property tests of the sticky balanced assignment against a naive reference model.

use std::collections::{BTreeMap, BTreeSet};

use orchestrator_core::assignment::{assign, holdings, moved_slots};
use orchestrator_core::{SlotCount, WorkerId};
use proptest::prelude::*;

fn worker(i: usize) -> WorkerId {
    WorkerId::new(format!("w{i:02}")).unwrap()
}

fn slot_count() -> impl Strategy<Value = SlotCount> {
    (0u32..=9).prop_map(|exp| SlotCount::new(1 << exp).unwrap())
}

/// Reference model: a balanced assignment gives every member `floor(S/N)` or `ceil(S/N)` slots.
fn is_balanced(owners: &[WorkerId], members: &BTreeSet<WorkerId>, slots: SlotCount) -> bool {
    let counts = holdings(owners);
    let n = members.len();
    let (lo, hi) = (slots.get() as usize / n, (slots.get() as usize).div_ceil(n));
    members.iter().all(|m| {
        let c = counts.get(m).copied().unwrap_or(0);
        lo <= c && c <= hi
    }) && counts.keys().all(|owner| members.contains(*owner))
}

fn some(owners: &[WorkerId]) -> Vec<Option<WorkerId>> {
    owners.iter().cloned().map(Some).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every slot gets a member, counts differ by at most one, from any previous assignment.
    #[test]
    fn balanced_from_any_previous(
        slots in slot_count(),
        n in 1usize..12,
        previous in proptest::collection::vec(proptest::option::of(0usize..16), 0..600),
    ) {
        let members: Vec<WorkerId> = (0..n).map(worker).collect();
        let previous: Vec<Option<WorkerId>> = previous.into_iter().map(|p| p.map(worker)).collect();
        let owners = assign(slots, &members, &previous);
        prop_assert_eq!(owners.len(), slots.get() as usize);
        prop_assert!(is_balanced(&owners, &members.iter().cloned().collect(), slots));
    }

    /// The same inputs give the same assignment, whatever the order members are listed in.
    #[test]
    fn deterministic(slots in slot_count(), n in 1usize..12, seed in any::<u64>()) {
        let mut members: Vec<WorkerId> = (0..n).map(worker).collect();
        let first = assign(slots, &members, &[]);
        let shift = (seed as usize) % n;
        members.rotate_left(shift);
        prop_assert_eq!(&first, &assign(slots, &members, &[]));
        prop_assert_eq!(assign(slots, &members, &some(&first)), first);
    }

    /// One joiner moves at most ceil(S/(N+1)) slots, all of them to the joiner.
    #[test]
    fn a_join_moves_at_most_the_joiners_share(slots in slot_count(), n in 1usize..12) {
        let members: Vec<WorkerId> = (0..n).map(worker).collect();
        let before = assign(slots, &members, &[]);
        let mut grown = members.clone();
        grown.push(worker(n));
        let after = assign(slots, &grown, &some(&before));
        let moved = moved_slots(&some(&before), &after);
        prop_assert!(moved.len() <= (slots.get() as usize).div_ceil(n + 1), "moved {}", moved.len());
        prop_assert!(moved.iter().all(|s| after[s.0 as usize] == worker(n)));
        prop_assert!(is_balanced(&after, &grown.iter().cloned().collect(), slots));
    }

    /// One leaver moves only its own slots.
    #[test]
    fn a_leave_moves_only_the_leavers_slots(slots in slot_count(), n in 2usize..12, leaver in 0usize..12) {
        let leaver = leaver % n;
        let members: Vec<WorkerId> = (0..n).map(worker).collect();
        let before = assign(slots, &members, &[]);
        let remaining: Vec<WorkerId> = members.iter().filter(|m| **m != worker(leaver)).cloned().collect();
        let after = assign(slots, &remaining, &some(&before));
        for slot in moved_slots(&some(&before), &after) {
            prop_assert_eq!(&before[slot.0 as usize], &worker(leaver));
        }
    }

    /// Growing one by one from 1 to N keeps every step sticky and balanced.
    #[test]
    fn growing_step_by_step_stays_sticky(slots in slot_count(), n in 2usize..10) {
        let mut members = vec![worker(0)];
        let mut owners = assign(slots, &members, &[]);
        for i in 1..n {
            members.push(worker(i));
            let next = assign(slots, &members, &some(&owners));
            let moved = moved_slots(&some(&owners), &next).len();
            prop_assert!(moved <= (slots.get() as usize).div_ceil(i + 1));
            let counts: BTreeMap<_, _> = holdings(&next).into_iter().map(|(k, v)| (k.clone(), v)).collect();
            prop_assert!(counts.values().max().unwrap() - counts.values().min().unwrap() <= 1 || slots.get() < members.len() as u32);
            owners = next;
        }
    }
}
