//! Coalescing concurrent reservations of inbox numbers: the state a node
//! keeps of them ([`Coalescer`], held by [`crate::node::Inner`]); serving
//! the queues is `crate::reserve`'s.
//!
//! Coalescing concurrent reservations of numbers in the same inbox: while
//! one is in flight, the others queue, and the queue is then served by one
//! reservation of all their numbers (one call to the inbox's owner, over
//! the member link when another node owns it, instead of one each). Under
//! load every sender of an agent on a node reserves a number in the
//! agent's own inbox for its copy of each message, and a relay reserves
//! the numbers it fills in for each group of the other nodes' sends
//! (`crate::reserve::InboxFiller`); this turns those round trips to the
//! owner into one per batch.
//!
//! Bounded: at most [`MAX_QUEUED`] wait behind one in flight, for at most
//! as many numbers as one reservation takes (more go alone). A caller that
//! gives up (its future dropped) while it leads hands the queue to a task,
//! so nobody waits for an answer that never comes.

use capstan_proto::FormulaId;
use tokio::sync::oneshot;

use crate::error::Error;

/// Most reservations queued behind one in flight for the same inbox.
pub const MAX_QUEUED: usize = 256;

/// Most numbers one reservation takes: an inbox's owner refuses a call for
/// more, so the numbers queued behind one in flight (served by one
/// reservation) are at most this many, and a relayed group's fills too.
pub const MAX_NUMBERS_PER_RESERVATION: u64 = 1024;

pub(crate) struct Waiter {
    /// How many consecutive numbers it takes (1 for a send's copy; a
    /// relayed group's fills take up to `capstan_cluster::relay::MAX_GROUP_FILLS`).
    pub(crate) count: u64,
    pub(crate) at_least: u64,
    /// About the bytes of the message to admit under the inbox's quota
    /// with the number, one message (none: numbers only).
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
    /// Joins the reservations of `count` numbers (at least 1) in `agent`'s
    /// inbox: leads them, queues behind the one in flight, or goes alone
    /// (the queue is full).
    pub(crate) fn join(
        &self,
        agent: FormulaId,
        count: u64,
        at_least: u64,
        size: Option<u64>,
    ) -> Role {
        let Ok(mut q) = self.queues.lock() else {
            return Role::Alone;
        };
        match q.get_mut(&agent) {
            None => {
                q.insert(agent, Vec::new());
                Role::Lead
            }
            Some(w)
                if w.len() < MAX_QUEUED
                    && w.iter().map(|w| w.count).sum::<u64>() + count
                        <= MAX_NUMBERS_PER_RESERVATION =>
            {
                let (reply, rx) = oneshot::channel();
                w.push(Waiter {
                    count,
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
