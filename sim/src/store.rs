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
use capstan_cluster::{CommitRequest, KeyValue, RangeOption, Snapshot, Store, StoreError, Version};
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

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        self.gate.pass().await;
        let mutations = req.mutations.clone();
        let r = self.inner.commit(req).await;
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
