//! A FIFO queue that answers "what is my position?" in O(log n): a Fenwick
//! tree of presence bits over per-model arrival numbers, re-based when the
//! head moves on so memory follows the queue, not the history.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::domain::RequestId;

/// Counts over a window of arrival numbers `[base, base + tree.len())`.
#[derive(Clone, Debug, Default)]
struct Fenwick {
    base: u64,
    tree: Vec<u32>,
}

impl Fenwick {
    fn add(&mut self, slot: usize, delta: i64) {
        let mut i = slot + 1;
        while i <= self.tree.len() {
            // Counts never go below zero: only present slots are removed.
            self.tree[i - 1] = (i64::from(self.tree[i - 1]) + delta).max(0) as u32;
            i += i & i.wrapping_neg();
        }
    }

    /// Sum of slots `[0, slot)`.
    fn prefix(&self, slot: usize) -> u64 {
        let mut i = slot.min(self.tree.len());
        let mut sum = 0u64;
        while i > 0 {
            sum += u64::from(self.tree[i - 1]);
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

/// The waiting requests of one model, oldest first.
#[derive(Clone, Debug, Default)]
pub struct FifoQueue {
    /// Arrival number → request, for the head and ordered walks.
    waiting: BTreeMap<u64, RequestId>,
    arrival_of: HashMap<RequestId, u64>,
    /// The arrival number the next request gets.
    next: u64,
    counts: Fenwick,
}

impl FifoQueue {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn head(&self) -> Option<RequestId> {
        self.waiting.values().next().copied()
    }

    /// Waiting requests in queue order.
    pub fn iter(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.values().copied()
    }

    /// Waiting requests after arrival number `after` (all when None), in
    /// queue order, with their arrival numbers: a cursor for long walks.
    pub fn iter_after(&self, after: Option<u64>) -> impl Iterator<Item = (u64, RequestId)> + '_ {
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        self.waiting
            .range((start, std::ops::Bound::Unbounded))
            .map(|(a, id)| (*a, *id))
    }

    /// Adds `id` at the back. A request already waiting is left where it is.
    pub fn push(&mut self, id: RequestId) {
        if self.arrival_of.contains_key(&id) {
            return;
        }
        let arrival = self.next;
        self.next += 1;
        if arrival - self.counts.base >= self.counts.tree.len() as u64 {
            self.rebuild();
        }
        self.waiting.insert(arrival, id);
        self.arrival_of.insert(id, arrival);
        self.counts.add((arrival - self.counts.base) as usize, 1);
    }

    /// Removes `id` wherever it is; false when it was not waiting.
    pub fn remove(&mut self, id: RequestId) -> bool {
        let Some(arrival) = self.arrival_of.remove(&id) else {
            return false;
        };
        self.waiting.remove(&arrival);
        self.counts.add((arrival - self.counts.base) as usize, -1);
        true
    }

    /// 1-based position (1 = next to start), in O(log n).
    pub fn position(&self, id: RequestId) -> Option<usize> {
        let arrival = *self.arrival_of.get(&id)?;
        Some(self.counts.prefix((arrival - self.counts.base) as usize) as usize + 1)
    }

    /// Re-bases the window at the current head with room for at least as
    /// many new arrivals as are waiting, so rebuilds cost O(1) amortised.
    fn rebuild(&mut self) {
        let base = self
            .waiting
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next.saturating_sub(1));
        let span = (self.next - base) as usize;
        let capacity = (span * 2).max(64).next_power_of_two();
        let mut counts = Fenwick {
            base,
            tree: vec![0; capacity],
        };
        // Linear-time Fenwick construction.
        for &arrival in self.waiting.keys() {
            counts.tree[(arrival - base) as usize] += 1;
        }
        for i in 1..=capacity {
            let parent = i + (i & i.wrapping_neg());
            if parent <= capacity {
                let v = counts.tree[i - 1];
                counts.tree[parent - 1] += v;
            }
        }
        self.counts = counts;
    }
}

/// Two queues are equal when they hold the same requests in the same order
/// and would number the next arrival alike; the Fenwick window is a cache.
impl PartialEq for FifoQueue {
    fn eq(&self, other: &Self) -> bool {
        self.next == other.next && self.waiting == other.waiting
    }
}

impl Eq for FifoQueue {}

#[derive(Serialize, Deserialize)]
struct FifoRepr {
    next: u64,
    waiting: Vec<(u64, RequestId)>,
}

impl Serialize for FifoQueue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        FifoRepr {
            next: self.next,
            waiting: self.waiting.iter().map(|(a, id)| (*a, *id)).collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for FifoQueue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let repr = FifoRepr::deserialize(d)?;
        let mut q = FifoQueue {
            next: repr.next,
            ..FifoQueue::default()
        };
        for (arrival, id) in repr.waiting {
            if arrival >= repr.next {
                return Err(serde::de::Error::custom(
                    "queue entry beyond its arrival counter",
                ));
            }
            q.waiting.insert(arrival, id);
            q.arrival_of.insert(id, arrival);
        }
        q.rebuild();
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> RequestId {
        RequestId(uuid::Uuid::from_u128(n))
    }

    proptest! {
        /// Positions agree with a plain list under any mix of pushes, head
        /// pops and removals from the middle.
        #[test]
        fn positions_match_a_list(ops in proptest::collection::vec((0u8..3, 0u128..40), 0..300)) {
            let mut q = FifoQueue::default();
            let mut list: Vec<RequestId> = Vec::new();
            let mut fresh = 1000u128;
            for (op, n) in ops {
                match op {
                    0 => { fresh += 1; q.push(id(fresh)); list.push(id(fresh)); }
                    1 => { if let Some(h) = q.head() { prop_assert_eq!(Some(&h), list.first()); q.remove(h); list.remove(0); } }
                    _ => { if !list.is_empty() { let i = (n as usize) % list.len(); let r = list.remove(i); prop_assert!(q.remove(r)); } }
                }
                prop_assert_eq!(q.len(), list.len());
                for (i, r) in list.iter().enumerate() {
                    prop_assert_eq!(q.position(*r), Some(i + 1));
                }
                let round: FifoQueue = serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
                prop_assert_eq!(&round, &q);
            }
        }
    }
}
