//! `capstan`: the node daemon and its command line.
//!
//! # Layout
//!
//! Entry:
//! - `main.rs`: the binary: the allocator, and [`app::main`].
//! - [`app`]: parse arguments, set up logging and the runtime, dispatch,
//!   turn errors into `capstan: <message>` and an exit status.
//! - [`cli`]: the clap definitions of every command.
//!
//! The daemon (server side):
//! - [`daemon`]: `run` (lock, store, socket, pid file, accept loop, graceful
//!   shutdown).
//! - [`server`]: the Cap'n Proto objects served on the socket: `Node` (the
//!   bootstrap) and `Agent`, a thin adapter over `capstan_actors::AgentHandle`
//!   (its calls between clusters and its guest calls in files of their own).
//! - [`net`]: the QUIC endpoint: peers, the gateway, member links, outbox;
//!   and the buffered Cap'n Proto stream that the control socket's both
//!   ends use too ([`net::rpc_network`]).
//! - [`console`]: the web console (`start --console`, `capstan console`).
//! - [`metrics`]: the Prometheus endpoint (`start --metrics`); [`served`]:
//!   the address either HTTP server was bound to, remembered in the home.
//!
//! Shared by both sides:
//! - [`home`]: the home layout ([`home::Paths`], the control socket's path
//!   included), its lock, what earlier starts remembered, the secrets key
//!   installed in it, and the control socket's message bound.
//! - [`cluster`]: `cluster init` (run without a daemon), a cluster node's
//!   key, identity and name, and the `cluster` commands a node answers.
//!
//! The commands (client side):
//! - [`client`]: connecting, acting `--as` an agent (pipelined), calls that
//!   reconnect and retry with the same request id, error kinds and exit
//!   statuses.
//! - [`lifecycle`]: `start` (spawn the daemon in the background and wait
//!   until it answers) and `stop`.
//! - [`commands`]: the commands that act as an agent, in groups: names,
//!   mail, between clusters (`locate`, `invite`, `accept`), and
//!   `cluster status|members|placement|drain|leave`; [`text`]: the
//!   `@reference` syntax of `send` and `reply`.
//! - [`guests`]: the guest commands: `install`, `mkguest --component`,
//!   `run TOOL --input JSON`, `guests`, `mkhttp`.
//! - [`graph`]: `capstan graph`: the capability graph (gathered by the node
//!   through the socket's JSON `cluster` call, command `graph`), dot and SVG.
//! - [`llm`]: `capstan llm …`; [`routines`]: `capstan routine …`;
//!   [`search`]: `capstan mksearch` and `capstan search`.
//! - [`du`]: `capstan du`; [`backup`]: `capstan backup` and `restore`.
//! - [`output`]: human and `--json` rendering.
//! - [`demo`]: `capstan demo`, a guided tour that drives this binary.
//!
//! `capstan bench` is not here: it runs `capstan-bench` (crate `bench/`,
//! built beside this binary), which drives daemons of this binary through
//! the public modules [`client`], [`home`], [`cluster`], [`net`] and
//! [`output`].
//!
//! `graph`, `llm`, `routines` and `search` hold both halves of their
//! commands: the command line's `run` and the node's answer (`gather`,
//! `command`), which [`server`] calls. No daemon module imports [`client`],
//! [`lifecycle`] or [`commands`], and the shared modules import only [`net`]:
//! there is no import circle (checked by `tests/tests/layout.rs`).
//!
//! # One binary
//!
//! `capstan start --foreground` is the daemon (`capstan start` spawns it in
//! the background); every other command is a short-lived client of the
//! daemon's control socket (Cap'n Proto RPC, schema
//! `proto/schema/api.capnp`), except `where` and `demo` (and `bench`, which
//! runs `capstan-bench`). The
//! commands, flags, output and JSON shapes are specified in `nodes/CLI.md`.
//!
//! # Threads
//!
//! Both the daemon and the client run on one current-thread tokio runtime
//! with a `LocalSet`. capnp-rpc is `!Send`, so its `RpcSystem`s and server
//! objects must live on a `LocalSet` anyway; the actors (ractor) are ordinary
//! tokio tasks, and ractor spawns them on whatever runtime is current, so
//! they share that one thread. A control-socket call is then: the socket
//! read, the capnp dispatch, the actor's mailbox and the reply, all woken on
//! the same thread — no cross-thread hand-off (each costs a wake-up of tens
//! of µs here). The store's committer is its own OS thread (group commit,
//! fsync), so a disk flush never blocks the event loop. The daemon's work
//! per call is small and the machine has few cores; if a node ever needs
//! more CPU, the place to add it is more such threads behind the store and
//! guest engine, not a multi-threaded runtime under capnp-rpc.
//!
//! A CLI command connects, bootstraps, pipelines `host()`/`agent(path)` into
//! the call and exits: one round trip on a Unix socket.

// The module docs link private modules and items on purpose: they are a
// map for contributors (`cargo doc --document-private-items` renders them).
#![allow(rustdoc::private_intra_doc_links)]

pub mod app;
mod backup;
mod cli;
pub mod client;
pub mod cluster;
mod commands;
mod console;
mod daemon;
mod demo;
mod du;
mod graph;
mod guests;
pub mod home;
mod lifecycle;
mod llm;
mod metrics;
pub mod net;
pub mod output;
mod routines;
mod search;
mod served;
mod server;
mod text;
