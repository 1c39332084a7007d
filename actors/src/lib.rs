//! Capstan's object model: formulas, their incarnations as actors, agents
//! with pet-name directories and inboxes, and the mail between them.
//!
//! # Layout
//!
//! The modules form layers, each importing only the ones below it (no
//! import circle: `tests/tests/layout.rs` checks it). From the bottom:
//!
//! 1. Leaves, the data and helpers every layer shares:
//!    - [`error`]: the one [`Error`] type of the crate.
//!    - [`records`]: Rust values ↔ Cap'n Proto records of `proto/`.
//!    - [`keys`]: the key layout. [`names`]: pet names, special names, paths.
//!    - `types`: shared types (views of entries, messages, promise states),
//!      the runtime's options and the limits.
//!    - [`model`]: transactional building blocks (formulas, names, paths,
//!      inbox records, exactly-once answers, following promises).
//!    - [`rules`]: the object model's rules as pure state machines (time and
//!      ids as inputs, no I/O), driven by the async shell and tested alone.
//!    - [`clock`]: the wall clock the runtime reads (injectable for simulations).
//!    - [`cluster`]: membership, leases, placement and fencing of a cluster's nodes.
//!    - [`secrets`]: secrets at rest, sealed under a key kept out of the store.
//!    - [`embed_model`]: the node's local embedding model (`types` holds it
//!      in the runtime's options).
//!    - [`usage`]: what the store holds, by kind of key (`capstan du`).
//!    - `registry`: the live incarnations of a node and their messages.
//!    - `coalesce`: reservations of inbox numbers waiting behind one in flight.
//!    - [`index`]: a search capability's in-memory index, and a node's indexes.
//!    - `journal`: the answers of a guest handler's reads, written with its
//!      next write.
//!    - `open_tx`: a store transaction held open across a guest's handlers.
//! 2. The core: `node`, the [`Runtime`] (one per node), the context its
//!    agents share and its lifecycle (open, join a cluster, drain, shut
//!    down); above it `agent`, [`AgentHandle`] (the capability to act as one
//!    agent) and its (fenced, journalled, batched) transactions. The core
//!    holds what features keep per node as leaf types (or, for the wasmtime
//!    host, a trait: see `node`); a feature's `Runtime` methods are `impl
//!    Runtime` blocks in the feature's module.
//! 3. [`api`]: the public face used by `nodes/`, re-exporting [`Runtime`]
//!    and [`AgentHandle`] with their types. Every mutating operation is one
//!    store transaction, acknowledged only after it committed, and carries a
//!    caller-chosen request id so a retry applies once.
//! 4. The features, each an `impl AgentHandle` (or `impl Runtime`) block
//!    over the core, lower ones first:
//!    - [`llm`]: LLM providers held by hosts, model calls with leak
//!      scanning, budgets and an audit log (issue 6).
//!    - [`quota`]: per-agent inbox quotas, kept by each inbox's owner.
//!    - [`routines`]: routines, mail on a schedule fired by one node of a
//!      cluster (issue 20).
//!    - `directory`: an agent's names: list, show, cat, store, remove,
//!      move, copy, `mk*` (above `llm`, whose providers it shows).
//!    - [`federation`]: mail and references between clusters: envelopes,
//!      the outbox, accepting and settling across peers.
//!    - [`incarnation`]: the ractor actors (agents, promises), made on
//!      demand and passivated when idle (above `quota`: an owner keeps its
//!      inbox's account).
//!    - [`search`]: search capabilities (BM25 and vector indexes).
//!    - [`gc`]: garbage collection of formulas (`capstan gc`).
//!    - `reserve`: inbox numbers, reserved at the inbox's owner (concurrent
//!      reservations of one number in the same inbox served by one).
//!    - `mail`: send and post: one transaction writes both copies.
//!    - `promises`: requests and their promises (above `federation`, which
//!      carries settlements to other clusters).
//!    - `inbox`: reading an inbox: pages, threads, following.
//!    - [`remote`]: references to objects of other clusters (locators).
//!    - [`guest`]: the wasmtime host: guest agents and tools as WebAssembly
//!      components (issue 4); it makes incarnations, and theirs start its
//!      runners through `node`'s `Guests` trait.
//!    - [`cancel`]: cascading cancellation (`capstan cancel`), at the top:
//!      it stops incarnations and reads guests' records.

// The module docs link private modules and items on purpose: they are a
// map for contributors (`cargo doc --document-private-items` renders them).
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod agent;
pub mod api;
pub mod cancel;
pub mod clock;
pub mod cluster;
pub(crate) mod coalesce;
pub(crate) mod directory;
pub mod embed_model;
pub mod error;
pub mod federation;
pub mod gc;
pub mod guest;
pub(crate) mod inbox;
pub mod incarnation;
pub mod index;
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
pub(crate) mod registry;
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
pub use coalesce::MAX_NUMBERS_PER_RESERVATION;
pub use error::{Error, ErrorKind};
pub use federation::{AcceptStep, Caller, Envelope, EnvelopeBody, OutOp, OutboxItem, Settlement};
pub use records::{LocatorRec, RemoteRec};
pub use remote::{Shown, Target};
pub use reserve::InboxFiller;
