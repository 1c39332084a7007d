//! The rules of the object model as pure state machines: no tokio, no store,
//! no clock. Time and ids come in as arguments; what to do comes out. The
//! async shell (the rest of this crate) drives them; tests drive them alone.
//!
//! # Layout
//!
//! - [`follow`]: which messages a follower has shown, and where it looks
//!   in the store for the ones a push missed.
//! - [`lease`]: a cluster node's lease: when it may serve, what it does
//!   after each renewal, leaving (the lifecycle as one phase).
//! - [`mail`]: what a package, a request and an answer may hold (checked
//!   on sending and again on arrival from another cluster), and how a
//!   promise settles (once).
//! - [`placement`]: whether a formula's placement stands, where a
//!   draining node hands work, whether a node may claim.
//! - [`inbox`]: in which order a guest's runner handles its inbox, and when
//!   it gives up waiting for a number that was handed out but never written.
//! - [`outbox`]: when mail owed to each peer cluster is delivered (couriers,
//!   backoff), and when an item is bounced instead.

pub mod follow;
pub mod inbox;
pub mod lease;
pub mod mail;
pub mod outbox;
pub mod placement;
