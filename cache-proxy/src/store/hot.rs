//! Recently read objects, served without touching the index or the packs.
//!
//! Entries are verified objects. Every key the writer changes (put,
//! metadata, pin, removal, eviction) is dropped and marked *in flight*
//! just before the commit, and dropped again and unmarked after it, before
//! any acknowledgement. While in flight no insert is accepted, so hits fall
//! through to the index, whose snapshots only move forward: reads never go
//! back to an older version, and once a `put` has returned no hit serves
//! the previous one. A reader that looked a key up in the index before the
//! change must not insert what it read after it: each change gets an
//! epoch, a reader notes the epoch before its lookup, and an insert is
//! refused if the key changed since (or if the record of recent changes was
//! reset since, see [`RECENT_MAX`]). Eviction is FIFO by
//! insertion: a hot tile is re-inserted on its next miss, and FIFO costs
//! O(1) where the former "first key of the map" scan cost O(capacity).

use std::collections::{HashMap, HashSet, VecDeque};

use super::{KeyHash, Object};

/// Invalidations remembered for readers in flight. Lookups take
/// microseconds, so a few thousand covers any burst of writes; on overflow
/// the record is reset and every lookup begun before is refused insertion.
const RECENT_MAX: usize = 4096;

/// Bookkeeping per entry beyond the body, for the byte bound.
const ENTRY_OVERHEAD: usize = 256;

struct Entry {
    /// Insertion number, to tell the live queue slot from stale ones.
    seq: u64,
    /// Last access recorded in (or queued for) the index, Unix minutes.
    atime: u32,
    obj: Object,
}

/// The cache; callers hold it under a mutex for map operations only.
pub(super) struct Hot {
    capacity: usize,
    max_object: usize,
    map: HashMap<KeyHash, Entry>,
    order: VecDeque<(KeyHash, u64)>,
    bytes: usize,
    seq: u64,
    epoch: u64,
    recent: HashMap<KeyHash, u64>,
    floor: u64,
    in_flight: HashSet<KeyHash>,
}

impl Hot {
    pub(super) fn new(capacity: usize, max_object: usize) -> Hot {
        Hot {
            capacity,
            max_object,
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            seq: 0,
            epoch: 0,
            recent: HashMap::new(),
            floor: 0,
            in_flight: HashSet::new(),
        }
    }

    /// The object and its recorded access time; `touch` records a newer one.
    pub(super) fn get(
        &mut self,
        key: &KeyHash,
        touch: impl FnOnce(u32) -> Option<u32>,
    ) -> Option<Object> {
        let e = self.map.get_mut(key)?;
        if let Some(t) = touch(e.atime) {
            e.atime = t;
        }
        Some(e.obj.clone())
    }

    /// The epoch to pass to [`Hot::insert`] for a lookup starting now.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Inserts what a lookup begun at `epoch` read, unless the key was
    /// invalidated since.
    pub(super) fn insert(&mut self, key: KeyHash, epoch: u64, atime: u32, obj: &Object) {
        let size = obj.body.len() + ENTRY_OVERHEAD;
        if obj.body.len() > self.max_object
            || size > self.capacity
            || epoch < self.floor
            || self.in_flight.contains(&key)
            || self.recent.get(&key).is_some_and(|e| *e > epoch)
        {
            return;
        }
        self.remove(&key);
        while self.bytes + size > self.capacity {
            let Some((k, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|e| e.seq == seq) {
                self.remove(&k);
            }
        }
        self.seq += 1;
        self.order.push_back((key, self.seq));
        self.map.insert(
            key,
            Entry {
                seq: self.seq,
                atime,
                obj: obj.clone(),
            },
        );
        self.bytes += size;
        if self.order.len() > 2 * self.map.len() + 1024 {
            // Stale slots of removed entries: drop them.
            let map = &self.map;
            self.order
                .retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
    }

    fn remove(&mut self, key: &KeyHash) {
        if let Some(e) = self.map.remove(key) {
            self.bytes -= e.obj.body.len() + ENTRY_OVERHEAD;
        }
    }

    /// The writer is about to commit changes to `keys`.
    pub(super) fn begin_change(&mut self, keys: &[KeyHash]) {
        for k in keys {
            self.in_flight.insert(*k);
            self.invalidate(k);
        }
    }

    /// The writer committed (or rolled back) its changes to `keys`.
    pub(super) fn end_change(&mut self, keys: &[KeyHash]) {
        for k in keys {
            self.in_flight.remove(k);
            self.invalidate(k);
        }
    }

    /// Drops `key` and refuses inserts of lookups that began before now.
    fn invalidate(&mut self, key: &KeyHash) {
        self.remove(key);
        self.epoch += 1;
        if self.recent.len() >= RECENT_MAX {
            self.recent.clear();
            self.floor = self.epoch;
        }
        self.recent.insert(*key, self.epoch);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectMeta;
    use bytes::Bytes;

    fn obj(n: usize) -> Object {
        Object {
            meta: ObjectMeta {
                status: 200,
                headers: Default::default(),
                request_time: 0,
                response_time: 0,
                pinned: false,
            },
            body: Bytes::from(vec![1u8; n]),
        }
    }

    #[test]
    fn bounded_fifo_and_invalidation() {
        let mut h = Hot::new(10 * (1000 + ENTRY_OVERHEAD), 5000);
        for i in 0..100u8 {
            let e = h.epoch();
            h.insert([i; 16], e, 0, &obj(1000));
        }
        assert_eq!(h.len(), 10);
        assert!(h.get(&[99; 16], |_| None).is_some());
        assert!(h.get(&[0; 16], |_| None).is_none());
        // A lookup that began before an invalidation does not insert.
        let e = h.epoch();
        h.begin_change(&[[99; 16]]);
        assert!(h.get(&[99; 16], |_| None).is_none());
        // While the change is in flight, not even a fresh lookup inserts.
        let fresh = h.epoch();
        h.insert([99; 16], fresh, 0, &obj(1000));
        assert!(h.get(&[99; 16], |_| None).is_none());
        h.end_change(&[[99; 16]]);
        h.insert([99; 16], e, 0, &obj(1000));
        h.insert([99; 16], fresh, 0, &obj(1000));
        assert!(h.get(&[99; 16], |_| None).is_none());
        let e = h.epoch();
        h.insert([99; 16], e, 0, &obj(1000));
        assert!(h.get(&[99; 16], |_| None).is_some());
        // Too large: not kept.
        let e = h.epoch();
        h.insert([200; 16], e, 0, &obj(6000));
        assert!(h.get(&[200; 16], |_| None).is_none());
        // Overflowing the invalidation record refuses older lookups.
        let e = h.epoch();
        for i in 0..RECENT_MAX as u32 + 1 {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[15] = 1;
            h.end_change(&[k]);
        }
        h.insert([201; 16], e, 0, &obj(10));
        assert!(h.get(&[201; 16], |_| None).is_none());
        // Re-inserting one key over and over keeps the queue bounded.
        for _ in 0..10_000 {
            let e = h.epoch();
            h.insert([7; 16], e, 0, &obj(10));
        }
        assert!(h.order.len() <= 2 * h.map.len() + 1025);
    }
}
