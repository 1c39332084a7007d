//! Cascading cancellation (`capstan cancel NAME`): "this dies if that dies".
//!
//! Cancelling a formula revokes its locators (live references restored from
//! them fail with "revoked", as before) and cancels, transitively, what
//! depends on it:
//!
//! - the agents a cancelled host made (and theirs);
//! - the guests whose body is a cancelled component, or that were granted a
//!   cancelled capability (`mkguest --component … --with`, the component's
//!   install grants);
//! - remote formulas of this cluster made from a revoked locator of it;
//! - the requests pending in a cancelled agent's inbox: rejected with the
//!   reason, so their requesters stop waiting (across clusters too).
//!
//! Agents, promises and remote formulas are *marked* cancelled: the mark is
//! part of the formula record (so durable across restarts, seen by every
//! node, and read by the sends that already read the recipient's formula —
//! no extra read on the send path), with the reason each was given
//! (`cancelled: its dependency alice (guest 1a2b3c4d) was cancelled`). A
//! cancelled agent's incarnation stops on every node and never starts again;
//! mail to it is refused; `show` says why. A value or directory is data: its
//! holders keep reading it (a new `locate` works again), only its locators
//! and its dependents die.
//!
//! - eval results (`capstan eval … --name R`) that a cancelled formula was
//!   bound to a slot of, or whose evaluator is cancelled: marked like an
//!   agent (unlike other values), so `show` and `cat` say why;
//! - evaluations running on it (a slot holds it, or it is the evaluator),
//!   on any node: every cancelled formula gets a cancel event `("cnl",
//!   id)` (when and why), which a running evaluation reads every 200 ms;
//!   it then stops at once, even while waiting for an http server, with
//!   `… was cancelled (…): the evaluation depending on it was stopped`,
//!   and stores nothing.
//!
//! The dependents are found by scans of the formulas (cancel is rare):
//! one, then one more after each round of marks, until a scan finds
//! nothing new, so a dependent made while the cancel runs is not missed
//! (see [`AgentHandle::cancel_observed`]). An agent cannot cancel itself
//! (`cancel SELF` revokes its locators only).

use std::collections::{HashMap, HashSet, VecDeque};

use capstan_proto::{FormulaId, RequestId};

use crate::agent::AgentHandle;
use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::model;
use crate::names::Path;
use crate::records::{Cancelled, DedupAnswer, Formula, FormulaKind};
use crate::types::PromiseState;

/// Most formulas one cancel marks (a bigger cascade is refused: split it).
pub const MAX_CASCADE: usize = 10_000;
/// Formulas marked per transaction.
const MARK_BATCH: usize = 100;
/// Most rounds of marks and scans one cancel makes (see
/// [`AgentHandle::cancel_observed`]): a cancel racing more makers of
/// dependents than this fails, asking to be run again.
pub const MAX_ROUNDS: u32 = 8;

/// What one cancel did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelReport {
    /// Locators revoked, of the formula and of its dependents.
    pub revoked: u64,
    /// The formulas marked cancelled: id, type and the reason each was given.
    pub cancelled: Vec<(FormulaId, String, String)>,
    /// Pending requests rejected.
    pub rejected: u64,
}

/// Whether a formula of this kind is marked when cancelled (a live thing);
/// values and directories are data and only lose their locators.
fn markable(k: &FormulaKind) -> bool {
    matches!(
        k,
        FormulaKind::Host(_)
            | FormulaKind::Guest(_)
            | FormulaKind::Promise(_)
            | FormulaKind::Remote(_)
    )
}

fn id_after_first_str(key: &[u8]) -> Option<FormulaId> {
    let mut r = capstan_cluster::tuple::TupleReader::new(key);
    r.str().ok()?;
    FormulaId::from_slice(&r.bytes().ok()?).ok()
}

/// Who depends on whom, from one scan of the store.
struct Graph {
    formulas: HashMap<FormulaId, Formula>,
    /// Eval results (values marked when cancelled, unlike other values).
    eval_results: HashSet<FormulaId>,
    /// dependency → its dependents
    dependents: HashMap<FormulaId, Vec<FormulaId>>,
    /// swiss hash → remote formulas of this cluster restored from it
    remotes: HashMap<[u8; 32], Vec<FormulaId>>,
}

async fn graph(db: &capstan_cluster::Db) -> Result<Graph, Error> {
    let mut formulas = HashMap::new();
    for (k, v) in crate::model::scan_prefix(db, keys::formulas()).await? {
        if let Some(id) = id_after_first_str(&k)
            && let Ok(f) = Formula::decode(&v)
        {
            formulas.insert(id, f);
        }
    }
    let mut dependents: HashMap<FormulaId, Vec<FormulaId>> = HashMap::new();
    let mut remotes: HashMap<[u8; 32], Vec<FormulaId>> = HashMap::new();
    for (id, f) in &formulas {
        match &f.kind {
            FormulaKind::Host(a) | FormulaKind::Guest(a) => {
                if let Some(h) = a.host {
                    dependents.entry(h).or_default().push(*id);
                }
            }
            FormulaKind::Remote(r) => {
                remotes
                    .entry(crate::keys::swiss_hash(&r.swiss))
                    .or_default()
                    .push(*id);
            }
            _ => {}
        }
    }
    // Eval results: what their slots held and their evaluator.
    let mut eval_results = HashSet::new();
    for (k, v) in crate::model::scan_prefix(db, keys::eval_deps_all()).await? {
        let Some(result) = id_after_first_str(&k) else {
            continue;
        };
        eval_results.insert(result);
        for dep in keys::decode_eval_deps(&v) {
            dependents.entry(dep).or_default().push(result);
        }
    }
    // Components: installed values (manifest) by hash; guests by body.
    let mut by_hash: HashMap<String, Vec<FormulaId>> = HashMap::new();
    let mut manifests: HashMap<String, Vec<FormulaId>> = HashMap::new();
    for (k, v) in crate::model::scan_prefix(db, crate::guest::keys::manifest_all()).await? {
        let (Some(value), Ok(m)) = (
            id_after_first_str(&k),
            serde_json::from_slice::<crate::guest::Manifest>(&v),
        ) else {
            continue;
        };
        by_hash.entry(m.hash.clone()).or_default().push(value);
        for g in m.grants.values() {
            if let Ok(g) = g.parse::<FormulaId>() {
                manifests.entry(m.hash.clone()).or_default().push(g);
            }
        }
    }
    for (_, v) in crate::model::scan_prefix(db, crate::guest::keys::bodies()).await? {
        let Ok(b) = serde_json::from_slice::<crate::guest::Body>(&v) else {
            continue;
        };
        let Ok(guest) = b.id.parse::<FormulaId>() else {
            continue;
        };
        for value in by_hash.get(&b.hash).into_iter().flatten() {
            dependents.entry(*value).or_default().push(guest);
        }
        let granted: Vec<FormulaId> = if b.granted.is_empty() {
            manifests.get(&b.hash).cloned().unwrap_or_default()
        } else {
            b.granted.iter().filter_map(|g| g.parse().ok()).collect()
        };
        for g in granted {
            dependents.entry(g).or_default().push(guest);
        }
    }
    Ok(Graph {
        formulas,
        eval_results,
        dependents,
        remotes,
    })
}

/// The hashes of the locators issued for `id`.
async fn locator_hashes(db: &capstan_cluster::Db, id: FormulaId) -> Result<Vec<[u8; 32]>, Error> {
    let rows = crate::model::scan_prefix(db, keys::locators_of(&id)).await?;
    Ok(rows
        .iter()
        .filter_map(|(k, _)| {
            let mut r = capstan_cluster::tuple::TupleReader::new(k);
            r.str().ok()?;
            r.bytes().ok()?;
            r.bytes().ok()?.as_slice().try_into().ok()
        })
        .collect())
}

/// Revokes every locator of `id` in `tx`; how many.
pub(crate) async fn revoke_locators(
    tx: &mut capstan_cluster::Transaction,
    id: &FormulaId,
) -> Result<u64, Error> {
    let rows = tx.get_prefix(&keys::locators_of(id), 0, false).await?;
    let mut n = 0u64;
    for (k, _) in rows {
        let mut r = capstan_cluster::tuple::TupleReader::new(&k);
        let hash = (|| {
            r.str()?;
            r.bytes()?;
            r.bytes()
        })()
        .map_err(|e| Error::Corrupt(format!("locator index key: {e}")))?;
        let hash: [u8; 32] = hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Corrupt("locator index key".into()))?;
        tx.clear(&keys::locator(&hash));
        tx.clear(&k);
        n += 1;
    }
    Ok(n)
}

fn describe(name: &str, id: &FormulaId, f: Option<&Formula>) -> String {
    let t = f.map_or("formula", |f| f.kind.type_name());
    let label = f.and_then(|f| f.kind.agent()).map(|a| a.label.as_str());
    let name = match label {
        Some(l) if name.is_empty() && !l.is_empty() => l,
        _ => name,
    };
    if name.is_empty() {
        format!("{t} {}", id.short())
    } else {
        format!("{name} ({t} {})", id.short())
    }
}

/// Adds to `order` (and `seen`) the dependents of `from`, transitively,
/// breadth first: each is told of the dependency it depends on directly.
#[allow(clippy::too_many_arguments)]
async fn expand(
    db: &capstan_cluster::Db,
    g: &Graph,
    from: impl IntoIterator<Item = FormulaId>,
    root: FormulaId,
    path: &str,
    seen: &mut HashSet<FormulaId>,
    order: &mut Vec<(FormulaId, String)>,
) -> Result<(), Error> {
    let mut queue: VecDeque<FormulaId> = from.into_iter().collect();
    while let Some(dep) = queue.pop_front() {
        let name = if dep == root { path } else { "" };
        let why = format!(
            "cancelled: its dependency {} was cancelled",
            describe(name, &dep, g.formulas.get(&dep))
        );
        let mut next: Vec<FormulaId> = g.dependents.get(&dep).cloned().unwrap_or_default();
        for h in locator_hashes(db, dep).await? {
            next.extend(g.remotes.get(&h).into_iter().flatten());
        }
        for d in next {
            if seen.insert(d) {
                if order.len() >= MAX_CASCADE {
                    return Err(Error::Invalid(format!(
                        "cancelling {path} would cancel more than {MAX_CASCADE} formulas; what was marked so far stays cancelled: cancel its dependents first, then {path} again"
                    )));
                }
                order.push((d, why.clone()));
                queue.push_back(d);
            }
        }
    }
    Ok(())
}

/// Called before each round of marks of a cancel, with its number: 0 after
/// the first scan, before anything is marked; `n` after the scan that
/// followed round `n - 1`'s marks. For tests that make a dependent while
/// a cancel runs.
pub type ScanHook = std::sync::Arc<dyn Fn(u32) + Send + Sync>;

impl AgentHandle {
    /// Cancels what `path` names and, transitively, what depends on it
    /// (see the module's documentation). Hosts only.
    pub async fn cancel(&self, req: RequestId, path: &str) -> Result<CancelReport, Error> {
        self.cancel_observed(req, path, None).await
    }

    /// [`cancel`](Self::cancel), calling `hook` after each scan.
    ///
    /// A dependent made while the cancel runs is not missed: the cancel
    /// marks what it found, then scans again, marks what is new, and ends
    /// only with a scan (taken after its last marks committed) that finds
    /// nothing new, at most [`MAX_ROUNDS`] rounds. A dependent made before
    /// that last scan is in it, so cancelled. One made after it reads what
    /// it depends on in the transaction that makes it: an agent, promise,
    /// remote formula or eval result is then marked (it is refused: `make`,
    /// `evaluate_as`, sends), a revoked locator is gone (restore is
    /// refused); and a value or directory, which is data and only loses its
    /// locators, gets a dependent made after the cancel, like one made a
    /// minute later.
    pub async fn cancel_observed(
        &self,
        req: RequestId,
        path: &str,
        hook: Option<ScanHook>,
    ) -> Result<CancelReport, Error> {
        if !self.ctx().is_host {
            return Err(Error::Invalid(
                "only a host can cancel; a guest has only what it was given".into(),
            ));
        }
        let me = self.ctx().id;
        let ctx = self.ctx().clone();
        let p = Path::parse(path)?;
        let db = self.inner().db.clone();
        let (root, earlier) = db
            .read(move |tx| {
                let (ctx, p) = (ctx.clone(), p.clone());
                Box::pin(async move {
                    let earlier = model::dedup_get(tx, &me, &req).await?;
                    Ok::<_, Error>((model::resolve(tx, &ctx, &p).await?, earlier))
                })
            })
            .await?;
        if let Some(DedupAnswer::Number(n)) = earlier {
            return Ok(CancelReport {
                revoked: n,
                ..Default::default()
            });
        }
        let mut order: Vec<(FormulaId, String)> = Vec::new();
        let mut seen: HashSet<FormulaId> = HashSet::from([root, me]);
        if root != me {
            order.push((root, "cancelled by its host".to_string()));
        }
        let mut g = graph(&db).await?;
        // `cancel SELF` revokes locators only: nothing of its own dies.
        if root != me {
            expand(&db, &g, [root], root, path, &mut seen, &mut order).await?;
        }
        let mut report = CancelReport::default();
        let mut settled = Vec::new();
        let mut done = 0usize;
        let mut round = 0u32;
        loop {
            if let Some(h) = &hook {
                h(round);
            }
            let fresh: Vec<(FormulaId, String)> = order[done..].to_vec();
            if fresh.is_empty() && round > 0 {
                break;
            }
            if round >= MAX_ROUNDS {
                return Err(Error::Unavailable(format!(
                    "dependents of {path} kept being made while it was cancelled ({MAX_ROUNDS} rounds); what was found is cancelled: cancel {path} again"
                )));
            }
            self.cancel_round(&g, root, path, &fresh, &mut report, &mut settled)
                .await?;
            done = order.len();
            round += 1;
            // Scan again, after the marks committed: what was made
            // meanwhile depends on something in `order`.
            g = graph(&db).await?;
            let all: Vec<FormulaId> = order.iter().map(|(id, _)| *id).collect();
            expand(&db, &g, all, root, path, &mut seen, &mut order).await?;
        }
        // The answer for a retry.
        let revoked = report.revoked;
        self.transact(move |tx| {
            Box::pin(async move {
                model::dedup_put(tx, &me, &req, DedupAnswer::Number(revoked), now_ms())?;
                Ok(())
            })
        })
        .await?;
        for (id, s) in settled {
            crate::node::notify_settled(self.inner(), id, s);
        }
        // Stop the incarnations of the agents that died, here and on the
        // other members (they look at the formula and stop theirs).
        for (id, t, _) in &report.cancelled {
            if t == "host" || t == "guest" {
                crate::incarnation::stop_cancelled(self.inner(), *id);
            }
        }
        tracing::info!(
            root = %root.short(),
            cancelled = report.cancelled.len(),
            revoked = report.revoked,
            rejected = report.rejected,
            rounds = round,
            "cancelled"
        );
        Ok(report)
    }

    /// Rejects the pending requests of the agents in `fresh`, then marks
    /// `fresh` and revokes their locators, a batch per transaction.
    async fn cancel_round(
        &self,
        g: &Graph,
        root: FormulaId,
        path: &str,
        fresh: &[(FormulaId, String)],
        report: &mut CancelReport,
        settled: &mut Vec<(FormulaId, PromiseState)>,
    ) -> Result<(), Error> {
        let me = self.ctx().id;
        // Requests pending in the inboxes of the agents that die: rejected
        // with the reason (first, while the agents are live).
        for (id, _) in fresh {
            if g.formulas.get(id).and_then(|f| f.kind.agent()).is_some() {
                let name = if *id == root { path } else { "" };
                let why = format!(
                    "cancelled: its dependency {} was cancelled",
                    describe(name, id, g.formulas.get(id))
                );
                report.rejected += self.reject_pending(*id, &why).await?;
            }
        }
        let mut batch_list: Vec<(FormulaId, String, bool)> = fresh
            .iter()
            .map(|(id, why)| (*id, why.clone(), g.eval_results.contains(id)))
            .collect();
        if batch_list.is_empty() {
            // Nothing depends on it: its locators still go.
            batch_list.push((root, String::new(), false));
        }
        for batch in batch_list.chunks(MARK_BATCH) {
            let batch = batch.to_vec();
            let (revoked, marked) = self
                .transact(move |tx| {
                    let batch = batch.clone();
                    Box::pin(async move {
                        let mut revoked = 0u64;
                        let mut marked = Vec::new();
                        for (id, why, eval_result) in &batch {
                            revoked += revoke_locators(tx, id).await?;
                            if why.is_empty() || *id == me {
                                continue;
                            }
                            // Seen by evaluations running on it (any kind:
                            // a value is not marked, but what runs on it
                            // stops; `crate::guest::eval`).
                            tx.set(
                                &keys::cancel_event(id),
                                &keys::encode_cancel_event(now_ms(), why),
                            )?;
                            let Some(mut f) = model::get_formula(tx, id).await? else {
                                continue;
                            };
                            if f.cancelled.is_some() || !(markable(&f.kind) || *eval_result) {
                                continue;
                            }
                            let mut state = None;
                            if let FormulaKind::Promise(p) = &mut f.kind
                                && p.state == PromiseState::Pending
                            {
                                p.state = PromiseState::Rejected(why.clone());
                                state = Some(p.state.clone());
                            }
                            f.cancelled = Some(Cancelled {
                                reason: why.clone(),
                                at_ms: now_ms(),
                            });
                            model::put_formula(tx, id, &f)?;
                            marked.push((*id, f.kind.type_name().to_string(), why.clone(), state));
                        }
                        Ok::<_, Error>((revoked, marked))
                    })
                })
                .await?;
            report.revoked += revoked;
            for (id, t, why, state) in marked {
                if let Some(s) = state {
                    settled.push((id, s));
                }
                report.cancelled.push((id, t, why));
            }
        }
        Ok(())
    }

    /// Rejects the requests pending in `agent`'s inbox (sent to it by
    /// others) with `why`; how many.
    async fn reject_pending(&self, agent: FormulaId, why: &str) -> Result<u64, Error> {
        let h = AgentHandle::load(self.inner(), agent).await?;
        let rows = crate::model::scan_prefix(&self.inner().db, keys::inbox(&agent)).await?;
        let mut n = 0;
        for (_, v) in rows {
            let Ok(m) = crate::records::MessageRec::decode(&v) else {
                continue;
            };
            let crate::records::BodyRec::Request { promise, .. } = &m.body else {
                continue;
            };
            if m.from == agent {
                continue;
            }
            let promise = *promise;
            let pending = self
                .inner()
                .db
                .read(move |tx| {
                    Box::pin(async move {
                        Ok::<_, Error>(matches!(
                            model::get_formula(tx, &promise).await?,
                            Some(Formula {
                                kind: FormulaKind::Promise(ref p),
                                ..
                            }) if p.state == PromiseState::Pending
                        ))
                    })
                })
                .await?;
            if pending {
                match h.reject(RequestId::random(), m.number, why).await {
                    Ok(()) => n += 1,
                    Err(Error::AlreadySettled(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(n)
    }
}
