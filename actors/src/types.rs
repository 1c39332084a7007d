//! Shared types and limits of the object model's public face: the views
//! `nodes/` shows, the runtime's options, and the bounds on everything.

use capstan_proto::{FormulaId, RequestId};

/// Kind of a stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Text,
    Json,
    Bytes,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub name: String,
    pub id: FormulaId,
    /// host, guest, directory, value, promise
    pub kind: String,
    /// value: "text, 12 bytes"; promise: "pending" / "resolved" / "rejected: why"
    pub detail: String,
}

/// A promise's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromiseState {
    Pending,
    Resolved(FormulaId),
    Rejected(String),
}

/// A message as one agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    pub number: u64,
    pub message_id: RequestId,
    pub reply_to: Option<RequestId>,
    pub from: String,
    pub to: String,
    pub date_ms: u64,
    pub body: MessageBodyView,
}

/// The body of a [`MessageView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageBodyView {
    Package {
        strings: Vec<String>,
        names: Vec<String>,
    },
    Request {
        description: String,
        state: PromiseState,
    },
}

/// A reference embedded in a sent message: a path in the sender's names and
/// the name suggested to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSpec {
    pub path: String,
    pub edge_name: String,
}

/// Options of a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Incarnations idle this long are passivated.
    pub idle_timeout: std::time::Duration,
    /// The key that seals the store's secrets (LLM API keys); without one,
    /// adding a key is refused and sealed keys cannot be used.
    pub secrets: Option<crate::secrets::SecretsKey>,
    /// The local embedding model (`start --embed-model DIR`): the vectors
    /// of search capabilities made without a provider (see
    /// [`crate::embed_model`]); `None`: those search full text only.
    pub embed_model: Option<std::sync::Arc<crate::embed_model::LocalModel>>,
    /// In a cluster whose store has a commit relay that fills numbers in,
    /// a send from a node that does not own the sender's inbox lets the
    /// relay fill in its own copy's number instead of reserving it from
    /// the owner first (see `AgentHandle::may_fill_own` in `mail`).
    pub fill_numbers: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            idle_timeout: std::time::Duration::from_secs(60),
            secrets: None,
            embed_model: None,
            fill_numbers: false,
        }
    }
}

/// Largest stored value.
pub const MAX_VALUE_BYTES: usize = capstan_cluster::blob::MAX_BLOB_SIZE;
/// Largest message text (all text chunks together).
pub const MAX_MESSAGE_TEXT: usize = 64 * 1024;
/// Most references in one message.
pub const MAX_MESSAGE_REFS: usize = 64;
/// Most entries returned by one listing.
pub const MAX_LIST: usize = 100_000;
/// Messages of one inbox page when the caller names no limit.
pub const DEFAULT_INBOX_PAGE: usize = 1000;
/// Most messages of one inbox page.
pub const MAX_INBOX_PAGE: usize = 10_000;
/// Messages read at a time by a scan of a whole inbox (threads).
pub(crate) const INBOX_SCAN_PAGE: usize = 1000;
/// A follower that got no push for this long looks in the store for
/// messages a push missed.
pub(crate) const FOLLOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// A new follower's first look in the store; the wait doubles after each
/// look up to [`FOLLOW_RECHECK`] (about seven reads in a follow's first
/// two seconds).
pub(crate) const FIRST_FOLLOW_RECHECK: std::time::Duration = std::time::Duration::from_millis(25);
/// Most fresh inbox numbers one write tries after finding its number used.
pub const MAX_SLOT_RETRIES: u32 = 32;

/// `pending`, `resolved`, or `rejected: REASON`.
pub fn state_text(s: &PromiseState) -> String {
    match s {
        PromiseState::Pending => "pending".into(),
        PromiseState::Resolved(_) => "resolved".into(),
        PromiseState::Rejected(r) => format!("rejected: {r}"),
    }
}

/// The reason a request rejected without one is given.
pub const NO_REASON: &str = "no reason given";

/// Messages admitted under an inbox's quota at once (a batch of
/// reservations), and about their bytes in all ([`crate::quota`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    pub messages: u64,
    pub bytes: u64,
}

/// What a count of an inbox read for its quota (`quota::Account::read_count`).
#[derive(Debug, Clone)]
pub struct Counted {
    /// The inbox's limits: most messages, most bytes.
    pub(crate) limits: (u64, u64),
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    /// The highest number written.
    pub(crate) last: Option<u64>,
    /// The inbox's mark: the number after the highest dismissed.
    pub(crate) mark: Option<u64>,
}

impl Admit {
    /// One message of about `bytes` bytes.
    pub fn one(bytes: u64) -> Admit {
        Admit { messages: 1, bytes }
    }
}
