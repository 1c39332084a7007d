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
    /// [`relay`](Self::relay) of a group with numbers for the relay to fill
    /// in (`fills`, see [`crate::Transaction::fill`]): `None` when the
    /// relay cannot be asked (none now, or one that fills none).
    fn relay_filled(&self, _group: Vec<u8>, _fills: Vec<GroupFill>) -> Option<FilledFuture> {
        None
    }
}

/// The answer to a relayed group with numbers to fill in: the store's
/// encoded answer and, for each of the group's fills, what the filler gave.
pub type FilledFuture =
    Pin<Box<dyn Future<Output = Result<(Vec<u8>, Vec<FillAnswer>), RelayError>> + Send>>;

/// One sequence's numbers to fill in a relayed group: the placeholders
/// written for them, in the order the numbers go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFill {
    pub scope: Vec<u8>,
    pub placeholders: Vec<u64>,
}

impl GroupFill {
    /// `fills` gathered by sequence, in the order they come: one call to
    /// the filler per sequence takes all of its numbers.
    pub fn gather<'a>(fills: impl IntoIterator<Item = &'a crate::store::Fill>) -> Vec<GroupFill> {
        let mut out: Vec<GroupFill> = Vec::new();
        for f in fills {
            match out.iter_mut().find(|g| g.scope == f.scope) {
                Some(g) => g.placeholders.push(f.placeholder),
                None => out.push(GroupFill {
                    scope: f.scope.clone(),
                    placeholders: vec![f.placeholder],
                }),
            }
        }
        out
    }
}

/// What the filler gave for a [`GroupFill`]: its first number (the others
/// follow it), and what it says with them (an inbox's owner: the members
/// following the inbox, whom the sender wakes once it committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillAnswer {
    pub first: u64,
    pub notes: Vec<String>,
}

/// The future of a [`Filler`]'s answer.
pub type FillFuture = Pin<Box<dyn Future<Output = Result<FillAnswer, String>> + Send>>;

/// Who hands out the numbers a relay fills in (the node: an inbox's
/// numbers come from its owner, and only the owner gives them).
pub trait Filler: Send + Sync + 'static {
    /// Reserves `count` consecutive numbers of the sequence `scope` names,
    /// if this member hands them out now; otherwise why not.
    fn fill(&self, scope: &[u8], count: u32) -> FillFuture;
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
    /// Nothing of the group was applied: the relay would not fill its
    /// numbers in (it hands none of them out, or predates filling). The
    /// sender commits the group's other commits itself and those with
    /// numbers to fill fail with [`crate::StoreError::FillUnavailable`];
    /// the relay stays in use.
    #[error("relayed commits not applied: the relay fills no numbers in ({0})")]
    NoFill(String),
}

/// Most numbers one relayed group asks the relay to fill in (and most
/// sequences).
pub const MAX_GROUP_FILLS: usize = 256;

/// How a relay says, in a group's `unapplied` answer, that it filled no
/// numbers in ([`RelayError::NoFill`]).
pub const NO_FILL: &str = "no fill: ";
