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
//!    that comes after the delete finds no formula and fails cleanly.
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
//! A node serves its requests on one thread, so a pass gives way to them:
//! it yields after every page of the mark, every [`WALK_SLICE`] formulas of
//! the reachability walk and every transaction, and no transaction of a
//! pass holds the embedded store's committer for more than the time to
//! write a few thousand keys. Concurrent sends then wait for at most one
//! such slice (figures: `capstan bench --gc-formulas 100000`).

use std::collections::{HashMap, HashSet, VecDeque};
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
const PAGE: usize = 2048;
/// Formulas visited by the reachability walk between two yields.
const WALK_SLICE: usize = 8192;
/// Most candidates condemned per transaction (two reads and a write each),
/// where the backend takes that many operations in one commit; on a
/// backend with a smaller limit (etcd's `--max-txn-ops`, 128 by default),
/// as many as fit under it.
pub const CONDEMN_BATCH: usize = 1024;
/// Most keys deleted per sweep transaction (a formula's keys are never
/// split: a transaction may pass this by one formula's keys). On a backend
/// taking fewer writes per commit (etcd), its limit: a formula takes up to
/// [`SWEEP_WRITES_PER_FORMULA`] writes there.
pub const SWEEP_KEYS: usize = 2048;
/// Writes the sweep of one formula makes at most: its condemned mark, its
/// record, its reference stamp, and one range clear each for its value
/// chunks, its names, its reverse names, its locators and (an eval
/// result) its dependencies.
pub const SWEEP_WRITES_PER_FORMULA: usize = 8;
/// Conflict-checked reads the sweep of one formula makes (its mark, its
/// record, its stamp); the transaction reads the rescue key once more.
const SWEEP_READS_PER_FORMULA: usize = 3;
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

/// Progress callback: phase, done, total (0 when unknown).
pub type Progress = Arc<dyn Fn(GcPhase, u64, u64) + Send + Sync>;

/// What the mark read from one snapshot.
#[derive(Default)]
struct Graph {
    /// Every formula: its kind name and whether it is collectable.
    formulas: HashMap<FormulaId, (bool, bool)>,
    edges: HashMap<FormulaId, Vec<FormulaId>>,
    roots: Vec<FormulaId>,
    stamps: HashMap<FormulaId, Vec<u8>>,
    condemned: Vec<FormulaId>,
    rescued: Option<Vec<u8>>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {e}"))
}

fn id_in_key(key: &[u8], skip_strs: usize) -> Result<FormulaId, Error> {
    let mut r = TupleReader::new(key);
    for _ in 0..skip_strs {
        r.str().map_err(|e| corrupt("key", e))?;
    }
    let b = r.bytes().map_err(|e| corrupt("key", e))?;
    FormulaId::from_slice(&b).map_err(|e| corrupt("key", e))
}

/// Reads `[begin, end)` of `snap` a page at a time.
async fn scan(
    snap: &dyn Snapshot,
    begin: Vec<u8>,
    end: Vec<u8>,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut begin = begin;
    loop {
        let rows = snap
            .range(&RangeOption {
                begin: begin.clone(),
                end: end.clone(),
                limit: PAGE,
                reverse: false,
            })
            .await?;
        for (k, v) in &rows {
            f(k, v)?;
        }
        tokio::task::yield_now().await;
        match rows.last() {
            Some((k, _)) if rows.len() == PAGE => begin = key_after(k),
            _ => return Ok(()),
        }
    }
}

/// Formula ids found in bytes that are not decoded here: raw 32-byte ids
/// and 64-character lowercase hex.
fn ids_in(bytes: &[u8], known: &HashMap<FormulaId, (bool, bool)>, out: &mut Vec<FormulaId>) {
    if bytes.len() >= 32 {
        for w in bytes.windows(32) {
            let id = FormulaId(w.try_into().unwrap_or([0; 32]));
            if known.contains_key(&id) {
                out.push(id);
            }
        }
    }
    let is_hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    let mut i = 0;
    while i + 64 <= bytes.len() {
        if !is_hex(&bytes[i]) {
            i += 1;
            continue;
        }
        let run = bytes[i..].iter().take_while(|c| is_hex(c)).count();
        if run >= 64 {
            for s in 0..=run - 64 {
                if let Ok(b) = hex::decode(&bytes[i + s..i + s + 64]) {
                    let id = FormulaId(b.try_into().unwrap_or([0; 32]));
                    if known.contains_key(&id) {
                        out.push(id);
                    }
                }
            }
        }
        i += run.max(1);
    }
}

/// Formula ids that are elements of a tuple key (escaped there, so not
/// found by a search of the raw bytes when an id holds a zero byte).
fn ids_in_key(key: &[u8], known: &HashMap<FormulaId, (bool, bool)>, out: &mut Vec<FormulaId>) {
    let mut rest = key;
    while !rest.is_empty() {
        let mut r = TupleReader::new(rest);
        if let Ok(b) = r.bytes() {
            if let Ok(id) = FormulaId::from_slice(&b)
                && known.contains_key(&id)
            {
                out.push(id);
            }
        } else {
            r = TupleReader::new(rest);
            if r.str().is_err() {
                r = TupleReader::new(rest);
                if r.u64().is_err() {
                    return;
                }
            }
        }
        rest = r.rest();
    }
}

fn first_str(key: &[u8]) -> String {
    TupleReader::new(key).str().unwrap_or_default()
}

async fn mark(snap: &dyn Snapshot) -> Result<Graph, Error> {
    let mut g = Graph::default();
    if let Some(b) = snap.get(&keys::root_host()).await? {
        g.roots
            .push(FormulaId::from_slice(&b).map_err(|e| corrupt("root host id", e))?);
    }
    g.rescued = snap.get(&keys::gc_rescued()).await?;
    // Formulas first: the generic scan below looks ids up among them.
    let fp = keys::formulas();
    let mut formulas = Vec::new();
    scan(snap, fp.clone(), prefix_end(&fp), |k, v| {
        let id = id_in_key(k, 1)?;
        formulas.push((id, Formula::decode(v)?));
        Ok(())
    })
    .await?;
    for (id, f) in formulas {
        let mut e = Vec::new();
        let collectable = match &f.kind {
            FormulaKind::Host(a) | FormulaKind::Guest(a) => {
                e.push(a.pet_store);
                e.extend(a.host);
                false
            }
            FormulaKind::Directory | FormulaKind::Value(_) | FormulaKind::Remote(_) => true,
            FormulaKind::Promise(p) => {
                e.push(p.requester);
                match &p.state {
                    PromiseState::Resolved(t) => {
                        e.push(*t);
                        true
                    }
                    PromiseState::Rejected(_) => true,
                    // Someone may wait for it.
                    PromiseState::Pending => false,
                }
            }
            FormulaKind::Invitation(i) => {
                e.push(i.host);
                e.push(i.dir);
                false
            }
            FormulaKind::Accepting(a) => {
                e.push(a.host);
                false
            }
            FormulaKind::Llm(l) => {
                e.push(l.host);
                false
            }
        };
        if !collectable {
            g.roots.push(id);
        }
        g.formulas
            .insert(id, (collectable, matches!(f.kind, FormulaKind::Value(_))));
        g.edges.entry(id).or_default().extend(e);
    }
    // Everything else, subspace by subspace.
    let mut begin = Vec::new();
    let end = vec![SYSTEM_KEY_PREFIX];
    loop {
        let rows = snap
            .range(&RangeOption {
                begin: begin.clone(),
                end: end.clone(),
                limit: PAGE,
                reverse: false,
            })
            .await?;
        let Some((last, _)) = rows.last() else { break };
        let full = rows.len() == PAGE;
        let mut next = key_after(last);
        for (k, v) in &rows {
            let first = first_str(k);
            match first.as_str() {
                // Decoded above, or holding no references (value chunks,
                // reverse name index, exactly-once records, inbox marks,
                // locators by target, guest components, provider keys).
                "f" | "v" | "r" | "d" | "mark" | "locf" | "gc" | "llmk" => {
                    next = prefix_end(&TupleKey::new().str(&first).into_vec());
                    break;
                }
                "n" => {
                    let dir = id_in_key(k, 1)?;
                    let target = crate::records::decode_name_entry(v)?;
                    g.edges.entry(dir).or_default().push(target);
                }
                "m" => {
                    let agent = id_in_key(k, 1)?;
                    let m = MessageRec::decode(v)?;
                    let e = g.edges.entry(agent).or_default();
                    e.push(m.from);
                    e.push(m.to);
                    match m.body {
                        BodyRec::Package { ids, .. } => e.extend(ids),
                        BodyRec::Request { promise, .. } => e.push(promise),
                    }
                }
                "loc" => {
                    let l = LocatorRec::decode(v)?;
                    g.roots.push(l.target);
                    g.roots.extend(l.peer);
                    g.roots.extend(l.accepted.map(|a| a.host));
                }
                "fref" => {
                    g.stamps.insert(id_in_key(k, 1)?, v.to_vec());
                }
                // An eval result keeps what it was computed from.
                "evd" => {
                    let result = id_in_key(k, 1)?;
                    g.edges
                        .entry(result)
                        .or_default()
                        .extend(keys::decode_eval_deps(v));
                }
                "gcx" => g.condemned.push(id_in_key(k, 1)?),
                "meta" => {}
                // Placements, outbox items, guest bodies, manifests and
                // journals, LLM records, cluster records, anything newer:
                // any formula id in them is a root.
                _ => {
                    ids_in_key(k, &g.formulas, &mut g.roots);
                    ids_in(k, &g.formulas, &mut g.roots);
                    ids_in(v, &g.formulas, &mut g.roots);
                }
            }
        }
        if !full && next == key_after(last) {
            break;
        }
        begin = next;
        tokio::task::yield_now().await;
    }
    Ok(g)
}

/// The formulas reachable from `from` along `edges`, limited to `within` if
/// given. Yields to other tasks every [`WALK_SLICE`] formulas.
async fn reach(
    from: impl IntoIterator<Item = FormulaId>,
    edges: &HashMap<FormulaId, Vec<FormulaId>>,
    within: Option<&HashSet<FormulaId>>,
) -> HashSet<FormulaId> {
    let mut seen = HashSet::new();
    let mut queue: VecDeque<FormulaId> = VecDeque::new();
    for r in from {
        if within.is_none_or(|w| w.contains(&r)) && seen.insert(r) {
            queue.push_back(r);
        }
    }
    let mut visited = 0usize;
    while let Some(id) = queue.pop_front() {
        for t in edges.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
            if within.is_none_or(|w| w.contains(t)) && seen.insert(*t) {
                queue.push_back(*t);
            }
        }
        visited += 1;
        if visited.is_multiple_of(WALK_SLICE) {
            tokio::task::yield_now().await;
        }
    }
    seen
}

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
    /// Runs one collection pass (see the module documentation).
    pub async fn gc(&self, opts: &GcOptions, progress: Progress) -> Result<GcReport, Error> {
        // One pass at a time on this node (passes on other nodes are safe:
        // every step re-checks in its transaction).
        static PASS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _pass = PASS.lock().await;
        let started = Instant::now();
        let mut report = GcReport::default();
        let db = self.db().clone();

        progress(GcPhase::Mark, 0, 0);
        let g = {
            let snap = db.store().snapshot().await?;
            mark(snap.as_ref()).await?
        };
        let live = reach(g.roots.iter().copied(), &g.edges, None).await;
        let mut candidates: Vec<FormulaId> = g
            .formulas
            .iter()
            .filter(|(id, (collectable, _))| *collectable && !live.contains(id))
            .map(|(id, _)| *id)
            .collect();
        // In key order: each batch then reads and deletes neighbouring keys
        // (few pages of the embedded store's tree per transaction).
        candidates.sort_unstable();
        tokio::task::yield_now().await;
        let limit = write_limit(&db);
        // Two conflict-checked reads and one write per candidate (etcd
        // counts the reads as compares, under the same limit).
        let condemn_batch = (limit / 2).saturating_sub(1).clamp(1, CONDEMN_BATCH);
        report.scanned = g.formulas.len() as u64;
        report.reachable = g.formulas.keys().filter(|id| live.contains(id)).count() as u64;
        report.candidates = candidates.len() as u64;
        tracing::info!(
            formulas = report.scanned,
            reachable = report.reachable,
            candidates = report.candidates,
            "gc: marked"
        );

        // Condemn.
        let mut condemned: Vec<FormulaId> = Vec::new();
        let mut survivors: Vec<FormulaId> = Vec::new();
        for (n, batch) in candidates.chunks(condemn_batch).enumerate() {
            progress(
                GcPhase::Condemn,
                (n * condemn_batch) as u64,
                candidates.len() as u64,
            );
            let batch: Arc<Vec<(FormulaId, Option<Vec<u8>>)>> = Arc::new(
                batch
                    .iter()
                    .map(|id| (*id, g.stamps.get(id).cloned()))
                    .collect(),
            );
            let (c, s) = db
                .transact(move |tx| {
                    let batch = batch.clone();
                    Box::pin(async move {
                        let mut ahead = Vec::new();
                        for (id, _) in batch.iter() {
                            ahead.push(keys::formula_ref(id));
                            ahead.push(keys::formula(id));
                        }
                        tx.prefetch(&ahead).await?;
                        let (mut c, mut s) = (Vec::new(), Vec::new());
                        for (id, stamp) in batch.iter() {
                            if tx.get(&keys::formula(id)).await?.is_none() {
                                continue;
                            }
                            if tx.get(&keys::formula_ref(id)).await? == *stamp {
                                tx.set(&keys::condemned(id), &[])?;
                                c.push(*id);
                            } else {
                                s.push(*id);
                            }
                        }
                        Ok::<_, Error>((c, s))
                    })
                })
                .await?;
            condemned.extend(c);
            survivors.extend(s);
            // Between transactions, the node's requests run.
            tokio::task::yield_now().await;
        }

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
        Self::unmark(&db, &unmark).await?;

        // Sweep.
        let total = condemned.len() as u64;
        let rescued = Arc::new(g.rescued.clone());
        let values: Arc<HashSet<FormulaId>> = Arc::new(
            condemned
                .iter()
                .filter(|id| g.formulas.get(id).is_some_and(|f| f.1))
                .copied()
                .collect(),
        );
        // A transaction takes formulas from `condemned[at..]` until it has
        // deleted SWEEP_KEYS keys or could not take another formula's writes
        // under the backend's limit; it says how many it took.
        // The formulas offered to a transaction start at what the writes
        // limit allows at worst and double while a transaction takes them
        // all (most formulas write fewer keys than the worst case).
        let reads_limit = limit.saturating_sub(1);
        let mut offer = (limit / SWEEP_WRITES_PER_FORMULA).max(1);
        let mut at = 0usize;
        while at < condemned.len() {
            progress(GcPhase::Sweep, at as u64, total);
            let upto = (at + offer).min(condemned.len());
            let batch = Arc::new(condemned[at..upto].to_vec());
            let (rescued, values) = (rescued.clone(), values.clone());
            let done = db
                .transact(move |tx| {
                    let (batch, rescued, values) = (batch.clone(), rescued.clone(), values.clone());
                    Box::pin(async move {
                        if tx.get(&keys::gc_rescued()).await? != *rescued {
                            return Ok::<_, Error>(None);
                        }
                        let mut ahead = Vec::new();
                        for id in batch.iter() {
                            ahead.push(keys::condemned(id));
                            ahead.push(keys::formula(id));
                            ahead.push(keys::formula_ref(id));
                        }
                        tx.prefetch(&ahead).await?;
                        let (mut took, mut formulas, mut vals, mut nkeys, mut bytes) =
                            (0usize, 0u64, 0u64, 0u64, 0u64);
                        let mut reads = 1usize;
                        for id in batch.iter() {
                            if took > 0
                                && (nkeys as usize >= SWEEP_KEYS
                                    || tx.mutation_count() + SWEEP_WRITES_PER_FORMULA > limit
                                    || reads + SWEEP_READS_PER_FORMULA > reads_limit)
                            {
                                break;
                            }
                            took += 1;
                            reads += SWEEP_READS_PER_FORMULA;
                            let ck = keys::condemned(id);
                            if tx.get(&ck).await?.is_none() {
                                continue;
                            }
                            tx.clear(&ck);
                            nkeys += 1;
                            bytes += ck.len() as u64;
                            let fk = keys::formula(id);
                            let Some(f) = tx.get(&fk).await? else {
                                continue;
                            };
                            let rk = keys::formula_ref(id);
                            if let Some(r) = tx.get(&rk).await? {
                                nkeys += 1;
                                bytes += (rk.len() + r.len()) as u64;
                                tx.clear(&rk);
                            }
                            tx.clear(&fk);
                            formulas += 1;
                            nkeys += 1;
                            bytes += (fk.len() + f.len()) as u64;
                            if values.contains(id) {
                                vals += 1;
                            }
                            for prefix in [
                                keys::value(id),
                                keys::names_of_dir(id),
                                keys::dir_watch(id),
                                TupleKey::new().str("r").bytes(id.as_bytes()).into_vec(),
                                keys::locators_of(id),
                                keys::eval_deps(id),
                            ] {
                                let rows = tx
                                    .snapshot_range(&RangeOption {
                                        begin: prefix.clone(),
                                        end: prefix_end(&prefix),
                                        limit: 0,
                                        reverse: false,
                                    })
                                    .await?;
                                if !rows.is_empty() {
                                    nkeys += rows.len() as u64;
                                    bytes += size_of(&rows);
                                    tx.clear_prefix(&prefix);
                                }
                            }
                        }
                        Ok(Some((took, formulas, vals, nkeys, bytes)))
                    })
                })
                .await?;
            match done {
                Some((took, f, v, k, b)) => {
                    if took == upto - at {
                        offer = (offer * 2).min(limit);
                    }
                    at += took.max(1);
                    report.formulas += f;
                    report.values += v;
                    report.keys += k;
                    report.bytes += b;
                }
                None => {
                    tracing::info!("gc: a condemned formula was referenced again; pass stopped");
                    report.interrupted = true;
                    let rest = condemned[at..].to_vec();
                    Self::unmark(&db, &rest).await?;
                    break;
                }
            }
            // Between transactions, the node's requests run.
            tokio::task::yield_now().await;
        }

        self.expire_answers(opts, &progress, &mut report).await?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(?report, "gc: pass done");
        Ok(report)
    }

    /// Clears the condemned marks of `ids` (the formulas are kept).
    async fn unmark(db: &capstan_cluster::Db, ids: &[FormulaId]) -> Result<(), Error> {
        for batch in ids.chunks(ANSWER_BATCH.min(write_limit(db))) {
            let batch = Arc::new(batch.to_vec());
            db.transact(move |tx| {
                let batch = batch.clone();
                Box::pin(async move {
                    for id in batch.iter() {
                        tx.clear(&keys::condemned(id));
                    }
                    Ok::<_, Error>(())
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Drops exactly-once records older than the retention.
    async fn expire_answers(
        &self,
        opts: &GcOptions,
        progress: &Progress,
        report: &mut GcReport,
    ) -> Result<(), Error> {
        let now = crate::api::now_ms();
        let cutoff = now.saturating_sub(opts.keep_answers_ms);
        let db = self.db().clone();
        for prefix in [keys::dedup_all(), TupleKey::new().str("in").into_vec()] {
            let end = prefix_end(&prefix);
            let mut begin = prefix.clone();
            loop {
                progress(GcPhase::Answers, report.answers, 0);
                let rows = db
                    .store()
                    .snapshot()
                    .await?
                    .range(&RangeOption {
                        begin: begin.clone(),
                        end: end.clone(),
                        limit: PAGE,
                        reverse: false,
                    })
                    .await?;
                let Some((last, _)) = rows.last() else { break };
                let full = rows.len() == PAGE;
                begin = key_after(last);
                let mut old = Vec::new();
                for (k, v) in rows {
                    let at = if first_str(&k) == "d" {
                        DedupAnswer::decode_at_ms(&v)?
                    } else {
                        u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0xFF; 8]))
                    };
                    if at < cutoff {
                        old.push((k, v));
                    }
                }
                for batch in old.chunks(ANSWER_BATCH.min(write_limit(&db))) {
                    let ks: Arc<Vec<Vec<u8>>> =
                        Arc::new(batch.iter().map(|(k, _)| k.clone()).collect());
                    db.transact(move |tx| {
                        let ks = ks.clone();
                        Box::pin(async move {
                            for k in ks.iter() {
                                tx.clear(k);
                            }
                            Ok::<_, Error>(())
                        })
                    })
                    .await?;
                    report.answers += batch.len() as u64;
                    report.keys += batch.len() as u64;
                    report.bytes += size_of(batch);
                    tokio::task::yield_now().await;
                }
                tokio::task::yield_now().await;
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }
}
