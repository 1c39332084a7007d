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
const PAGE: usize = 2048;
/// Formulas visited by the reachability walk between two yields.
const WALK_SLICE: usize = 8192;
/// Most candidates condemned per transaction (two reads and a write each),
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
/// (reverse names, locators, and a value's chunks or a directory's names
/// and change log, and an eval result's dependencies) and its swept mark.
pub const SWEEP_WRITES_PER_FORMULA: usize = 9;
/// Sweep and condemn transactions of a pass in flight at once: one reads
/// while the store commits the other.
const SWEEP_IN_FLIGHT: usize = 2;
const CONDEMN_IN_FLIGHT: usize = 2;
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

/// What the mark knows of one formula.
#[derive(Debug, Clone, Copy)]
struct Info {
    collectable: bool,
    kind: Shape,
}

/// Which of a formula's key families the sweep must clear besides its
/// record, stamp and mark (see [`families`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Value chunks `("v", id, …)`.
    Value,
    /// Names `("n", id, …)` and the change log `("dchg", id, …)`: a
    /// directory may get names after the mark's snapshot from a writer
    /// that holds its id, so these are always read.
    Directory,
    /// Neither (promises, remote references, kinds never collected).
    Other,
}

/// What the mark read from one snapshot.
#[derive(Default)]
struct Graph {
    /// Every formula.
    formulas: HashMap<FormulaId, Info>,
    /// Eval results with recorded dependencies (`("evd", id)`).
    with_deps: HashSet<FormulaId>,
    /// Formulas deleted by an earlier pass with keys left to clear.
    swept: Vec<FormulaId>,
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
fn ids_in(bytes: &[u8], known: &HashMap<FormulaId, Info>, out: &mut Vec<FormulaId>) {
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
fn ids_in_key(key: &[u8], known: &HashMap<FormulaId, Info>, out: &mut Vec<FormulaId>) {
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
        let kind = match f.kind {
            FormulaKind::Value(_) => Shape::Value,
            FormulaKind::Directory => Shape::Directory,
            _ => Shape::Other,
        };
        g.formulas.insert(id, Info { collectable, kind });
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
                    g.with_deps.insert(result);
                    g.edges
                        .entry(result)
                        .or_default()
                        .extend(keys::decode_eval_deps(v));
                }
                "gcx" => g.condemned.push(id_in_key(k, 1)?),
                "gcz" => g.swept.push(id_in_key(k, 1)?),
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

/// What the sweep of one condemned formula clears besides its record,
/// stamp and mark.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: Shape,
    /// An eval result with recorded dependencies.
    deps: bool,
}

/// The key families of formula `id` that the sweep clears, by what the mark
/// knows of it: its reverse names and locators always; a value's chunks, a
/// directory's names and change log, an eval result's dependencies. (A
/// value gets no names, and nothing gets chunks or dependencies, after it
/// is written; only a directory can gain keys after the mark, from a
/// writer holding its id: its families are always read.)
fn families(id: &FormulaId, plan: Option<Plan>) -> Vec<Vec<u8>> {
    let mut f = vec![
        TupleKey::new().str("r").bytes(id.as_bytes()).into_vec(),
        keys::locators_of(id),
    ];
    match plan {
        Some(Plan {
            kind: Shape::Value,
            deps,
        }) => {
            f.push(keys::value(id));
            if deps {
                f.push(keys::eval_deps(id));
            }
        }
        Some(Plan {
            kind: Shape::Directory,
            deps,
        }) => {
            f.push(keys::names_of_dir(id));
            f.push(keys::dir_watch(id));
            if deps {
                f.push(keys::eval_deps(id));
            }
        }
        Some(Plan {
            kind: Shape::Other,
            deps,
        }) => {
            if deps {
                f.push(keys::eval_deps(id));
            }
        }
        // Unknown to the mark (a pass that died left it): everything.
        None => {
            f.push(keys::value(id));
            f.push(keys::names_of_dir(id));
            f.push(keys::dir_watch(id));
            f.push(keys::eval_deps(id));
        }
    }
    f
}

/// Candidates with the reference stamps the mark read.
type StampBatch = Vec<(FormulaId, Option<Vec<u8>>)>;

/// What one sweep transaction did.
#[derive(Debug, Default)]
struct Swept {
    /// Formulas of the offered range it took (a prefix).
    took: usize,
    formulas: u64,
    values: u64,
    keys: u64,
    bytes: u64,
    /// Deleted, with a family too large for this transaction: cleared
    /// after it ([`clear_swept`]).
    left: Vec<FormulaId>,
}

/// One sweep transaction over `condemned[range]` (a prefix of it, as many
/// as fit: see the module docs); `None` if a writer rescued a condemned
/// formula since the mark (nothing is deleted then).
async fn sweep_some(
    db: capstan_cluster::Db,
    condemned: Arc<Vec<FormulaId>>,
    range: std::ops::Range<usize>,
    plans: Arc<HashMap<FormulaId, Plan>>,
    rescued: Arc<Option<Vec<u8>>>,
    limit: usize,
) -> Result<Option<Swept>, Error> {
    let reads_limit = limit.saturating_sub(1);
    let t0 = Instant::now();
    let r = db
        .transact(move |tx| {
            let (condemned, range, plans, rescued) = (
                condemned.clone(),
                range.clone(),
                plans.clone(),
                rescued.clone(),
            );
            Box::pin(async move {
                if tx.get(&keys::gc_rescued()).await? != *rescued {
                    return Ok::<_, Error>(None);
                }
                let batch = &condemned[range];
                let mut ahead = Vec::new();
                for id in batch {
                    ahead.push(keys::condemned(id));
                    ahead.push(keys::formula(id));
                    ahead.push(keys::formula_ref(id));
                }
                tx.prefetch(&ahead).await?;
                let mut sw = Swept::default();
                let mut reads = 1usize;
                for id in batch {
                    if sw.took > 0
                        && (sw.keys as usize >= SWEEP_KEYS
                            || tx.mutation_count() + SWEEP_WRITES_PER_FORMULA > limit
                            || reads + SWEEP_READS_PER_FORMULA > reads_limit)
                    {
                        break;
                    }
                    sw.took += 1;
                    reads += SWEEP_READS_PER_FORMULA;
                    let ck = keys::condemned(id);
                    if tx.get(&ck).await?.is_none() {
                        continue;
                    }
                    tx.clear(&ck);
                    sw.keys += 1;
                    sw.bytes += ck.len() as u64;
                    let fk = keys::formula(id);
                    let Some(f) = tx.get(&fk).await? else {
                        continue;
                    };
                    let rk = keys::formula_ref(id);
                    if let Some(r) = tx.get(&rk).await? {
                        sw.keys += 1;
                        sw.bytes += (rk.len() + r.len()) as u64;
                        tx.clear(&rk);
                    }
                    tx.clear(&fk);
                    sw.formulas += 1;
                    sw.keys += 1;
                    sw.bytes += (fk.len() + f.len()) as u64;
                    let plan = plans.get(id).copied();
                    if plan.is_some_and(|p| p.kind == Shape::Value) {
                        sw.values += 1;
                    }
                    let mut big = false;
                    for prefix in families(id, plan) {
                        let rows = tx
                            .snapshot_range(&RangeOption {
                                begin: prefix.clone(),
                                end: prefix_end(&prefix),
                                limit: SWEEP_KEYS + 1,
                                reverse: false,
                            })
                            .await?;
                        if rows.len() > SWEEP_KEYS {
                            // Too many for one transaction: after it.
                            big = true;
                        } else if !rows.is_empty() {
                            sw.keys += rows.len() as u64;
                            sw.bytes += size_of(&rows);
                            tx.clear_prefix(&prefix);
                        }
                    }
                    if big {
                        tx.set(&keys::swept(id), &[])?;
                        sw.left.push(*id);
                    }
                }
                Ok(Some(sw))
            })
        })
        .await?;
    if let Some(sw) = &r {
        tracing::debug!(
            took = sw.took,
            keys = sw.keys,
            us = t0.elapsed().as_micros() as u64,
            "gc: sweep transaction"
        );
    }
    Ok(r)
}

/// Clears the keys left of formula `id`, deleted by a sweep that found
/// too many for its transaction (its `("gcz", id)` mark says so), a page
/// per transaction, then the mark. Nobody writes them any more: a writer
/// that holds the id finds no formula and fails. Returns the keys and
/// bytes cleared.
async fn clear_swept(
    db: &capstan_cluster::Db,
    id: FormulaId,
    limit: usize,
) -> Result<(u64, u64), Error> {
    let page = SWEEP_KEYS.min(limit.saturating_sub(1)).max(1);
    let (mut nkeys, mut bytes) = (0u64, 0u64);
    for prefix in families(&id, None) {
        loop {
            let prefix = Arc::new(prefix.clone());
            let (n, b) = db
                .transact(move |tx| {
                    let prefix = prefix.clone();
                    Box::pin(async move {
                        let rows = tx
                            .snapshot_range(&RangeOption {
                                begin: prefix.to_vec(),
                                end: prefix_end(&prefix),
                                limit: page,
                                reverse: false,
                            })
                            .await?;
                        if let Some((last, _)) = rows.last() {
                            tx.clear_range(&prefix, &key_after(last));
                        }
                        Ok::<_, Error>((rows.len() as u64, size_of(&rows)))
                    })
                })
                .await?;
            nkeys += n;
            bytes += b;
            // Between transactions, the node's requests run.
            tokio::task::yield_now().await;
            if n < page as u64 {
                break;
            }
        }
    }
    let k = keys::swept(&id);
    db.transact(move |tx| {
        let k = k.clone();
        Box::pin(async move {
            tx.clear(&k);
            Ok::<_, Error>(())
        })
    })
    .await?;
    tracing::debug!(id = %id.short(), keys = nkeys, "gc: cleared what a sweep left");
    Ok((nkeys + 1, bytes))
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

/// Clears the condemned marks of `ids` (the formulas are kept).
async fn clear_marks(db: &capstan_cluster::Db, ids: &[FormulaId]) -> Result<(), Error> {
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
    db: &capstan_cluster::Db,
    opts: &GcOptions,
    progress: &Progress,
    report: &mut GcReport,
) -> Result<(), Error> {
    let now = crate::api::now_ms();
    let cutoff = now.saturating_sub(opts.keep_answers_ms);
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
            for batch in old.chunks(ANSWER_BATCH.min(write_limit(db))) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ValueKind;
    use crate::types::RuntimeOptions;
    use capstan_proto::RequestId;

    /// Every key but exactly-once answers (those of the last millisecond
    /// outlive a pass that keeps none).
    async fn all_keys(rt: &Runtime) -> Vec<Vec<u8>> {
        let snap = rt.db().store().snapshot().await.unwrap();
        snap.range(&RangeOption {
            begin: Vec::new(),
            end: vec![SYSTEM_KEY_PREFIX],
            limit: 0,
            reverse: false,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| first_str(k) != "d")
        .collect()
    }

    fn count(keys: &[Vec<u8>], first: &str) -> usize {
        keys.iter().filter(|k| first_str(k) == first).count()
    }

    async fn pass(rt: &Runtime) -> GcReport {
        let opts = GcOptions { keep_answers_ms: 0 };
        rt.gc(&opts, Arc::new(|_, _, _| {})).await.unwrap()
    }

    /// A removed directory with more names than one sweep transaction
    /// takes: deleted, its names cleared a page at a time after it, and
    /// the store is back to what it was. Then the state a pass killed
    /// between those leaves (the directory's record gone, its swept mark
    /// and names still there): the next pass clears it.
    #[tokio::test]
    async fn a_directory_too_large_for_one_transaction_is_cleared_after_it() {
        let store = Arc::new(capstan_cluster::mem_store::MemStore::new());
        let rt = Runtime::open(capstan_cluster::Db::new(store), RuntimeOptions::default())
            .await
            .unwrap();
        let host = rt.root_host();
        host.store(RequestId::random(), "keep", ValueKind::Text, b"k".to_vec())
            .await
            .unwrap();
        pass(&rt).await;
        let base = all_keys(&rt).await;
        let n = SWEEP_KEYS + 500;
        for round in 0..2 {
            let dir = host.mkdir(RequestId::random(), "big").await.unwrap();
            for i in 0..n {
                host.store(
                    RequestId::random(),
                    &format!("big.v{i}"),
                    ValueKind::Text,
                    format!("{round}-{i}").into_bytes(),
                )
                .await
                .unwrap();
            }
            host.remove(RequestId::random(), "big").await.unwrap();
            if round == 1 {
                // What a pass killed after deleting the directory leaves:
                // its record and stamp gone, its swept mark written.
                let (fk, rk, mark) = (
                    keys::formula(&dir),
                    keys::formula_ref(&dir),
                    keys::swept(&dir),
                );
                rt.db()
                    .transact(move |tx| {
                        let (fk, rk, mark) = (fk.clone(), rk.clone(), mark.clone());
                        Box::pin(async move {
                            tx.clear(&fk);
                            tx.clear(&rk);
                            tx.set(&mark, &[])?;
                            Ok::<_, Error>(())
                        })
                    })
                    .await
                    .unwrap();
            }
            let r = pass(&rt).await;
            assert!(!r.interrupted, "{r:?}");
            assert_eq!(r.values, n as u64, "{r:?}");
            let now = all_keys(&rt).await;
            assert_eq!(count(&now, "gcz"), 0, "a swept mark is left");
            assert_eq!(count(&now, "n"), count(&base, "n"), "names left");
            assert_eq!(count(&now, "v"), count(&base, "v"), "chunks left");
            assert_eq!(now, base, "{r:?}");
            assert_eq!(host.cat("keep").await.unwrap().1, b"k");
        }
    }
}
