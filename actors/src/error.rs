//! Errors of the object model; each message is user-facing and says what to do.

use capstan_cluster::{StoreError, TxnError};

/// An operation on an agent failed; nothing was changed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A pet name or path that is not well-formed.
    #[error(
        "invalid name {0:?}: pet names are lowercase letters, digits and '-', 1-128 characters, starting with a letter or digit; paths join names with '.'"
    )]
    InvalidName(String),
    /// No such name.
    #[error("unknown name {0:?}; see `capstan list`")]
    UnknownName(String),
    /// The name is taken (for commands that do not overwrite).
    #[error("name {0:?} is already in use; remove it first or pick another name")]
    NameTaken(String),
    /// A special name cannot be changed.
    #[error("{0} is a special name and cannot be changed")]
    SpecialName(String),
    /// The named thing has the wrong type for the operation.
    #[error("{name:?} is a {actual}, not a {expected}")]
    WrongType {
        name: String,
        expected: String,
        actual: String,
    },
    /// No message with that number.
    #[error("no message number {0} in this inbox; see `capstan inbox`")]
    UnknownMessage(u64),
    /// A message of the wrong type for the operation.
    #[error("message {number} is a {actual}; this needs a {expected}")]
    WrongMessage {
        number: u64,
        expected: String,
        actual: String,
    },
    /// The request was already resolved or rejected.
    #[error("request {0} is already settled")]
    AlreadySettled(u64),
    /// The request was rejected (answer to a waiter).
    #[error("request was rejected: {0}")]
    Rejected(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// A value or message over a size limit.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        what: String,
        len: usize,
        max: usize,
    },
    /// A stored record could not be decoded.
    #[error(
        "a stored record is corrupt ({0}): the store is damaged; stop the node, move the store away and restore it from a backup (`capstan restore FILE`)"
    )]
    Corrupt(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An inbox number handed out by a stale sequence was already used;
    /// the operation is retried with a fresh number (callers rarely see it).
    #[error("inbox number {number} of {agent} was already used; retry")]
    InboxSlotTaken { agent: String, number: u64 },
    /// The recipient of a message, read on a snapshot that may miss the
    /// latest commits, names another agent now; the send resolves it again
    /// (callers rarely see it).
    #[error("the recipient's name changed while the message was sent; send it again")]
    RecipientMoved,
    /// A cluster node wrote as the owner of a formula it no longer owns.
    #[error("{0}")]
    Fenced(String),
    /// The node is shutting down or overloaded.
    #[error("{0}")]
    Unavailable(String),
    /// Another cluster node did not answer at all (no connection, or no
    /// reply in time): it may be dead, unlike a node that answered an error.
    #[error("{0}")]
    Unreachable(String),
    /// The formula was cancelled (see `crate::cancel`); the message says
    /// why.
    #[error("{0}")]
    Cancelled(String),
    /// The recipient's inbox is at its quota (see `crate::quota`); nothing
    /// was sent.
    #[error(
        "inbox of {agent} is full ({messages} messages / {bytes} bytes; its quota is {max_messages} messages / {max_bytes} bytes): nothing was sent; its holder can dismiss messages (`capstan dismiss N`), or its host raise the quota (`capstan quota {agent} --messages N --bytes B`)"
    )]
    InboxFull {
        agent: String,
        messages: u64,
        bytes: u64,
        max_messages: u64,
        max_bytes: u64,
    },
    /// A model call failed at the provider (the message names it and what
    /// to do; it never holds a key).
    #[error("{0}")]
    Llm(String),
    /// A secret of the store could not be sealed or opened (no secrets
    /// key, the wrong one, a damaged value); the message says what to do.
    #[error("{0}")]
    Secrets(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again later (the
    /// store failed, the node is stopping or lost its cluster lease,
    /// another node did not answer, a stored record could not be read),
    /// as opposed to a refusal for good (bad input, an unknown or revoked
    /// name, a limit). Mail from another cluster that fails for a
    /// transient reason is retried by its sender; any other failure is
    /// bounced to the sender at once.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(e) => !matches!(
                e,
                StoreError::KeyTooLarge { .. }
                    | StoreError::ValueTooLarge { .. }
                    | StoreError::TransactionTooLarge { .. }
                    | StoreError::TooManyWrites { .. }
                    | StoreError::ReservedKey
                    | StoreError::BlobTooLarge { .. }
            ),
            Error::Fenced(_)
            | Error::Unavailable(_)
            | Error::Unreachable(_)
            | Error::InboxSlotTaken { .. }
            | Error::RecipientMoved
            | Error::Corrupt(_) => true,
            Error::InvalidName(_)
            | Error::UnknownName(_)
            | Error::NameTaken(_)
            | Error::SpecialName(_)
            | Error::WrongType { .. }
            | Error::UnknownMessage(_)
            | Error::WrongMessage { .. }
            | Error::AlreadySettled(_)
            | Error::Rejected(_)
            | Error::Invalid(_)
            | Error::TooLarge { .. }
            | Error::InboxFull { .. }
            | Error::Cancelled(_)
            | Error::Llm(_)
            | Error::Secrets(_) => false,
        }
    }
}

/// What the caller of a failed operation should do about it: the error's
/// kind, carried across the control socket and between nodes with the
/// message (see [`Error::to_wire`]) and mapped to the CLI's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad input (a malformed name, a value over a limit, the wrong type of
    /// thing): fix the input.
    Invalid,
    /// No such name, message or record: check what exists.
    NotFound,
    /// The input is fine but the state refuses it (the name is taken, the
    /// request already settled, the inbox full, the formula cancelled).
    Refused,
    /// Temporary: the store, the node or its cluster lease; the same
    /// operation (with the same request id) may succeed later.
    Retry,
    /// Another node did not answer at all: it may be down; retry later.
    Unreachable,
    /// A stored record is damaged: an operator must restore the store.
    Damaged,
    /// Anything else (a model provider's failure, secrets that cannot be opened).
    Failed,
}

impl ErrorKind {
    /// Every kind, for parsing.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Invalid,
        ErrorKind::NotFound,
        ErrorKind::Refused,
        ErrorKind::Retry,
        ErrorKind::Unreachable,
        ErrorKind::Damaged,
        ErrorKind::Failed,
    ];

    /// The kind's name in JSON and on the wire (`not_found`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::Retry => "retry",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Damaged => "damaged",
            ErrorKind::Failed => "failed",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The Cap'n Proto exception type it travels as: `Overloaded` for what
    /// may succeed later, `Disconnected` for a node that did not answer,
    /// `Failed` for the rest.
    pub fn wire(self) -> capnp::ErrorKind {
        match self {
            ErrorKind::Retry => capnp::ErrorKind::Overloaded,
            ErrorKind::Unreachable => capnp::ErrorKind::Disconnected,
            _ => capnp::ErrorKind::Failed,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a kind is written before the message on the wire: `capstan:KIND: `.
const WIRE_TAG: &str = "capstan:";

/// The kind and the message of an exception a Capstan node raised (see
/// [`Error::to_wire`]), with the transport's `remote exception: `
/// prefixes taken off; `None` for an exception without a kind (raised by
/// the transport, or by an older node), whose message is then returned
/// as it is.
pub fn from_wire(e: &capnp::Error) -> (Option<ErrorKind>, String) {
    let mut s = e.extra.as_str();
    while let Some(rest) = s.strip_prefix("remote exception: ") {
        s = rest;
    }
    if let Some(rest) = s.strip_prefix(WIRE_TAG)
        && let Some((kind, message)) = rest.split_once(": ")
        && let Some(kind) = ErrorKind::parse(kind)
    {
        return (Some(kind), message.to_string());
    }
    if s.is_empty() {
        (None, e.kind.to_string())
    } else {
        (None, s.to_string())
    }
}

/// An exception of `kind` carrying `message` (see [`from_wire`]).
pub fn to_wire(kind: ErrorKind, message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error {
        kind: kind.wire(),
        extra: format!("{WIRE_TAG}{}: {message}", kind.as_str()),
    }
}

impl Error {
    /// What the caller should do about it (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidName(_)
            | Error::SpecialName(_)
            | Error::WrongType { .. }
            | Error::WrongMessage { .. }
            | Error::Invalid(_)
            | Error::TooLarge { .. } => ErrorKind::Invalid,
            Error::UnknownName(_) | Error::UnknownMessage(_) => ErrorKind::NotFound,
            Error::NameTaken(_)
            | Error::AlreadySettled(_)
            | Error::Rejected(_)
            | Error::InboxFull { .. }
            | Error::Cancelled(_) => ErrorKind::Refused,
            Error::Unreachable(_) => ErrorKind::Unreachable,
            Error::Corrupt(_) => ErrorKind::Damaged,
            Error::Store(StoreError::Corrupt { .. }) => ErrorKind::Damaged,
            Error::Store(_) if self.is_transient() => ErrorKind::Retry,
            Error::Store(_) => ErrorKind::Invalid,
            Error::Fenced(_)
            | Error::Unavailable(_)
            | Error::InboxSlotTaken { .. }
            | Error::RecipientMoved => ErrorKind::Retry,
            Error::Llm(_) | Error::Secrets(_) => ErrorKind::Failed,
        }
    }

    /// This error as a Cap'n Proto exception: its kind and its message.
    pub fn to_wire(&self) -> capnp::Error {
        to_wire(self.kind(), self)
    }
}

impl TxnError for Error {
    fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            Error::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<capnp::Error> for Error {
    fn from(e: capnp::Error) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<crate::secrets::SecretsError> for Error {
    fn from(e: crate::secrets::SecretsError) -> Self {
        Error::Secrets(e.to_string())
    }
}
