//! Garbage collection of formulas (`capstan gc`).
//!
//! A pass has four steps, each made of bounded store transactions, so that
//! it never exceeds a backend's transaction limits and can be killed at any
//! point (a later pass simply starts again):
//!
//! 1. **Mark**, on one snapshot `V` of the store: every formula reachable
//!    from the roots is live. Roots: the root host; every formula of a kind
//!    that is not collected (hosts, guests, LLM providers, invitations and
//!    accepting names: so every agent's names and inbox are roots); pending
//!    promises; targets of locators; placements; and, conservatively, any
//!    formula id (raw or in hex) found in a record this module does not
//!    decode (outbox items, guest bodies and journals, …). Edges: names of
//!    directories, references in messages, agents' directories and hosts,
//!    promises' requesters and resolutions, eval results' dependencies
//!    (`("evd", id)`). Candidates are the unreachable
//!    values, directories, promises and remote references. Cycles are
//!    unreachable like anything else.
//! 2. **Condemn**: a candidate whose reference stamp (`("fref", id)`,
//!    rewritten by every transaction that writes a reference to it: see
//!    [`crate::model::note_ref`]) still holds what `V` read is marked
//!    condemned (`("gcx", id)`), in a transaction that read the stamp, so a
//!    concurrent reference aborts it. A candidate whose stamp changed was
//!    referenced since `V` (by someone holding its id in memory): it
//!    survives, with every candidate it reaches.
//! 3. **Spare** the survivors' closure (clear their marks).
//! 4. **Sweep**: delete each condemned formula with its value chunks,
//!    names, stamps and keys, in transactions that read the `("meta",
//!    "gc-rescued")` key and the formula's mark. A writer that references a
//!    condemned formula clears its mark and rewrites `gc-rescued` in the
//!    same transaction, so the sweep either sees the rescue (and stops,
//!    deleting nothing more: "run again") or conflicts and retries. A writer
//!    that comes after the delete finds no formula and fails cleanly. The
//!    sweep reads only the key families a formula can have (a value's
//!    chunks, a directory's names, …: what the mark saw of its kind). A
//!    family too large for one transaction (a directory of 100,000 names)
//!    is not cleared there: the transaction deletes the formula and writes
//!    a swept mark `("gcz", id)`, and the family is then cleared a page per
//!    transaction; a pass killed before that is done leaves the mark, and
//!    the next pass finishes the clearing.
//!
//! Then exactly-once answers (`("d", …)`, `("in", …)`) older than the
//! retention are dropped.
//!
//! # Sizes and sharing the node
//!
//! The mark reads the store in range scans of [`PAGE`] pairs; the condemn
//! step marks up to [`CONDEMN_BATCH`] candidates per transaction, and the
//! sweep deletes about [`SWEEP_KEYS`] keys per transaction, taking the
//! candidates in key order so that a transaction touches neighbouring
//! keys. On a backend that takes fewer writes in one commit (etcd:
//! `--max-txn-ops`, 128 by default, [`capstan_cluster::Store::max_commit_writes`])
//! each transaction takes as many as fit under that limit instead, its
//! conflict-checked reads included (etcd counts them as compares).
//!
//! The condemn and sweep steps keep two transactions in flight, so that
//! one reads while the store commits the other.
//!
//! A node serves its requests on one thread, so a pass gives way to them:
//! it yields after every page of the mark, every [`WALK_SLICE`] formulas of
//! the reachability walk and every transaction, and no transaction of a
//! pass holds the embedded store's committer for more than the time to
//! write a few thousand keys. Concurrent sends then wait for at most one
//! such slice (figures: `capstan bench --gc-formulas 100000`).

use std::collections::{HashMap, HashSet, VecDeque};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::Instant;

use capstan_cluster::tuple::{TupleKey, TupleReader, prefix_end};
use capstan_cluster::{RangeOption, SYSTEM_KEY_PREFIX, Snapshot, store::key_after};
use capstan_proto::FormulaId;

use crate::api::PromiseState;
use crate::records::{BodyRec, DedupAnswer, Formula, FormulaKind, LocatorRec, MessageRec};
use crate::{Error, Runtime, keys};

/// Pairs read from a snapshot at a time. The mark yields to the node's
/// other tasks after every page, so that sends keep being served while a
/// pass reads a large store (the node runs on one thread: a pass that never
/// yields stalls every request for as long as its mark takes).
const PAGE: usize = 8192;
/// Formulas visited by the reachability walk between two yields.
const WALK_SLICE: usize = 8192;
/// Most candidates condemned per transaction (a read and a write each),
/// where the backend takes that many operations in one commit; on a
/// backend with a smaller limit (etcd's `--max-txn-ops`, 128 by default),
/// as many as fit under it.
pub const CONDEMN_BATCH: usize = 4096;
/// Most keys deleted per sweep transaction (a formula's keys are never
/// split: a transaction may pass this by one formula's keys). On a backend
/// taking fewer writes per commit (etcd), its limit: a formula takes up to
/// [`SWEEP_WRITES_PER_FORMULA`] writes there.
pub const SWEEP_KEYS: usize = 8192;
/// Writes the sweep of one formula makes at most: its condemned mark, its
/// record, its reference stamp, one range clear each for its key families
/// (reverse names, locators, cancel event, and a value's chunks or a directory's names
/// and change log, and an eval result's dependencies) and its swept mark.
pub const SWEEP_WRITES_PER_FORMULA: usize = 10;
/// Sweep and condemn transactions of a pass in flight at once: one reads
/// while the store commits the other.
const SWEEP_IN_FLIGHT: usize = 2;
const CONDEMN_IN_FLIGHT: usize = 2;
/// Conflict-checked reads the sweep of one formula makes (its mark and its
/// record); the transaction reads the rescue key once more.
const SWEEP_READS_PER_FORMULA: usize = 2;
/// Exactly-once records dropped, or stale marks cleared, per transaction
/// (at most; fewer on a backend taking fewer writes per commit).
pub const ANSWER_BATCH: usize = 1024;
/// Default retention of exactly-once answers: a day.
pub const DEFAULT_KEEP_ANSWERS_MS: u64 = 24 * 3600 * 1000;

/// What a pass may do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Exactly-once answers older than this are dropped (a retry of the
    /// request after that would apply again).
    pub keep_answers_ms: u64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            keep_answers_ms: DEFAULT_KEEP_ANSWERS_MS,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Formulas in the mark snapshot.
    pub scanned: u64,
    /// Formulas reachable from the roots.
    pub reachable: u64,
    /// Unreachable formulas of collectable kinds.
    pub candidates: u64,
    /// Formulas deleted.
    pub formulas: u64,
    /// Of which values.
    pub values: u64,
    /// Candidates kept: referenced during the pass, or reachable from one that was.
    pub kept: u64,
    /// Exactly-once answers dropped.
    pub answers: u64,
    /// Keys deleted (all of the above).
    pub keys: u64,
    /// Bytes (keys and values) deleted.
    pub bytes: u64,
    /// The pass stopped early because a writer rescued a condemned formula.
    pub interrupted: bool,
    pub elapsed_ms: u64,
}

/// Where a pass is, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcPhase {
    Mark,
    Condemn,
    Sweep,
    Answers,
}

/// Progress callback: phase, done, total (0 when unknown). Called on the
/// pass's own thread (see [`Runtime::gc`]).
pub type Progress = Arc<dyn Fn(GcPhase, u64, u64) + Send + Sync>;

mod mark;
mod sweep;

use mark::*;
use sweep::*;

/// How many writes one commit of `db` may hold, as far as this module
/// goes: [`SWEEP_KEYS`], or fewer where the backend takes fewer (etcd).
fn write_limit(db: &capstan_cluster::Db) -> usize {
    db.store()
        .max_commit_writes()
        .clamp(SWEEP_WRITES_PER_FORMULA + 1, SWEEP_KEYS)
}

fn size_of(rows: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    rows.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

impl Runtime {
    /// Runs one collection pass (see the module documentation) on a thread
    /// of its own, and waits for it.
    ///
    /// Why a thread: a node serves its requests on one thread, and a pass
    /// is minutes of CPU over a large store. Run there, even yielding after
    /// every slice, it kept that thread always busy, and tokio's
    /// current-thread scheduler then looks at its sockets only every few
    /// dozen task polls: sends stalled for 100-400 ms at a time (100,000
    /// formulas; `capstan bench --gc-formulas`). On its own thread the pass
    /// shares the machine's cores, not the node's thread. The pass goes on
    /// if the caller stops waiting (each step is safe to finish).
    pub async fn gc(&self, opts: &GcOptions, progress: Progress) -> Result<GcReport, Error> {
        // One pass at a time on this node (passes on other nodes are safe:
        // every step re-checks in its transaction).
        static PASS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _pass = PASS.lock().await;
        let (db, opts) = (self.db().clone(), opts.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("capstan-gc".into())
            .spawn(move || {
                let r = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(pass(db, opts, progress)),
                    Err(e) => Err(Error::Unavailable(format!(
                        "cannot start the collector's runtime: {e}"
                    ))),
                };
                let _ = tx.send(r);
            })
            .map_err(|e| Error::Unavailable(format!("cannot start the collector's thread: {e}")))?;
        rx.await.map_err(|_| {
            Error::Unavailable("the collection pass stopped before it ended; run it again".into())
        })?
    }
}

/// One collection pass over `db` (see the module documentation).
async fn pass(
    db: capstan_cluster::Db,
    opts: GcOptions,
    progress: Progress,
) -> Result<GcReport, Error> {
    let opts = &opts;
    let started = Instant::now();
    let mut report = GcReport::default();

    progress(GcPhase::Mark, 0, 0);
    let g = {
        let snap = db.store().snapshot().await?;
        mark(snap.as_ref()).await?
    };
    let live = reach(g.roots.iter().copied(), &g.edges, None).await;
    let mut candidates: Vec<FormulaId> = g
        .formulas
        .iter()
        .filter(|(id, info)| info.collectable && !live.contains(id))
        .map(|(id, _)| *id)
        .collect();
    // In key order: each batch then reads and deletes neighbouring keys
    // (few pages of the embedded store's tree per transaction).
    candidates.sort_unstable();
    tokio::task::yield_now().await;
    let limit = write_limit(&db);
    // One conflict-checked read and one write per candidate (etcd
    // counts the reads as compares, under the same limit).
    let condemn_batch = (limit / 2).saturating_sub(1).clamp(1, CONDEMN_BATCH);
    report.scanned = g.formulas.len() as u64;
    report.reachable = g.formulas.keys().filter(|id| live.contains(id)).count() as u64;
    report.candidates = candidates.len() as u64;
    tracing::info!(
        formulas = report.scanned,
        reachable = report.reachable,
        candidates = report.candidates,
        ms = started.elapsed().as_millis() as u64,
        "gc: marked"
    );

    // Condemn: CONDEMN_IN_FLIGHT transactions at once (one reads while
    // the store commits another).
    let batches: Vec<Arc<StampBatch>> = candidates
        .chunks(condemn_batch)
        .map(|batch| {
            Arc::new(
                batch
                    .iter()
                    .map(|id| (*id, g.stamps.get(id).cloned()))
                    .collect(),
            )
        })
        .collect();
    let mut condemned: Vec<FormulaId> = Vec::new();
    let mut survivors: Vec<FormulaId> = Vec::new();
    let mut decided = 0u64;
    let mut runs = futures::stream::iter(batches.into_iter().map(|batch| {
        let db = db.clone();
        async move {
            db.transact(move |tx| {
                let batch = batch.clone();
                Box::pin(async move {
                    // The stamp alone decides (the record is not read: a
                    // formula deleted since the mark lost its stamp too, so
                    // it survives this step, and a mark written for one
                    // that has neither is cleared by the sweep).
                    let ahead: Vec<Vec<u8>> =
                        batch.iter().map(|(id, _)| keys::formula_ref(id)).collect();
                    tx.prefetch(&ahead).await?;
                    let (mut c, mut s) = (Vec::new(), Vec::new());
                    for (id, stamp) in batch.iter() {
                        if tx.get(&keys::formula_ref(id)).await? == *stamp {
                            tx.set(&keys::condemned(id), &[])?;
                            c.push(*id);
                        } else {
                            s.push(*id);
                        }
                    }
                    Ok::<_, Error>((c, s, batch.len()))
                })
            })
            .await
        }
    }))
    .buffer_unordered(CONDEMN_IN_FLIGHT);
    progress(GcPhase::Condemn, 0, candidates.len() as u64);
    while let Some(r) = runs.next().await {
        let (c, s, n) = r?;
        condemned.extend(c);
        survivors.extend(s);
        decided += n as u64;
        progress(GcPhase::Condemn, decided, candidates.len() as u64);
        // Between transactions, the node's requests run.
        tokio::task::yield_now().await;
    }
    drop(runs);
    // Back in key order for the sweep.
    condemned.sort_unstable();

    // Spare what the survivors reach, and stale marks of earlier passes.
    let cand_set: HashSet<FormulaId> = candidates.iter().copied().collect();
    let spared = reach(survivors.iter().copied(), &g.edges, Some(&cand_set)).await;
    report.kept = spared.len() as u64;
    let condemned_set: HashSet<FormulaId> = condemned.iter().copied().collect();
    let mut unmark: Vec<FormulaId> = spared
        .iter()
        .filter(|id| condemned_set.contains(id))
        .copied()
        .collect();
    unmark.extend(
        g.condemned
            .iter()
            .filter(|id| !condemned_set.contains(id))
            .copied(),
    );
    condemned.retain(|id| !spared.contains(id));
    clear_marks(&db, &unmark).await?;

    tracing::info!(
        condemned = condemned.len(),
        kept = report.kept,
        ms = started.elapsed().as_millis() as u64,
        "gc: condemned"
    );

    // Sweep: SWEEP_IN_FLIGHT transactions at once (one reads while the
    // store commits another). A transaction is offered a range of
    // `condemned` and takes a prefix of it (see `sweep_some`); the rest
    // of the range is offered again. The formulas offered start at what
    // the writes limit allows at worst and double while a transaction
    // takes them all (most formulas write fewer keys than the worst
    // case).
    let total = condemned.len() as u64;
    let plans: Arc<HashMap<FormulaId, Plan>> = Arc::new(
        condemned
            .iter()
            .filter_map(|id| {
                g.formulas.get(id).map(|i| {
                    (
                        *id,
                        Plan {
                            kind: i.kind,
                            deps: g.with_deps.contains(id),
                            stamp: g.stamps.get(id).map(|s| s.len()),
                        },
                    )
                })
            })
            .collect(),
    );
    let condemned = Arc::new(condemned);
    let rescued = Arc::new(g.rescued.clone());
    let mut offer = (limit / SWEEP_WRITES_PER_FORMULA).max(1);
    let mut queue: VecDeque<std::ops::Range<usize>> = VecDeque::new();
    let mut next = 0usize;
    let mut done = 0u64;
    let mut stopped: Option<std::ops::Range<usize>> = None;
    let mut left: Vec<FormulaId> = g.swept.clone();
    let mut running = FuturesUnordered::new();
    progress(GcPhase::Sweep, 0, total);
    loop {
        while stopped.is_none() && running.len() < SWEEP_IN_FLIGHT {
            let r = match queue.pop_front() {
                Some(r) => r,
                None if next < condemned.len() => {
                    let r = next..(next + offer).min(condemned.len());
                    next = r.end;
                    r
                }
                None => break,
            };
            let run = sweep_some(
                db.clone(),
                condemned.clone(),
                r.clone(),
                plans.clone(),
                rescued.clone(),
                limit,
            );
            running.push(async move { (r, run.await) });
        }
        let Some((r, outcome)) = running.next().await else {
            break;
        };
        match outcome? {
            Some(sw) => {
                if sw.took == r.len() {
                    offer = (offer * 2).min(limit);
                } else {
                    queue.push_back(r.start + sw.took..r.end);
                }
                done += sw.took as u64;
                report.formulas += sw.formulas;
                report.values += sw.values;
                report.keys += sw.keys;
                report.bytes += sw.bytes;
                left.extend(sw.left);
                progress(GcPhase::Sweep, done, total);
            }
            None => {
                if stopped.is_none() {
                    tracing::info!("gc: a condemned formula was referenced again; pass stopped");
                }
                report.interrupted = true;
                // What this range and the ones not offered yet hold
                // stays, unmarked, once the running ones are done.
                queue.push_back(r);
                stopped = Some(next..condemned.len());
            }
        }
        // Between transactions, the node's requests run.
        tokio::task::yield_now().await;
    }
    if let Some(rest) = stopped {
        let mut keep: Vec<FormulaId> = condemned[rest].to_vec();
        for r in queue {
            keep.extend_from_slice(&condemned[r]);
        }
        clear_marks(&db, &keep).await?;
    }
    tracing::info!(
        formulas = report.formulas,
        ms = started.elapsed().as_millis() as u64,
        "gc: swept"
    );
    // Formulas deleted with keys left to clear (this pass's, and those
    // of a pass that died before it cleared them).
    left.sort_unstable();
    left.dedup();
    for id in left {
        let (keys, bytes) = clear_swept(&db, id, limit).await?;
        report.keys += keys;
        report.bytes += bytes;
    }

    expire_answers(&db, opts, &progress, &mut report).await?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::info!(?report, "gc: pass done");
    Ok(report)
}

#[cfg(test)]
mod tests;
