//! Exactly-once guest handlers.
//!
//! A handler's effects are store writes made through host calls (`send`,
//! `reply`, `store-text`, …), each with a request id derived from the
//! message number and the write's index, so the same write made again
//! applies once and answers what it answered the first time. That alone is
//! not enough: a handler cut short (its node died, it lost its placement,
//! it ran past its deadline) is run again from the start, and if what it
//! *read* changed in between — often because of its own first writes — the
//! second run takes another path: a counter that stored 1 reads 1 and
//! answers "count = 2" to its first increment.
//!
//! So every host call of a handler gets an index, and the answers of the
//! calls that read or that failed are journaled: buffered in memory and
//! written *in the same transaction as the next write that commits* (by
//! [`crate::agent::AgentHandle::transact`]). Reads after the last committed
//! write need no record: nothing durable depended on them. A run of a
//! message that was started before (it has a journal, or its first write
//! is recorded) replays: journaled answers are given back without calling
//! anything, recorded writes answer from their exactly-once record, and the
//! first call past the journal runs live. The runner clears the journal in
//! the transaction that marks the message handled.
//!
//! Guests are deterministic given their host calls' answers (the agent
//! world has no clock and no randomness), so the replay retraces the first
//! run's path exactly.

use std::sync::Mutex;

use capstan_cluster::tuple::TupleKey;
use capstan_proto::FormulaId;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Most bytes of journal one message's handler may accumulate; past it the
/// guest is stopped (it reads a lot without ever writing).
pub(crate) const MAX_JOURNAL_BYTES: usize = 512 * 1024;

/// The recorded answer of one host call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Entry {
    /// `list`: the names seen.
    List(Vec<String>),
    /// `lookup`: the formula and kind the name designated, or why not.
    Lookup(Result<(String, String), String>),
    /// `read-text` and `capability.read`: the value read (values are
    /// immutable: its formula id is enough), none, or why not.
    Value(Result<Option<String>, String>),
    /// A write that failed, with the error the guest saw.
    Failed(String),
    /// `llm.chat`: the model's answer (JSON) or why not.
    Llm(Result<String, String>),
    /// `search.search`: the answer (JSON) or why not.
    Search(Result<String, String>),
}

impl Entry {
    fn size(&self) -> usize {
        match self {
            Entry::List(v) => v.iter().map(|s| s.len() + 3).sum::<usize>() + 16,
            Entry::Lookup(r) => {
                16 + match r {
                    Ok((a, b)) => a.len() + b.len(),
                    Err(e) => e.len(),
                }
            }
            Entry::Value(r) => {
                16 + match r {
                    Ok(Some(s)) | Err(s) => s.len(),
                    Ok(None) => 0,
                }
            }
            Entry::Failed(e) => 16 + e.len(),
            Entry::Llm(r) | Entry::Search(r) => {
                16 + match r {
                    Ok(s) | Err(s) => s.len(),
                }
            }
        }
    }
}

pub(crate) fn id_text(id: &FormulaId) -> String {
    id.to_string()
}

pub(crate) fn id_parse(s: &str) -> Result<FormulaId, Error> {
    s.parse::<FormulaId>()
        .map_err(|e| Error::Corrupt(format!("guest journal: bad formula id {s:?}: {e}")))
}

/// Where the journal of one message of a guest lives.
pub(crate) fn key(guest: &FormulaId, number: u64) -> Vec<u8> {
    TupleKey::new()
        .str("gj")
        .bytes(guest.as_bytes())
        .u64(number)
        .into_vec()
}

/// Decodes a stored journal.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<(u32, Entry)>, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("guest journal: {e}")))
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<(u32, Entry)>,
    bytes: usize,
    /// Bumped by every new entry.
    generation: u64,
    /// The generation last written by a committed transaction.
    flushed: u64,
    /// Something is stored under the key (the runner must clear it).
    stored: bool,
}

/// The journal of the message a handler is running on.
#[derive(Debug)]
pub(crate) struct Journal {
    key: Vec<u8>,
    state: Mutex<State>,
}

impl Journal {
    /// A journal holding what was recorded by earlier runs.
    pub(crate) fn new(guest: &FormulaId, number: u64, loaded: Vec<(u32, Entry)>) -> Journal {
        let bytes = loaded.iter().map(|(_, e)| e.size()).sum();
        let stored = !loaded.is_empty();
        Journal {
            key: key(guest, number),
            state: Mutex::new(State {
                entries: loaded,
                bytes,
                stored,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the answer of call `index`; refused past [`MAX_JOURNAL_BYTES`].
    pub(crate) fn record(&self, index: u32, entry: Entry) -> Result<(), String> {
        let mut s = self.lock();
        let size = entry.size();
        if s.bytes + size > MAX_JOURNAL_BYTES {
            return Err(format!(
                "journal limit: the handler read more than {MAX_JOURNAL_BYTES} bytes' worth of answers without writing anything; read less per message"
            ));
        }
        s.bytes += size;
        s.entries.push((index, entry));
        s.generation += 1;
        Ok(())
    }

    /// The journal to write with the next transaction, if it has news:
    /// its encoding and generation.
    pub(crate) fn pending(&self) -> Option<(Vec<u8>, u64)> {
        let s = self.lock();
        (s.generation > s.flushed).then(|| {
            (
                serde_json::to_vec(&s.entries).unwrap_or_default(),
                s.generation,
            )
        })
    }

    pub(crate) fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    /// A transaction that wrote generation `generation` committed.
    pub(crate) fn flushed(&self, generation: u64) {
        let mut s = self.lock();
        s.flushed = s.flushed.max(generation);
        s.stored = true;
    }

    /// Something is stored under this journal's key.
    pub(crate) fn stored(&self) -> bool {
        self.lock().stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_generations_advance() {
        let g = FormulaId([7; 32]);
        let j = Journal::new(&g, 3, vec![]);
        assert!(j.pending().is_none());
        j.record(1, Entry::Value(Ok(Some(id_text(&g))))).unwrap();
        j.record(2, Entry::Failed("no such name".into())).unwrap();
        let (bytes, generation) = j.pending().unwrap();
        assert_eq!(generation, 2);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(id_parse(&id_text(&g)).unwrap(), g);
        j.flushed(generation);
        assert!(j.pending().is_none());
        assert!(j.stored());
        j.record(3, Entry::List(vec!["a".into()])).unwrap();
        assert_eq!(j.pending().unwrap().1, 3);
    }

    #[test]
    fn the_journal_is_bounded() {
        let j = Journal::new(&FormulaId([1; 32]), 0, vec![]);
        let big = vec!["x".repeat(1000); 100];
        let mut refused = false;
        for i in 0..100 {
            if j.record(i, Entry::List(big.clone())).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }

    #[test]
    fn keys_of_messages_do_not_prefix_each_other() {
        let g = FormulaId([2; 32]);
        let a = key(&g, 1);
        let b = key(&g, 10);
        let c = key(&g, 256);
        assert!(!b.starts_with(&a) && !c.starts_with(&a));
    }

    #[test]
    fn corrupt_journals_are_reported() {
        assert!(matches!(decode(b"{not json"), Err(Error::Corrupt(_))));
    }
}
