//! Coalescing concurrent reservations of inbox numbers: the state a node
//! keeps of them ([`Coalescer`], held by [`crate::node::Inner`]); serving
//! the queues is `crate::reserve`'s.
//!
//! Coalescing concurrent reservations of one number each in the same
//! inbox: while one is in flight, the others queue, and the queue is then
//! served by one reservation of as many numbers (one call to the inbox's
//! owner, over the member link when another node owns it, instead of one
//! each). Under load every sender of an agent on a node reserves a number
//! in the agent's own inbox for its copy of each message; this turns those
//! round trips to the owner into one per batch.
//!
//! Bounded: at most [`MAX_QUEUED`] wait behind one in flight (more go
//! alone). A caller that gives up (its future dropped) while it leads hands
//! the queue to a task, so nobody waits for an answer that never comes.

use capstan_proto::FormulaId;
use tokio::sync::oneshot;

use crate::error::Error;

/// Most reservations queued behind one in flight for the same inbox.
pub const MAX_QUEUED: usize = 256;

pub(crate) struct Waiter {
    pub(crate) at_least: u64,
    /// About the bytes of the message to admit under the inbox's quota
    /// with the number (none: a number only).
    pub(crate) size: Option<u64>,
    pub(crate) reply: oneshot::Sender<Result<u64, Error>>,
    /// The traced operations it is for (`capstan_cluster::trace`; empty:
    /// none), carried by the call that serves the queue.
    pub(crate) traces: Vec<u64>,
}

/// The inboxes with a reservation in flight, and who waits behind it.
#[derive(Default)]
pub(crate) struct Coalescer {
    pub(crate) queues: std::sync::Mutex<std::collections::HashMap<FormulaId, Vec<Waiter>>>,
}

pub(crate) enum Role {
    Lead,
    Follow(oneshot::Receiver<Result<u64, Error>>),
    Alone,
}

impl Coalescer {
    pub(crate) fn join(&self, agent: FormulaId, at_least: u64, size: Option<u64>) -> Role {
        let Ok(mut q) = self.queues.lock() else {
            return Role::Alone;
        };
        match q.get_mut(&agent) {
            None => {
                q.insert(agent, Vec::new());
                Role::Lead
            }
            Some(w) if w.len() < MAX_QUEUED => {
                let (reply, rx) = oneshot::channel();
                w.push(Waiter {
                    at_least,
                    size,
                    reply,
                    traces: capstan_cluster::trace::current(),
                });
                Role::Follow(rx)
            }
            Some(_) => Role::Alone,
        }
    }

    /// The queue behind the reservation that just ended: empty (then the
    /// inbox has nothing in flight any more) or handed to the caller.
    pub(crate) fn next(&self, agent: &FormulaId) -> Vec<Waiter> {
        let Ok(mut q) = self.queues.lock() else {
            return Vec::new();
        };
        match q.get_mut(agent) {
            Some(w) if !w.is_empty() => std::mem::take(w),
            _ => {
                q.remove(agent);
                Vec::new()
            }
        }
    }
}
