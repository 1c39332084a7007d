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
