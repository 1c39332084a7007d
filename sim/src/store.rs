//! Each node's view of the shared store: a gate that a kill closes for
//! good and a pause closes for a while, and an observer that sees every
//! commit (for the invariants, see [`crate::check`]).
//!
//! A killed node's calls never return (a process killed with `kill -9`
//! does nothing more; a commit it had already sent may still land, as the
//! store's own delays allow). A paused node's calls wait until the pause
//! ends, then go on with the snapshots they held: its lease lapses
//! meanwhile and its late writes must be fenced.

use std::sync::{Arc, Mutex};

use capstan_cluster::mem_store::MemStore;
use capstan_cluster::store::FilledNumber;
use capstan_cluster::{
    CommitRequest, KeyValue, Mutation, RangeOption, Snapshot, Store, StoreError, Version,
};
use tokio::time::Instant;

use crate::check::Model;

/// Whether a node's calls reach the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// They do.
    Open,
    /// They wait until the instant.
    Paused(Instant),
    /// They never return.
    Killed,
}

/// The gate of one incarnation of a node (a restart gets a new one).
#[derive(Debug)]
pub struct Gate(Mutex<GateState>);

impl Gate {
    /// An open gate.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate(Mutex::new(GateState::Open)))
    }

    /// The gate's state now.
    pub fn state(&self) -> GateState {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate for good.
    pub fn kill(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = GateState::Killed;
    }

    /// Closes the gate until `until` (unless killed).
    pub fn pause(&self, until: Instant) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *s != GateState::Killed {
            *s = GateState::Paused(until);
        }
    }

    /// Opens a paused gate now.
    pub fn resume(&self) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*s, GateState::Paused(_)) {
            *s = GateState::Open;
        }
    }

    async fn pass(&self) {
        loop {
            match self.state() {
                GateState::Open => return,
                GateState::Paused(t) => {
                    if Instant::now() >= t {
                        self.resume();
                        return;
                    }
                    tokio::time::sleep_until(t).await;
                }
                GateState::Killed => futures::future::pending::<()>().await,
            }
        }
    }
}

/// A node's store: the shared [`MemStore`] behind the node's [`Gate`],
/// every commit shown to the [`Model`].
pub struct NodeStore {
    pub(crate) inner: Arc<MemStore>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) model: Arc<Mutex<Model>>,
    pub(crate) node: String,
    /// Numbers filled in at commit, as the etcd store's relay does
    /// ([`Fills`]); `None`: this store refuses commits with numbers to fill
    /// (as the embedded stores do), and nodes reserve every number.
    pub(crate) fills: Option<Arc<Fills>>,
}

/// The simulation's stand-in for a relay that fills numbers in
/// (`capstan_cluster::etcd_store`'s `commit_relayed_filled`): a commit with
/// numbers to fill gets them from the node's filler (`InboxFiller`: the
/// inbox's owner hands them out, over the member links when it is another
/// node), written over its placeholders, then commits. Like a relay, it
/// may also refuse to fill (a paused relay, or none): then nothing is
/// written and the sender reserves its number itself.
pub struct Fills {
    filler: Mutex<Option<Arc<dyn capstan_cluster::relay::Filler>>>,
    /// Percent of commits with numbers to fill that it refuses.
    refuse_pct: u64,
    rng: Mutex<crate::rng::Rng>,
    counts: Mutex<FillCounts>,
}

/// What the stand-in relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillCounts {
    /// Commits whose numbers were filled in and sent to the store.
    pub filled: u64,
    /// Commits refused before anything was written.
    pub refused: u64,
}

impl std::iter::Sum for FillCounts {
    fn sum<I: Iterator<Item = FillCounts>>(iter: I) -> FillCounts {
        iter.fold(FillCounts::default(), |a, c| FillCounts {
            filled: a.filled + c.filled,
            refused: a.refused + c.refused,
        })
    }
}

impl Fills {
    pub fn new(refuse_pct: u64, rng: crate::rng::Rng) -> Arc<Fills> {
        Arc::new(Fills {
            filler: Mutex::new(None),
            refuse_pct,
            rng: Mutex::new(rng),
            counts: Mutex::new(FillCounts::default()),
        })
    }

    /// What it did so far.
    pub fn counts(&self) -> FillCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the filler (a node killed: its runtime is gone).
    pub fn clear(&self) {
        *self.filler.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn count(&self, f: impl FnOnce(&mut FillCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Fills `req`'s numbers in, or says why not (nothing written): the
    /// number each placeholder got, to answer once the commit applied.
    async fn fill(
        &self,
        store: &MemStore,
        req: &mut CommitRequest,
    ) -> Result<Vec<(capstan_cluster::store::Filled, FilledNumber)>, StoreError> {
        let refuse = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .percent(self.refuse_pct);
        let filler = self
            .filler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let filler = match filler {
            Some(f) if !refuse => f,
            _ => {
                self.count(|c| c.refused += 1);
                return Err(StoreError::FillUnavailable(
                    "the simulated relay fills no numbers in now".into(),
                ));
            }
        };
        // One call per sequence for all of its placeholders, as a relay
        // asks once per group.
        let mut numbers = rustc_hash::FxHashMap::default();
        let mut notes = rustc_hash::FxHashMap::default();
        for g in capstan_cluster::relay::GroupFill::gather(&req.fills) {
            let a = filler
                .fill(&g.scope, g.placeholders.len() as u32)
                .await
                .map_err(StoreError::FillUnavailable)?;
            for (i, p) in g.placeholders.iter().enumerate() {
                numbers.insert(*p, a.first + i as u64);
                notes.insert(*p, a.notes.clone());
            }
        }
        let answers = req
            .fills
            .iter()
            .map(|f| {
                let number = numbers[&f.placeholder];
                let notes = notes.remove(&f.placeholder).unwrap_or_default();
                (f.filled.clone(), FilledNumber { number, notes })
            })
            .collect();
        let before: Vec<Vec<u8>> = req.mutations.iter().map(|m| m.written_range().0).collect();
        if req.fill_in(&numbers).len() != numbers.len() {
            return Err(StoreError::Io(
                "a number to fill in has no placeholder in the commit".into(),
            ));
        }
        // A filled slot must be empty, as the relay's compare "absent now"
        // checks (a number a stale sequence handed out again): empty now,
        // and not written after the transaction's snapshot.
        let filled_keys: Vec<Vec<u8>> = req
            .mutations
            .iter()
            .zip(&before)
            .filter_map(|(m, b)| match m {
                Mutation::Set(k, _) if k != b => Some(k.clone()),
                _ => None,
            })
            .collect();
        let now = store.snapshot().await?;
        for k in filled_keys {
            if now.get(&k).await?.is_some() {
                return Err(StoreError::Conflict);
            }
            let end = capstan_cluster::store::key_after(&k);
            req.read_conflicts.push((k, end));
        }
        // (filled in: the store below commits it as any other)
        req.fills.clear();
        self.count(|c| c.filled += 1);
        Ok(answers)
    }
}

#[async_trait::async_trait]
impl Store for NodeStore {
    fn describe(&self) -> String {
        format!("sim node {} on {}", self.node, self.inner.describe())
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        self.gate.pass().await;
        let s = self.inner.snapshot().await?;
        self.gate.pass().await;
        Ok(Box::new(NodeSnapshot {
            inner: s,
            gate: self.gate.clone(),
        }))
    }

    fn fills(&self) -> bool {
        self.fills.is_some()
    }

    fn relaying_now(&self) -> bool {
        self.fills.is_some()
    }

    fn set_filler(&self, filler: Option<Arc<dyn capstan_cluster::relay::Filler>>) {
        if let Some(f) = &self.fills {
            *f.filler.lock().unwrap_or_else(|e| e.into_inner()) = filler;
        }
    }

    async fn commit(&self, mut req: CommitRequest) -> Result<Version, StoreError> {
        self.gate.pass().await;
        let answers = match (&self.fills, req.fills.is_empty()) {
            (_, true) => Vec::new(),
            (Some(f), false) => f.fill(&self.inner, &mut req).await?,
            (None, false) => {
                return Err(StoreError::FillUnavailable(
                    "this simulated store fills no numbers in".into(),
                ));
            }
        };
        let mutations = req.mutations.clone();
        let r = self.inner.commit(req).await;
        // (a lost answer leaves them unknown: the sender reads what it wrote)
        if r.is_ok() {
            for (filled, n) in answers {
                let _ = filled.set(n);
            }
        }
        // Nothing ran between the commit's end and here (one thread, no
        // await since): the store is as the commit left it.
        let applied = match &r {
            Ok(_) => true,
            Err(StoreError::MaybeCommitted) => crate::check::all_applied(&self.inner, &mutations),
            Err(_) => false,
        };
        if applied {
            let mut m = self.model.lock().unwrap_or_else(|e| e.into_inner());
            m.observe(&self.inner, &mutations);
        }
        // The caller hears back only while the node lives.
        self.gate.pass().await;
        r
    }
}

struct NodeSnapshot {
    inner: Box<dyn Snapshot>,
    gate: Arc<Gate>,
}

#[async_trait::async_trait]
impl Snapshot for NodeSnapshot {
    fn version(&self) -> Version {
        self.inner.version()
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.gate.pass().await;
        let r = self.inner.get(key).await;
        self.gate.pass().await;
        r
    }

    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        self.gate.pass().await;
        let r = self.inner.range(opt).await;
        self.gate.pass().await;
        r
    }

    fn is_fresh(&self) -> bool {
        self.inner.is_fresh()
    }
}
