//! The public face of the object model used by `nodes/`: a [`Runtime`] per
//! node process and [`AgentHandle`]s, the capability to act as one agent.
//!
//! A facade: the pieces live in [`crate::types`], [`crate::node`],
//! [`crate::agent`], [`crate::directory`], [`crate::reserve`],
//! [`crate::mail`], [`crate::promises`] and [`crate::inbox`].

pub use crate::agent::AgentHandle;
pub use crate::names::HOST_ONLY_SPECIALS;
pub use crate::node::Runtime;
pub use crate::types::{
    DEFAULT_INBOX_PAGE, EntryInfo, MAX_INBOX_PAGE, MAX_LIST, MAX_MESSAGE_REFS, MAX_MESSAGE_TEXT,
    MAX_SLOT_RETRIES, MAX_VALUE_BYTES, MessageBodyView, MessageView, NO_REASON, PromiseState,
    RefSpec, RuntimeOptions, ValueKind, state_text,
};
