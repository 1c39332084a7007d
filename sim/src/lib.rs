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
//! messages, kills nodes (as `kill -9`), restarts and pauses them, drains
//! them and changes the placement policy (as an operator would); guests are
//! Rust closures driven like components by `guest::runner` (see
//! [`handler`]). After every step, and against the store after quiescing,
//! [`check`] asserts: every acknowledged message present exactly once, each
//! handled exactly once and none skipped, no write from a fenced node, and
//! every request settled at most once; and each node's follower of guest
//! 0's inbox (`inbox --follow`) that still runs at the end showed every
//! acknowledged message there that was not dismissed, once.
//!
//! In two seeds of three the nodes' stores fill numbers in as the etcd
//! relay does ([`store::Fills`]: a send from a node that does not own the
//! sender's inbox commits a placeholder for its own copy's number, the
//! owner hands the number out at commit), refusing one such commit in ten
//! (the sender then reserves the number itself). A *calm* run
//! ([`Config::calm`]) has no fault that leaves a number unwritten, so its
//! handlers must never close a hole.
//!
//! One seed in four also builds a second, *far* cluster (2 nodes on a store
//! of its own) federated with the first through invitations, as `capstan
//! invite` / `accept` do: the near root host knows the far root host as
//! "far" and a far host cancelled before the workload as "doomed". The
//! workload also sends mail and requests across ("far" takes them, "doomed"
//! refuses them: they bounce), answers far requests (sometimes twice at
//! once), kills and restarts far nodes. Every node of both clusters
//! delivers its cluster's outbox as `nodes` does, over in-memory links
//! that drop, delay, duplicate and reorder, and lose answers
//! ([`federation`]). After quiescing (both outboxes empty), the checks
//! add: every federated message delivered at most once, and every
//! acknowledged one delivered or bounced back to its sender, never both;
//! no answer of the far side refused; a request across settled at most
//! once, and settled at the requester exactly when it is on the far side.
//!
//! The same seed replays the same run: the workload, the faults and the
//! schedule of one thread depend on the seed only, and so do the ids the
//! runtime draws (formula, request and message ids, swiss numbers of
//! locators: [`capstan_proto::id::seed_thread`]) and the store's retry
//! jitter ([`capstan_cluster::store::seed_thread_jitter`]). The digest of a
//! run covers its operations and both stores' final contents, so the ids.
//!
//! # Layout
//!
//! - [`sim`]: one run: the world, the workload, quiescing, the final check.
//! - [`check`]: the model of the store built from every commit, and the
//!   invariants.
//! - [`handler`]: guest-like handlers driven as the guest runner drives
//!   components.
//! - [`links`]: member links in memory, with the seed's faults.
//! - `follow`: a follower of guest 0's inbox on every node, checked at the end.
//! - [`federation`]: the links between the two clusters, and the outbox
//!   delivery and receiving side of every node.
//! - [`store`]: each node's gate to the shared store (kill, pause) and the
//!   commit observer.
//! - [`clock`]: the virtual wall clock.
//! - [`rng`]: the seeded generator.

pub mod check;
pub mod clock;
pub mod federation;
mod follow;
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
    /// Nodes of a second, far cluster federated with the first (0: no
    /// federation); see [`federation`].
    pub far_nodes: usize,
    /// A test of the checker: the far side's receiving loop ignores the
    /// outbox item's id (no dedup), so a redelivered item lands twice.
    pub faulty_far_dedup: bool,
    /// Cancel the far cluster's "doomed" host during the workload (the
    /// default) rather than before it: mail in flight to it must be
    /// delivered or bounced, never both (a defect this found, fixed; see
    /// `sim/tests/seeds.rs`).
    pub cancel_midrun: bool,
    /// The nodes run with `RuntimeOptions::fill_numbers` on a store that
    /// fills numbers in as the etcd relay does ([`store::Fills`]), so a
    /// send from a node that does not own the sender's inbox has its own
    /// copy's number filled in at commit.
    pub fill_numbers: bool,
    /// Percent of commits with numbers to fill that the store refuses
    /// (the sender then reserves the number itself).
    pub fill_refuse_pct: u64,
    /// No fault that can leave a reserved number unwritten for a reason of
    /// its own: no store conflicts or "maybe committed", no dropped or
    /// duplicated member calls, no kills or pauses (delays and reordering
    /// stay). Every number handed out is then written, so a guest's
    /// handler never closes a hole after the grace
    /// ([`Report::holes_closed`] is 0). Dismissals stay: a message
    /// dismissed before its handler got to it leaves its number empty
    /// below the inbox mark, which the handler passes over at once
    /// ([`Report::settled_passed`]; until stop 38 it waited out the grace).
    pub calm: bool,
    /// The cluster's placement policy is `spread` (`capstan cluster policy
    /// --placement spread`): guests are placed by rendezvous hashing, and a
    /// node that restarts gets back, a few at a time, the guests it wins
    /// from the nodes that took them while it was down.
    pub spread: bool,
}

impl Config {
    /// The defaults for `seed`: 3 nodes, 3 guests, 200 steps; one seed in
    /// four federates with a far cluster of 2 nodes.
    pub fn new(seed: u64) -> Config {
        Config {
            seed,
            steps: 200,
            nodes: 3,
            guests: 3,
            lease: capstan_actors::cluster::DEFAULT_LEASE,
            max_step_ms: 40,
            faulty_handlers: false,
            far_nodes: if seed % 4 == 1 { 2 } else { 0 },
            faulty_far_dedup: false,
            cancel_midrun: true,
            fill_numbers: !seed.is_multiple_of(3),
            fill_refuse_pct: 10,
            calm: false,
            spread: seed.is_multiple_of(2),
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
    /// Nodes drained by the workload (each brought back by a restart).
    pub drains: u64,
    /// Changes of the cluster's placement policy by the workload.
    pub policy_changes: u64,
    pub pauses: u64,
    pub faults: FaultCounts,
    /// Federated sends and requests made, acknowledged; far answers.
    pub fed_sends: u64,
    pub fed_acked: u64,
    pub far_answers: u64,
    pub far_kills: u64,
    /// What the links between the clusters did.
    pub fed: federation::FedStats,
    /// Requests across that bounced and whose promise is still pending at
    /// the end: a bounce tells the requester with a message but does not
    /// reject its promise (not an invariant: how the runtime behaves).
    pub fed_stranded: u64,
    /// Followers of guest 0's inbox still running at the end, each of
    /// which showed every acknowledged message there.
    pub followers_checked: u64,
    /// What the store did with commits whose numbers it fills in.
    pub fills: store::FillCounts,
    /// Inbox numbers the guests' handlers gave up on (closed as holes
    /// after the grace: handed out, never written).
    pub holes_closed: u64,
    /// Inbox numbers the handlers passed over without waiting: empty below
    /// the inbox mark (messages dismissed before they were handled).
    pub settled_passed: u64,
    /// Placements the nodes handed over to the nodes that win them
    /// (spreading), over the whole run.
    pub handed_over: u64,
    /// The guests' formula ids, as the runtime drew them (from the seed).
    pub guest_ids: Vec<capstan_proto::FormulaId>,
    /// A digest of the run's operations and of the stores' final contents
    /// (so of every id the runtime drew): the same seed gives the same
    /// digest.
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
