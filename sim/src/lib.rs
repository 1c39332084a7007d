//! A seeded simulation of a Capstan cluster in one process, hunting for
//! lost work (issue 14), in the spirit of FoundationDB's simulator and
//! TigerBeetle's VOPR.
//!
//! A run builds N nodes ([`capstan_actors::Runtime`]s that join one cluster)
//! on one shared [`capstan_cluster::mem_store::MemStore`] with faults from
//! the seed (delays, spurious conflicts, "maybe committed"), under tokio's
//! paused clock on one thread, with the runtime's wall clock made virtual
//! ([`capstan_actors::clock`]). Member links are in-memory channels that
//! drop, delay, duplicate and reorder. A workload drawn from the seed sends
//! mail and requests to guests, answers requests twice (racing), dismisses
//! messages, kills nodes (as `kill -9`), restarts and pauses them; guests are
//! Rust closures driven like components by `guest::runner` (see
//! [`handler`]). After every step, and against the store after quiescing,
//! [`check`] asserts: every acknowledged message present exactly once, each
//! handled exactly once and none skipped, no write from a fenced node, and
//! every request settled at most once.
//!
//! The same seed replays the same run: the workload, the faults and the
//! schedule of one thread depend on the seed only. (Formula and request ids
//! drawn by the runtime itself are random; they do not steer the run.)
//!
//! # Layout
//!
//! - [`sim`]: one run: the world, the workload, quiescing, the final check.
//! - [`check`]: the model of the store built from every commit, and the
//!   invariants.
//! - [`handler`]: guest-like handlers driven as the guest runner drives
//!   components.
//! - [`links`]: member links in memory, with the seed's faults.
//! - [`store`]: each node's gate to the shared store (kill, pause) and the
//!   commit observer.
//! - [`clock`]: the virtual wall clock.
//! - [`rng`]: the seeded generator.

pub mod check;
pub mod clock;
pub mod handler;
pub mod links;
pub mod rng;
pub mod sim;
pub mod store;

use std::time::Duration;

pub use capstan_cluster::mem_store::FaultCounts;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Workload steps (each one operation or none, then some virtual time).
    pub steps: u64,
    pub nodes: usize,
    pub guests: usize,
    /// The nodes' cluster lease.
    pub lease: Duration,
    /// Most virtual milliseconds between two steps.
    pub max_step_ms: u64,
    /// A test of the checker: handlers handle what they list even past a
    /// gap (the bug of issue 14: "handled up to N + 1" before N committed).
    pub faulty_handlers: bool,
}

impl Config {
    /// The defaults for `seed`: 3 nodes, 3 guests, 200 steps.
    pub fn new(seed: u64) -> Config {
        Config {
            seed,
            steps: 200,
            nodes: 3,
            guests: 3,
            lease: capstan_actors::cluster::DEFAULT_LEASE,
            max_step_ms: 40,
            faulty_handlers: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub sends: u64,
    pub acked: u64,
    pub requests: u64,
    pub dismissed: u64,
    pub handled: u64,
    pub kills: u64,
    pub restarts: u64,
    pub pauses: u64,
    pub faults: FaultCounts,
    /// A digest of the run's operations and the store's final version: the
    /// same seed gives the same digest.
    pub digest: u64,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An invariant broke (at `step`, or at the end: `step == steps`).
    #[error("seed {seed}: step {step}: {what}")]
    Violation { seed: u64, step: u64, what: String },
    /// The world could not be built.
    #[error("seed {seed}: setup failed: {what}")]
    Setup { seed: u64, what: String },
    /// Work never finished after the workload stopped (lost work too).
    #[error("seed {seed}: did not quiesce: {what}")]
    Stuck { seed: u64, what: String },
    /// The tokio runtime could not be built.
    #[error("cannot build the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl SimError {
    /// The seed that failed.
    pub fn seed(&self) -> Option<u64> {
        match self {
            SimError::Violation { seed, .. }
            | SimError::Setup { seed, .. }
            | SimError::Stuck { seed, .. } => Some(*seed),
            SimError::Runtime(_) => None,
        }
    }
}

/// Runs one seed on a fresh single-thread runtime with a paused clock.
pub fn run(cfg: &Config) -> Result<Report, SimError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    rt.block_on(sim::run(cfg.clone()))
}
