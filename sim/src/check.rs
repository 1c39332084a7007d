//! The invariants, checked against a model of the store built from every
//! commit the nodes make ([`Model::observe`], called by
//! [`crate::store::NodeStore`] right after each commit) and, at the end,
//! against the store itself ([`crate::sim`] reads it after quiescing).
//!
//! Checked at every commit and step:
//! - *present once*: no message (a workload id `k`) sits in a guest's inbox
//!   under two numbers;
//! - *handled once*: no message's effect is recorded twice;
//! - *nothing skipped*: no message is present below a guest's "handled up
//!   to" mark without having been handled (caught when the mark passes it,
//!   and when a message lands below the mark);
//! - *no fenced write*: a handler's commit names the placement it held, and
//!   the store's placement record says the same right after the commit;
//! - *settled once*: no request answered by two different calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use capstan_actors::cluster::PlacementRec;
use capstan_actors::records::{BodyRec, MessageRec};
use capstan_cluster::Mutation;
use capstan_cluster::mem_store::MemStore;
use capstan_cluster::tuple::TupleKey;
use capstan_proto::FormulaId;

/// The keys the harness's handlers write (beside the runtime's).
pub mod keys {
    use super::*;

    /// A guest's "handled up to" mark (the runner's `next`).
    pub fn mark(g: &FormulaId) -> Vec<u8> {
        TupleKey::new()
            .str("sim")
            .str("next")
            .bytes(g.as_bytes())
            .into_vec()
    }
    /// The record of message `n` of guest `g` handled: [`Handled`].
    pub fn handled(g: &FormulaId, n: u64) -> Vec<u8> {
        TupleKey::new()
            .str("sim")
            .str("h")
            .bytes(g.as_bytes())
            .u64(n)
            .into_vec()
    }
    pub fn handled_prefix() -> Vec<u8> {
        TupleKey::new().str("sim").str("h").into_vec()
    }
    /// How many times message `k`'s effect happened (u32, big-endian).
    pub fn effect(k: u64) -> Vec<u8> {
        TupleKey::new().str("sim").str("e").u64(k).into_vec()
    }
    pub fn effect_prefix() -> Vec<u8> {
        TupleKey::new().str("sim").str("e").into_vec()
    }
    /// The placement record of `id` (as `capstan_actors::cluster` writes it).
    pub fn placement(id: &FormulaId) -> Vec<u8> {
        TupleKey::new()
            .str("cl")
            .str("p")
            .bytes(id.as_bytes())
            .into_vec()
    }
}

/// What a handler records with a message it handled: who handled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub node: String,
    pub epoch: u64,
    /// The guest's index and the message's number and workload id.
    pub guest: usize,
    pub n: u64,
    pub k: u64,
}

impl Handled {
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{} {} {} {} {}",
            self.node, self.epoch, self.guest, self.n, self.k
        )
        .into_bytes()
    }
    pub fn decode(b: &[u8]) -> Option<Handled> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(' ');
        Some(Handled {
            node: it.next()?.to_string(),
            epoch: it.next()?.parse().ok()?,
            guest: it.next()?.parse().ok()?,
            n: it.next()?.parse().ok()?,
            k: it.next()?.parse().ok()?,
        })
    }
}

/// A message's workload id `k` and kind, from its text (`k12` a package,
/// `r12` a request; `f12` and `q12` the same from the other cluster).
pub fn workload_id(rec: &MessageRec) -> Option<(u64, bool)> {
    match &rec.body {
        BodyRec::Package { strings, .. } => {
            let s = strings.first()?;
            let k = s.strip_prefix('k').or_else(|| s.strip_prefix('f'))?;
            Some((k.parse().ok()?, false))
        }
        BodyRec::Request { description, .. } => {
            let d = description;
            let k = d.strip_prefix('r').or_else(|| d.strip_prefix('q'))?;
            Some((k.parse().ok()?, true))
        }
    }
}

/// Whether every write of a commit answered "maybe committed" is in the
/// store now (then it was applied: nothing ran since).
pub fn all_applied(store: &MemStore, mutations: &[Mutation]) -> bool {
    // The last write of each key counts (a transaction may write one twice).
    let mut last: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
    for m in mutations {
        match m {
            Mutation::Set(k, v) => {
                last.insert(k, Some(v));
            }
            Mutation::Clear(k) => {
                last.insert(k, None);
            }
            Mutation::ClearRange(..) => {}
        }
    }
    last.into_iter()
        .all(|(k, v)| store.peek(k).0.as_deref() == v)
}

/// One message of a guest's inbox, as the model knows it.
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    pub k: u64,
    pub request: bool,
    pub present: bool,
}

/// The model of what the nodes committed (see the module docs).
#[derive(Debug, Default)]
pub struct Model {
    /// The guests, in order, and their inbox key prefixes.
    guests: Vec<(FormulaId, Vec<u8>)>,
    /// Per guest: its messages by number.
    pub inbox: Vec<BTreeMap<u64, Msg>>,
    /// Message keys of the guests' inboxes → (guest, number).
    slots: HashMap<Vec<u8>, (usize, u64)>,
    /// Per guest: its "handled up to" mark.
    pub marks: Vec<u64>,
    /// Per guest: the numbers handled.
    pub handled: Vec<BTreeSet<u64>>,
    /// Where each message `k` is present.
    present: HashMap<u64, BTreeSet<(usize, u64)>>,
    /// Handler commits seen, and those checked against the placement.
    pub handler_commits: u64,
    /// Inbox numbers the handlers closed as holes (after the grace).
    pub holes_closed: u64,
    /// Inbox numbers the handlers passed over at once, below the inbox
    /// mark (dismissed before they were handled).
    pub settled_passed: u64,
    /// Messages (their k) removed from an inbox (dismissed), whether or not
    /// the caller heard back.
    pub cleared: BTreeSet<u64>,
    /// Requests (guest, number) → the calls that settled them.
    settles: HashMap<(usize, u64), BTreeSet<[u8; 16]>>,
    /// What broke, first first.
    pub violations: Vec<String>,
}

impl Model {
    /// A model of the inboxes of `guests`.
    pub fn new(guests: &[FormulaId]) -> Model {
        Model {
            guests: guests
                .iter()
                .map(|g| (*g, capstan_actors::keys::inbox(g)))
                .collect(),
            inbox: vec![BTreeMap::new(); guests.len()],
            marks: vec![0; guests.len()],
            handled: vec![BTreeSet::new(); guests.len()],
            ..Model::default()
        }
    }

    /// Starts over with the inboxes of `guests` (before the workload).
    pub fn set_guests(&mut self, guests: &[FormulaId]) {
        *self = Model::new(guests);
    }

    /// The index of guest `g`.
    pub fn guest(&self, g: &FormulaId) -> Option<usize> {
        self.guests.iter().position(|(id, _)| id == g)
    }

    fn violation(&mut self, what: String) {
        tracing::error!("invariant broken: {what}");
        self.violations.push(what);
    }

    /// Takes in the writes of a commit that was applied.
    pub fn observe(&mut self, store: &MemStore, mutations: &[Mutation]) {
        for m in mutations {
            match m {
                Mutation::Set(k, v) => self.set(store, k, v),
                Mutation::Clear(k) => self.clear(k),
                Mutation::ClearRange(b, e) => {
                    let gone: Vec<Vec<u8>> = self
                        .slots
                        .keys()
                        .filter(|k| k.as_slice() >= b.as_slice() && k.as_slice() < e.as_slice())
                        .cloned()
                        .collect();
                    for k in gone {
                        self.clear(&k);
                    }
                }
            }
        }
    }

    fn set(&mut self, store: &MemStore, key: &[u8], value: &[u8]) {
        if let Some(g) = self.guests.iter().position(|(_, p)| key.starts_with(p)) {
            let Ok(rec) = MessageRec::decode(value) else {
                return;
            };
            if capstan_actors::keys::message(&self.guests[g].0, rec.number) != key {
                return;
            }
            let Some((k, request)) = workload_id(&rec) else {
                return;
            };
            let n = rec.number;
            if let Some(old) = self.inbox[g].get(&n)
                && old.present
            {
                if old.k != k {
                    self.violation(format!(
                        "guest {g}: slot {n} written twice (message {} then {k})",
                        old.k
                    ));
                }
                return;
            }
            self.inbox[g].insert(
                n,
                Msg {
                    k,
                    request,
                    present: true,
                },
            );
            self.slots.insert(key.to_vec(), (g, n));
            let at = self.present.entry(k).or_default();
            at.insert((g, n));
            if at.len() > 1 {
                let at = at.clone();
                self.violation(format!("message {k} present more than once: {at:?}"));
            }
            if n < self.marks[g] && !self.handled[g].contains(&n) {
                let mark = self.marks[g];
                self.violation(format!(
                    "guest {g}: message {k} landed as number {n}, below the handled mark {mark}: it will never be handled (skipped)"
                ));
            }
        } else if key.starts_with(&keys::handled_prefix()) {
            self.handler_commit(store, key, value);
        } else if key.starts_with(&keys::effect_prefix()) {
            let count = value.try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX);
            if count > 1 {
                self.violation(format!(
                    "an effect was applied {count} times (key {})",
                    hex_short(key)
                ));
            }
        } else {
            for g in 0..self.guests.len() {
                if key == keys::mark(&self.guests[g].0) {
                    let new = value.try_into().map(u64::from_be_bytes).unwrap_or_default();
                    self.mark_moved(g, new);
                }
            }
        }
    }

    fn handler_commit(&mut self, store: &MemStore, key: &[u8], value: &[u8]) {
        self.handler_commits += 1;
        let Some(h) = Handled::decode(value) else {
            self.violation(format!("handled record {} unreadable", hex_short(key)));
            return;
        };
        let (g, n) = (h.guest, h.n);
        if g >= self.guests.len() {
            return;
        }
        match self.inbox[g].get(&n) {
            Some(m) if m.k == h.k => {
                if !self.handled[g].insert(n) {
                    self.violation(format!("guest {g}: message {n} (k {}) handled twice", h.k));
                }
            }
            other => self.violation(format!(
                "guest {g}: handled message {n} as k {} but the inbox holds {other:?} there",
                h.k
            )),
        }
        let placement = store.peek(&keys::placement(&self.guests[g].0)).0;
        let p: Option<PlacementRec> = placement.and_then(|b| serde_json::from_slice(&b).ok());
        match p {
            Some(p) if p.node == h.node && p.epoch == h.epoch => {}
            other => self.violation(format!(
                "guest {g}: node {} (epoch {}) wrote a handled mark while the placement was {other:?}: a write from a fenced node",
                h.node, h.epoch
            )),
        }
    }

    fn clear(&mut self, key: &[u8]) {
        if let Some((g, n)) = self.slots.remove(key)
            && let Some(m) = self.inbox[g].get_mut(&n)
        {
            m.present = false;
            self.cleared.insert(m.k);
            if let Some(at) = self.present.get_mut(&m.k) {
                at.remove(&(g, n));
            }
        }
    }

    fn mark_moved(&mut self, g: usize, new: u64) {
        let old = self.marks[g];
        if new < old {
            self.violation(format!(
                "guest {g}: handled mark went back from {old} to {new}"
            ));
        }
        let skipped: Vec<(u64, u64)> = self.inbox[g]
            .range(old..new)
            .filter(|(n, m)| m.present && !self.handled[g].contains(n))
            .map(|(n, m)| (*n, m.k))
            .collect();
        for (n, k) in skipped {
            self.violation(format!(
                "guest {g}: the handled mark passed message {n} (k {k}) without handling it (skipped)"
            ));
        }
        self.marks[g] = new.max(old);
    }

    /// A call `req` settled request `n` of guest `g`.
    pub fn settled(&mut self, g: usize, n: u64, req: [u8; 16]) {
        let by = self.settles.entry((g, n)).or_default();
        by.insert(req);
        if by.len() > 1 {
            let count = by.len();
            self.violation(format!(
                "guest {g}: request {n} settled by {count} different calls"
            ));
        }
    }

    /// Messages present in guest `g`'s inbox not handled yet.
    pub fn unhandled(&self, g: usize) -> Vec<(u64, Msg)> {
        self.inbox[g]
            .iter()
            .filter(|(n, m)| m.present && !self.handled[g].contains(n))
            .map(|(n, m)| (*n, *m))
            .collect()
    }

    /// The numbers of messages present in guest `g`'s inbox.
    pub fn present_numbers(&self, g: usize) -> Vec<(u64, Msg)> {
        self.inbox[g]
            .iter()
            .filter(|(_, m)| m.present)
            .map(|(n, m)| (*n, *m))
            .collect()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(24).map(|x| format!("{x:02x}")).collect()
}
