//! Mail between clusters: invitations, the outbox, and what arrives from
//! other clusters.
//!
//! # The model
//!
//! `invite NAME` makes an invitation formula under NAME and a one-use
//! locator for it. The invited node's `accept` redeems it over the network
//! (`Object.accept`), handing over a *handle*: a locator for its own agent
//! whose record names the remote formula standing for the inviter there.
//! The inviter answers with a handle for itself, recorded the same way. Each
//! side then holds a remote formula for the other agent, and mail that
//! arrives through a handle is attributed to the formula it names — a peer
//! cannot claim to be anyone else.
//!
//! Both steps are retry-safe and crash-safe. `invite` applies once per
//! request id. `accept` first holds its name with an `accepting` formula
//! (which records the request id it redeems with) and records the handle
//! it offers, in one transaction; then asks the inviter; then turns the
//! placeholder into the inviter's remote formula. A retry, or the same
//! accept run again after a failure or a crash, goes on with the same
//! placeholder and request id. The inviter turns the invitation formula
//! itself into the remote formula for the accepting agent (so every name
//! of it, copies included, names that agent), and answers the same
//! redeemer retrying with the same request id the same way.
//!
//! Sending to a remote formula is the local send with one difference: the
//! recipient's copy is not written into an inbox here but into this node's
//! outbox, in the same transaction as the sender's own copy. References in
//! the message travel as locators issued in that transaction (or, for
//! references that are themselves remote, as the locator they came from, so
//! a capability passed A → B → C is invoked by C on A directly). The
//! network layer (`nodes/`) delivers outbox items in order per destination,
//! removes each once the far side acknowledged it, and retries after
//! failures; the far side deduplicates by the item's id, so a delivery that
//! was applied but whose answer was lost applies once. A request carries a
//! locator for the requester's promise; resolving it on the far side queues
//! a settlement back the same way.
//!
//! Nothing here is live: a message in an inbox must survive restarts of
//! either node, so it holds sturdy references (locators), which the network
//! layer turns into live Cap'n Proto capabilities when used.
//!
//! # Modules
//!
//! - `envelope`: what travels between clusters ([`Envelope`],
//!   [`Settlement`], [`OutboxItem`]), written and read back (validated).
//! - `locators`: issuing and recording locators (sturdy references by swiss
//!   number), and references crossing in either direction.
//! - `invite`: invitations and accepting them, on both sides.
//! - `receive`: what arrives from another cluster: mail and settlements.
//! - `outbox`: what is owed to other clusters: queueing, listing for the
//!   network layer, bouncing.

mod envelope;
mod invite;
mod locators;
mod outbox;
mod receive;

use std::sync::Arc;

use capstan_proto::FormulaId;

use crate::agent::AgentHandle;
use crate::error::Error;
use crate::model::Ctx;
use crate::node::Runtime;

pub use envelope::{Envelope, EnvelopeBody, OutOp, OutboxItem, Settlement};
pub(crate) use invite::give_up_accept;
pub use invite::{AcceptStep, MAX_ACCEPT_ATTEMPTS};
pub(crate) use locators::{issue_locator, wire_ref};
pub use outbox::{OUTBOX_BATCH, OUTBOX_PEERS, now_us};
pub(crate) use outbox::{enqueue, envelope_of};

/// Who is on the other end of a call from another cluster.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The authenticated cluster of the calling node.
    pub cluster: [u8; 32],
    /// This node's own cluster.
    pub own: [u8; 32],
}

impl Runtime {
    async fn handle_for(&self, id: FormulaId) -> Result<AgentHandle, Error> {
        let ctx: Ctx = crate::node::load_agent(self.db(), id).await?;
        Ok(AgentHandle {
            rt: self.inner().clone(),
            ctx: Arc::new(ctx),
            fence: None,
            journal: None,
            open: None,
        })
    }
}
