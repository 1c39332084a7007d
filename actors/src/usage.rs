//! What the store holds, by kind of key (`capstan du`).
//!
//! The scan reads the whole user key space (`["", 0xFF)`) a bounded page at
//! a time, each page from a fresh snapshot: memory stays bounded however
//! large the store is, and a long scan holds no old snapshot (etcd may
//! compact it). The figures are therefore not one consistent cut of a store
//! that changes during the scan, which is what a usage report needs.

use capstan_cluster::tuple::TupleReader;
use capstan_cluster::{RangeOption, SYSTEM_KEY_PREFIX, store::key_after};

use crate::{Error, Runtime};

/// The kinds of keys, in report order (see [`kind_of`]).
pub const KINDS: [&str; 9] = [
    "formulas", "values", "names", "messages", "dedup", "journals", "outbox", "locators", "others",
];

/// Pairs read from the store at a time.
pub const STORE_PAGE: usize = 256;
/// Most keys one [`Runtime::usage_page`] call scans by default.
pub const DEFAULT_PAGE_KEYS: usize = 10_000;
/// Most keys one call may be asked to scan.
pub const MAX_PAGE_KEYS: usize = 100_000;

/// The kind (an index into [`KINDS`]) of a key, from its first tuple element:
///
/// - formulas: `("f", …)`, reference stamps `("fref", …)`, condemned marks `("gcx", …)`
///   swept marks `("gcz", …)` and cancel events `("cnl", …)`
/// - values: `("v", …)` (the blobs of stored values larger than
///   [`crate::records::INLINE_VALUE_MAX`]; smaller ones are inside their
///   formula records)
/// - names: `("n", …)`, the reverse index `("r", …)` and the change logs
///   of watched directories `("dchg", …)`
/// - messages: `("m", …)`, inbox marks `("mark", …)`, hints `("mhi", …)`
///   and quotas `("quota", …)`
/// - dedup: exactly-once records `("d", …)` and received items `("in", …)`
/// - journals: guest journals `("gj", …)`
/// - outbox: `("outq", …)` and `("out", …)`
/// - locators: `("loc", …)` and `("locf", …)`
/// - others: everything else (meta, cluster, guest components, LLM records, …)
pub fn kind_of(key: &[u8]) -> usize {
    let first = TupleReader::new(key).str().unwrap_or_default();
    match first.as_str() {
        "f" | "fref" | "gcx" | "gcz" | "cnl" => 0,
        "v" => 1,
        "n" | "r" | "dchg" => 2,
        "m" | "mark" | "mhi" | "quota" => 3,
        "d" | "in" => 4,
        "gj" => 5,
        "outq" | "out" => 6,
        "loc" | "locf" => 7,
        _ => 8,
    }
}

/// Keys and bytes (key plus value) of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindUsage {
    pub keys: u64,
    pub bytes: u64,
}

/// What one call scanned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsagePage {
    /// Per kind, in [`KINDS`] order.
    pub kinds: [KindUsage; KINDS.len()],
    /// Where the next call starts; `None` when the scan reached the end.
    pub next: Option<Vec<u8>>,
}

impl UsagePage {
    /// Adds `other` into `self` (the `next` of `other` is kept).
    pub fn add(&mut self, other: &UsagePage) {
        for (a, b) in self.kinds.iter_mut().zip(other.kinds.iter()) {
            a.keys += b.keys;
            a.bytes += b.bytes;
        }
        self.next.clone_from(&other.next);
    }
}

impl Runtime {
    /// Scans at most `max_keys` keys (0: [`DEFAULT_PAGE_KEYS`]; capped at
    /// [`MAX_PAGE_KEYS`]) from `start` (empty: the first key) and counts
    /// them by kind. Call again from `next` until it is `None`.
    pub async fn usage_page(&self, start: &[u8], max_keys: usize) -> Result<UsagePage, Error> {
        if start.first() == Some(&SYSTEM_KEY_PREFIX) {
            return Err(Error::Invalid(
                "the scan start is past the end of the key space".into(),
            ));
        }
        let max_keys = match max_keys {
            0 => DEFAULT_PAGE_KEYS,
            n => n.min(MAX_PAGE_KEYS),
        };
        let mut page = UsagePage::default();
        let mut begin = start.to_vec();
        let mut scanned = 0usize;
        loop {
            let want = STORE_PAGE.min(max_keys - scanned);
            let rows = self
                .db()
                .store()
                .snapshot()
                .await?
                .range(&RangeOption {
                    begin: begin.clone(),
                    end: vec![SYSTEM_KEY_PREFIX],
                    limit: want,
                    reverse: false,
                })
                .await?;
            for (k, v) in &rows {
                let u = &mut page.kinds[kind_of(k)];
                u.keys += 1;
                u.bytes += (k.len() + v.len()) as u64;
            }
            scanned += rows.len();
            let Some((last, _)) = rows.last() else {
                page.next = None;
                break;
            };
            begin = key_after(last);
            if rows.len() < want {
                page.next = None;
                break;
            }
            if scanned >= max_keys {
                page.next = Some(begin);
                break;
            }
        }
        tracing::debug!(scanned, more = page.next.is_some(), "usage page");
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use capstan_proto::{FormulaId, RequestId};

    #[test]
    fn kinds_of_keys() {
        let id = FormulaId([7; 32]);
        let req = RequestId([1; 16]);
        let kind = |k: Vec<u8>| KINDS[kind_of(&k)];
        assert_eq!(kind(keys::formula(&id)), "formulas");
        assert_eq!(kind(keys::value(&id)), "values");
        assert_eq!(kind(keys::name(&id, "a")), "names");
        assert_eq!(kind(keys::reverse(&id, &id, "a")), "names");
        assert_eq!(kind(keys::dir_change(&id, 3, "a")), "names");
        assert_eq!(kind(keys::message(&id, 3)), "messages");
        assert_eq!(kind(keys::inbox_mark(&id)), "messages");
        assert_eq!(kind(keys::dedup(&id, &req)), "dedup");
        assert_eq!(kind(keys::inbound(&req)), "dedup");
        assert_eq!(kind(crate::journal::key(&id, 1)), "journals");
        assert_eq!(kind(keys::outbox(&[0; 32], 1, &req)), "outbox");
        assert_eq!(kind(keys::locator(&[0; 32])), "locators");
        assert_eq!(kind(keys::locator_of(&id, &[0; 32])), "locators");
        assert_eq!(kind(keys::root_host()), "others");
        assert_eq!(kind(b"\x01not a tuple".to_vec()), "others");
    }
}
