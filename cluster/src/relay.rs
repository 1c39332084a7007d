//! Relayed commits: a client of a replicated store hands a group of its
//! commits to another member's client of the same store, which merges the
//! groups it receives with its own commits into one request to the store
//! (a *commit proxy*, as FoundationDB's commit proxies batch their clients).
//!
//! The store charges for every request it applies much more than for the
//! operations in it (etcd: about a millisecond of CPU per Txn over its three
//! members, a tenth of that per commit in it, measured with `capstan bench
//! --cluster`), and each node batches only its own commits: so three nodes
//! made three times the Txns of one, six nodes six times. Relaying lets the
//! commits of the whole cluster share a Txn.
//!
//! A group carries its own commit marker, so its sender settles an
//! unanswered group without the relay (the store's module docs): the relay
//! that died, the answer that was lost, the group that reaches the store
//! late all resolve as one commit of its own would. The encoding of a group
//! and of its answer belongs to the store (the relay carries bytes).
//!
//! What the node provides is the [`CommitRelay`] (the link to the member
//! that merges); what the store provides is [`crate::Store::set_relay`] and
//! [`crate::Store::commit_relayed`].

use std::future::Future;
use std::pin::Pin;

/// The answer to a relayed group: the store's encoded answer, or why there is none.
pub type RelayFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, RelayError>> + Send>>;

/// Where this client sends groups of its commits.
pub trait CommitRelay: Send + Sync + 'static {
    /// Sends `group` to the member that merges commits, or `None` when there
    /// is none to send to now (this node is that member, or it is
    /// unknown): then the store commits the group itself.
    fn relay(&self, group: Vec<u8>) -> Option<RelayFuture>;
    /// Whether to relay every group, a lone commit on an idle client
    /// included (tests); otherwise only commits that meet others waiting
    /// are relayed, and a lone one goes to the store at once (one hop less).
    fn eager(&self) -> bool {
        false
    }
}

/// Why a relayed group has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Nothing of the group was applied, for sure (it was refused, or never
    /// reached the store): its sender commits it itself.
    #[error("relayed commits not applied: {0}")]
    NotApplied(String),
    /// It may have been applied: its sender resolves it by its marker.
    #[error("relayed commits' outcome unknown: {0}")]
    Unknown(String),
}
