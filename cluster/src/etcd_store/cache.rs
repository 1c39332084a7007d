//! Values this client saw, so that the first attempt of a transaction that
//! means to commit need not read them from etcd again.
//!
//! On etcd 3.4 every read request copies the backend's buffer of writes not
//! yet flushed to disk (`txReadBuffer.unsafeCopy`), so under a write load a
//! read costs the member far more than the key it returns: measured on the
//! 2-core machine, reads made half of a send's etcd CPU. Most of what a
//! transaction reads changes rarely (a name, a formula, a lease, an inbox's
//! marks) and was read, or written, by this client moments ago.
//!
//! # Why a stale value is safe
//!
//! Only snapshots that are not fresh ([`crate::Store::snapshot_for_commit`])
//! answer from the cache, and what such a snapshot read counts only once a
//! commit validated it ([`crate::Db::transact`] works an answer out again
//! on a fresh snapshot when the transaction fails or writes nothing). A
//! value served from the cache goes to the commit with the mod revision it
//! had when this client saw it ([`crate::ReadFacts`]), and the commit
//! compares `mod_revision(key) == m`: mod revisions only grow, so the
//! compare holds only if the key still has exactly the value served. A
//! stale entry therefore costs a conflict (and the retry reads afresh),
//! never a wrong commit. An entry is dropped when a commit that read it
//! conflicts, so the next transaction reads the key from etcd.
//!
//! # Bounds
//!
//! At most [`MAX_BYTES`] of keys and values and [`MAX_ENTRIES`] entries;
//! values over [`MAX_VALUE`] are not kept. The oldest entries go first.

use std::collections::{BTreeMap, VecDeque};

use crate::store::Version;

/// Most bytes (keys and values) the cache holds.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;
/// Most entries the cache holds.
pub const MAX_ENTRIES: usize = 100_000;
/// Largest value kept.
pub const MAX_VALUE: usize = 16 * 1024;

/// What was known of one key.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// The value (`None`: absent).
    pub value: Option<Vec<u8>>,
    /// Its mod revision (0: absent).
    pub mod_revision: i64,
    /// The revision at which this was true.
    seen_at: Version,
}

impl Entry {
    fn bytes(&self, key: &[u8]) -> usize {
        key.len() + self.value.as_ref().map_or(0, Vec::len) + 32
    }
}

/// See the module documentation.
#[derive(Default)]
pub(super) struct ValueCache {
    map: BTreeMap<Vec<u8>, Entry>,
    /// Keys in the order they were (re)learned, with the `seen_at` of that
    /// learning: an item whose entry was learned again since is skipped.
    order: VecDeque<(Vec<u8>, Version)>,
    bytes: usize,
}

impl ValueCache {
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Learns that `key` held `value` (mod revision `mod_revision`) at
    /// revision `seen_at`; ignored if what is known is as recent, or the
    /// value too large (then what was known is dropped: it may be older).
    pub fn learn(&mut self, key: &[u8], value: Option<&[u8]>, mod_revision: i64, seen_at: Version) {
        if let Some(old) = self.map.get(key)
            && old.seen_at >= seen_at
        {
            return;
        }
        if value.is_some_and(|v| v.len() > MAX_VALUE) {
            self.forget(key);
            return;
        }
        let entry = Entry {
            value: value.map(<[u8]>::to_vec),
            mod_revision,
            seen_at,
        };
        self.bytes += entry.bytes(key);
        if let Some(old) = self.map.insert(key.to_vec(), entry) {
            self.bytes -= old.bytes(key);
        }
        self.order.push_back((key.to_vec(), seen_at));
        self.evict();
    }

    pub fn forget(&mut self, key: &[u8]) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.bytes(key);
        }
    }

    /// Forgets the keys of `[begin, end)`.
    pub fn forget_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        let keys: Vec<Vec<u8>> = self
            .map
            .range::<[u8], _>((
                std::ops::Bound::Included(begin),
                std::ops::Bound::Excluded(end),
            ))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.forget(&k);
        }
    }

    fn evict(&mut self) {
        while self.bytes > MAX_BYTES
            || self.map.len() > MAX_ENTRIES
            || self.order.len() > 2 * MAX_ENTRIES
        {
            let Some((key, seen_at)) = self.order.pop_front() else {
                return;
            };
            if self.map.get(&key).is_some_and(|e| e.seen_at == seen_at) {
                self.forget(&key);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_facts_win_and_older_ones_are_ignored() {
        let mut c = ValueCache::default();
        c.learn(b"k", Some(b"v2"), 20, 25);
        c.learn(b"k", Some(b"v1"), 10, 15);
        assert_eq!(c.get(b"k").map(|e| e.mod_revision), Some(20));
        c.learn(b"k", None, 0, 30);
        assert_eq!(c.get(b"k").map(|e| e.value.clone()), Some(None));
    }

    #[test]
    fn large_values_are_not_kept_and_drop_what_was_known() {
        let mut c = ValueCache::default();
        c.learn(b"k", Some(b"small"), 5, 5);
        c.learn(b"k", Some(&vec![0; MAX_VALUE + 1]), 6, 6);
        assert!(c.get(b"k").is_none());
    }

    #[test]
    fn bounded_by_entries_and_bytes_oldest_first() {
        let mut c = ValueCache::default();
        for i in 0..(MAX_ENTRIES + 10) as u64 {
            c.learn(&i.to_be_bytes(), Some(b"v"), 1, i + 1);
        }
        assert_eq!(c.len(), MAX_ENTRIES);
        assert!(c.get(&0u64.to_be_bytes()).is_none());
        assert!(c.get(&((MAX_ENTRIES + 9) as u64).to_be_bytes()).is_some());
        let mut c = ValueCache::default();
        let big = vec![1u8; MAX_VALUE];
        for i in 0..(2 * MAX_BYTES / MAX_VALUE) as u64 {
            c.learn(&i.to_be_bytes(), Some(&big), 1, i + 1);
        }
        assert!(c.bytes <= MAX_BYTES);
    }

    #[test]
    fn ranges_are_forgotten() {
        let mut c = ValueCache::default();
        for k in [b"a", b"b", b"c"] {
            c.learn(k, Some(b"v"), 1, 1);
        }
        c.forget_range(b"b", b"c");
        assert!(c.get(b"a").is_some() && c.get(b"b").is_none() && c.get(b"c").is_some());
    }
}
