//! Membership and placement: several nodes sharing one replicated store.
//!
//! State lives in the store, so any node can run any operation as a store
//! transaction. Two things need a single live owner per formula: handing
//! out inbox numbers (an in-memory sequence, so that concurrent senders do
//! not conflict in the store) and running a guest's component. This module
//! keeps, in the store:
//!
//! | key | value |
//! |---|---|
//! | `("cl", "id")` | the cluster's CA key and certificate (see `capstan cluster init`) |
//! | `("cl", "m", name)` | [`MemberRec`]: a node, its address, epoch and lease expiry |
//! | `("cl", "p", formula)` | [`PlacementRec`]: the owner node and the epoch it claimed in |
//! | `("cl", "cfg")` | [`SettingsRec`]: settings every member follows (the placement policy) |
//!
//! **Leases.** A node registers (bumping its epoch) and renews its record
//! every `lease / 6`. A record whose `expires_ms` is past is dead to the
//! cluster. The node itself stops serving when `lease` has passed on its
//! monotonic clock since the start of its last successful renewal (so a
//! paused process notices on wake-up, before doing anything else), drops
//! its incarnations and re-registers with a new epoch; placements of the
//! old epoch are then invalid everywhere.
//!
//! **Placement.** The owner of a formula is the node named by its placement
//! record, if that node's record is live with the same epoch and not
//! draining. Otherwise the next node that needs the owner claims it, in a
//! transaction that also checks its own lease. Writes made as the owner (a
//! guest's actions) read the placement record in the same transaction
//! ([`Fence::check`]): a claim by another node conflicts with them, so a
//! paused ex-owner's writes are refused. Inbox numbers are protected
//! independently: a message is written only to a free slot.
//!
//! **Spreading.** Under the `spread` placement policy (`capstan cluster
//! policy --placement spread`, in [`SettingsRec`]) the node that needs an
//! unheld formula does not claim it for itself: it points at the member
//! that rendezvous hashing picks ([`crate::rules::placement::winner`]),
//! which claims it when the work reaches it, as a draining node points at
//! another. Each member also gives up, a few at a time, the placements it
//! holds that another member now wins (one joined): see
//! [`crate::node::rebalance`]. The hand-over is a drain's, per formula:
//! the placement is cleared (fenced by epoch), the incarnation stops, and
//! the next node that needs it claims it on the winner.
//!
//! Clocks: lease expiry compares wall clocks of different nodes, so the
//! cluster assumes their skew is well under the lease (1.2 s by default).
//! The records are JSON (they are operational state, not formulas).
//!
//! # Modules
//!
//! - `records`: the store's records of members and placements, and their keys.
//! - `membership`: [`Membership`], this node's view of the cluster (members,
//!   owners it asked about, inbox followers).
//! - `lease`: registering, renewing and ending this node's lease, and
//!   watching the leases of the others.
//! - `placement`: who owns a formula, claiming it, and the [`Fence`] of
//!   writes made as its owner.

mod lease;
mod membership;
mod placement;
mod records;

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::FormulaId;
use tokio::sync::oneshot;

use crate::error::Error;

pub use lease::end_membership;
pub(crate) use membership::ReleaseGuard;
pub use membership::{Membership, NO_WAKE};
pub use placement::Fence;
pub use records::{
    MemberRec, PlacementRec, RECORDS_VERSION, SettingsRec, all_placements, clear_placement,
    get_member, get_placement, get_settings, identity_key, list_members, list_placements,
    member_key, placements_page, release_placements, set_draining, set_settings,
};

/// Default lease of a node: how long after its last renewal a node that
/// died is taken for dead (its agents are then claimed by the next node that
/// needs them: failover takes about one lease). Renewed every sixth of it
/// (200 ms); a renewal slower than 90% of the lease (1.08 s) loses it, and
/// the node steps down and registers again. etcd commits take ~5 ms on an
/// idle machine, but can take over a second on one loaded to several times
/// its cores or during an etcd leader election: there, or with an etcd far
/// away, set a longer lease (`CAPSTAN_LEASE_MS`, e.g. 5000).
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1200);
/// Most nodes a cluster lists (and broadcasts to).
pub const MAX_MEMBERS: usize = 256;
/// Queue of work for the node's links to other members.
pub const LINK_QUEUE: usize = 4096;
/// Largest message record carried in a wake-up (larger ones are read back
/// from the store by the member woken).
pub const MAX_CARRIED_RECORD: usize = 16 * 1024;

/// How a node joins: its name, id and address.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub node_id: String,
    pub addr: String,
    pub lease: Duration,
}

/// Work for the node's QUIC links to the other members (served by `nodes`).
pub enum LinkOp {
    /// Reserve numbers in `agent`'s inbox at its owner `node`.
    Reserve {
        node: MemberRec,
        agent: FormulaId,
        count: u32,
        at_least: u64,
        /// Admit so many messages of about so many bytes under the quota
        /// first, all or none.
        admit: Option<crate::types::Admit>,
        reply: oneshot::Sender<Result<u64, Error>>,
        /// The traced operations the numbers are for (`capstan_cluster::trace`).
        traces: Vec<u64>,
    },
    /// Tell `to` that a message was committed to `agent`'s inbox; `record`
    /// is the message as stored when it is small enough to carry
    /// ([`MAX_CARRIED_RECORD`]), else empty.
    Delivered {
        to: Vec<MemberRec>,
        agent: FormulaId,
        number: u64,
        record: Arc<Vec<u8>>,
        /// The traced operation that committed it (0: none).
        trace: u64,
    },
    /// Tell `to` that `promise` settled.
    Settled {
        to: Vec<MemberRec>,
        promise: FormulaId,
    },
    /// Tell `node`, the owner of `agent`, that this node has followers of
    /// `agent`'s inbox, or, `gone`, that its last one ended (see
    /// [`Membership::note_interest`]).
    Interest {
        node: MemberRec,
        agent: FormulaId,
        gone: bool,
        /// The call's order among this node's interest calls
        /// ([`Membership::next_interest_seq`]).
        seq: u64,
    },
}

/// How long an owner keeps sending an agent's deliveries to a member that
/// said it follows the agent's inbox; followers renew it every tick of
/// their agent (half its idle timeout, 30 s by default).
pub const INTEREST_TTL: Duration = Duration::from_secs(90);
/// Most (agent, member) interests an owner keeps, and most agents whose
/// interested members a node remembers from reservations.
pub const MAX_INTERESTS: usize = 100_000;

/// Who owns a formula, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Me,
    Other(MemberRec),
}
