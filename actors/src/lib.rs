//! Capstan's object model: formulas, their incarnations as actors, agents
//! with pet-name directories and inboxes, and the mail between them.
//!
//! # Layout
//!
//! - [`api`]: the public face used by `nodes/`, re-exporting [`Runtime`]
//!   (one per node) and [`AgentHandle`] (the capability to act as one
//!   agent) with their types. Every mutating operation is one store
//!   transaction, acknowledged only after it committed, and carries a
//!   caller-chosen request id so a retry applies once. Behind it, at the
//!   bottom of the layers:
//!   - `types`: shared types (views of entries, messages, promise states),
//!     the runtime's options and the limits.
//!   - `node`: the [`Runtime`], the context its agents share and its
//!     lifecycle (open, join a cluster, drain, shut down).
//!   - `agent`: [`AgentHandle`] and its (fenced, journalled, batched)
//!     transactions.
//!   - `directory`: an agent's names: list, show, cat, store, remove,
//!     move, copy, `mk*`.
//!   - `reserve`: inbox numbers, reserved at the inbox's owner (concurrent
//!     reservations of one number in the same inbox served by one).
//!   - `mail`: send and post: one transaction writes both copies.
//!   - `promises`: requests and their promises.
//!   - `inbox`: reading an inbox: pages, threads, following.
//! - [`rules`]: the object model's rules as pure state machines (time and ids as inputs, no
//!   I/O), driven by the async shell and tested alone.
//! - [`model`]: transactional building blocks (formulas, names, paths,
//!   inbox records, exactly-once answers).
//! - [`incarnation`]: the ractor actors (agents, promises), made on demand
//!   and passivated when idle.
//! - [`guest`]: the wasmtime host: guest agents and tools as WebAssembly
//!   components (issue 4).
//! - [`llm`]: LLM providers held by hosts, model calls with leak scanning,
//!   budgets and an audit log (issue 6).
//! - [`records`]: Rust values ↔ Cap'n Proto records of `proto/`.
//! - [`keys`]: the key layout. [`names`]: pet names, special names, paths.
//! - [`routines`]: routines, mail on a schedule fired by one node of a
//!   cluster (issue 20).
//! - [`clock`]: the wall clock the runtime reads (injectable for simulations).
//! - [`cluster`]: membership, leases, placement and fencing of a cluster's nodes.
//! - [`usage`]: what the store holds, by kind of key (`capstan du`).
//! - [`quota`]: per-agent inbox quotas, kept by each inbox's owner.
//! - [`cancel`]: cascading cancellation (`capstan cancel`).
//! - [`error`]: the one [`Error`] type of the crate.
//! - [`federation`]: mail and references between clusters: envelopes, the
//!   outbox, accepting and settling across peers.
//! - [`remote`]: references to objects of other clusters (locators).
//! - [`gc`]: garbage collection of formulas (`capstan gc`).
//! - [`search`]: search capabilities (BM25 and vector indexes).
//! - [`embed_model`]: the node's local embedding model (a leaf: `types`
//!   holds it in the runtime's options).
//! - [`secrets`]: secrets at rest, sealed under a key kept out of the store.
//! - `open_tx`: a store transaction held open across a guest's handlers.
//! - `journal`: the answers of a guest handler's reads, written with its
//!   next write (a leaf below `agent` and `open_tx`, which hold one).

pub(crate) mod agent;
pub mod api;
pub mod cancel;
pub mod clock;
pub mod cluster;
pub(crate) mod directory;
pub mod embed_model;
pub mod error;
pub mod federation;
pub mod gc;
pub mod guest;
pub(crate) mod inbox;
pub mod incarnation;
pub(crate) mod journal;
pub mod keys;
pub mod llm;
pub(crate) mod mail;
pub mod model;
pub mod names;
pub(crate) mod node;
pub(crate) mod open_tx;
pub(crate) mod promises;
pub mod quota;
pub mod records;
pub mod remote;
pub(crate) mod reserve;
pub mod routines;
pub mod rules;
pub mod search;
pub mod secrets;
pub(crate) mod types;
pub mod usage;

pub use api::{
    AgentHandle, EntryInfo, MessageBodyView, MessageView, PromiseState, RefSpec, Runtime,
    RuntimeOptions, ValueKind,
};
pub use error::{Error, ErrorKind};
pub use federation::{AcceptStep, Caller, Envelope, EnvelopeBody, OutOp, OutboxItem, Settlement};
pub use records::{LocatorRec, RemoteRec};
pub use remote::{Shown, Target};
