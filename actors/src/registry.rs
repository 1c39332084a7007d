//! The live incarnations of one node ([`Registry`], held by
//! [`crate::node::Inner`]) and the messages they take.
//!
//! A leaf below `node`: the node holds the registry and wakes incarnations
//! through it, while the actors themselves ([`crate::incarnation`]) sit
//! above the node (they hold it).

use std::collections::HashMap;
use std::sync::Mutex;

use capstan_proto::FormulaId;
use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::records::MessageRec;
use crate::types::PromiseState;

/// The live actors of a runtime, by formula id.
pub(crate) struct Registry {
    pub agents: Mutex<HashMap<FormulaId, ActorRef<AgentMsg>>>,
    pub promises: Mutex<HashMap<FormulaId, ActorRef<PromiseMsg>>>,
    pub spawn_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            agents: Mutex::new(HashMap::new()),
            promises: Mutex::new(HashMap::new()),
            spawn_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn count(&self) -> usize {
        self.agents.lock().map(|m| m.len()).unwrap_or(0)
            + self.promises.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Every live agent incarnation, in id order: a node stops them one by
    /// one, and the same order every time keeps a simulated run replaying
    /// exactly (a map's own order changes with each process).
    pub fn agents_in_order(&self) -> Vec<ActorRef<AgentMsg>> {
        in_order(&self.agents)
    }

    /// Every live promise incarnation, in id order.
    pub fn promises_in_order(&self) -> Vec<ActorRef<PromiseMsg>> {
        in_order(&self.promises)
    }

    /// The live incarnation of agent `id` on this node, if any.
    pub fn agent(&self, id: &FormulaId) -> Option<ActorRef<AgentMsg>> {
        self.agents.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// The live incarnation of promise `id` on this node, if any.
    pub fn promise(&self, id: &FormulaId) -> Option<ActorRef<PromiseMsg>> {
        self.promises.lock().ok().and_then(|m| m.get(id).cloned())
    }
}

fn in_order<M>(map: &Mutex<HashMap<FormulaId, ActorRef<M>>>) -> Vec<ActorRef<M>> {
    let mut all: Vec<_> = map
        .lock()
        .map(|m| m.iter().map(|(id, a)| (*id, a.clone())).collect())
        .unwrap_or_default();
    all.sort_unstable_by_key(|(id, _)| *id);
    all.into_iter().map(|(_, a)| a).collect()
}

/// Messages of an agent's actor (`crate::incarnation`).
pub enum AgentMsg {
    /// Reserve `n` consecutive inbox numbers, none below the second
    /// argument; answers the first (or an error if this incarnation does
    /// not own the inbox). With an admission, first admits so many
    /// messages of about so many bytes under the inbox's quota, all or
    /// none ([`crate::quota`]).
    Reserve(
        u64,
        u64,
        Option<crate::types::Admit>,
        RpcReplyPort<Result<u64, Error>>,
    ),
    /// A count of the inbox for its quota, read in a task of its own for
    /// the admissions waiting on it ([`crate::quota::Account::read_count`]).
    Counted(Result<crate::types::Counted, Error>),
    /// Room was given back (a dismissal on this node) or the limits
    /// changed: recount at the next refusal.
    Freed,
    /// Become the owner of the inbox (a cluster placement was claimed):
    /// read the sequence from the store and start the guest's runner.
    Own(RpcReplyPort<Result<(), Error>>),
    /// A message was committed to this inbox: tell the followers.
    Delivered(MessageRec),
    /// Add a follower of new messages.
    Follow(mpsc::Sender<MessageRec>, RpcReplyPort<Result<(), Error>>),
    /// A follower found in the store a message no push brought: the
    /// inbox's owner (or the senders it tells) may not know this node
    /// follows it; tell it again, looking the owner up afresh.
    MissedPush,
    /// Periodic check for passivation.
    Tick,
}

/// Messages of a promise's actor (`crate::incarnation`).
pub enum PromiseMsg {
    /// Answer when the promise settles.
    Wait(oneshot::Sender<Result<PromiseState, Error>>),
    /// The promise was settled by a committed transaction.
    Settled(PromiseState),
    Tick,
}
