//! One node's object model: the [`Runtime`], the context its agents share
//! ([`Inner`]: store, registry of incarnations, the node's services) and its
//! lifecycle (open, join a cluster, drain, shut down).
//!
//! The core of the crate's layers: `node` imports only leaves (`registry`,
//! `coalesce`, `index`, `cluster`, `model`, ...), and every feature module
//! sits above it and [`crate::agent`]. What [`Inner`] holds of a feature is
//! therefore a type of a leaf below it (the registry of incarnations, the
//! reservations in flight, the search indexes), or, for the wasmtime host,
//! the [`Guests`] trait: `crate::guest`'s host holds `AgentHandle`s (its
//! linkers' store data), so its type cannot be named here, and an agent's
//! incarnation (below `guest` too) must start its guest's runner through it.
//! The `Runtime` methods of a feature (enabling guests, starting routines,
//! serving reservations, waking incarnations) are `impl Runtime` blocks in
//! that feature's module.

use crate::clock::now_ms;
use crate::error::Error;
use crate::keys;
use crate::model::{self, Ctx};
use crate::records::{AgentRec, Formula, FormulaKind};
use crate::registry::{PromiseMsg, Registry};
use crate::rules::lease::{Action, Renewal};
use capstan_cluster::Db;
use capstan_proto::FormulaId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;

use crate::types::{PromiseState, RuntimeOptions};

pub(crate) struct Inner {
    pub db: Db,
    pub opts: RuntimeOptions,
    #[allow(dead_code)] // read by the cluster placement code to come
    pub root: FormulaId,
    pub registry: Registry,
    pub closed: AtomicBool,
    /// Woken after a commit that queued items in the outbox.
    pub outbox: tokio::sync::Notify,
    /// The wasmtime host, once [`Runtime::enable_guests`] ran.
    pub guests: std::sync::OnceLock<Arc<dyn Guests>>,
    /// This node's membership, once [`Runtime::join_cluster`] ran.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Membership>>,
    /// The search indexes this node built (derived data, see [`crate::search`]).
    pub search: crate::index::Indexes,
    /// Reservations of one number waiting behind one in flight for the
    /// same inbox (see `crate::reserve`).
    pub reservations: crate::coalesce::Coalescer,
}

impl Inner {
    /// Whether small values may live inside their formula record: always on
    /// one node; in a cluster, once every live member reads such records
    /// (a node from before stop 30 takes them for damaged).
    pub(crate) fn inline_values(&self) -> bool {
        self.cluster
            .get()
            .is_none_or(|c| c.all_read(crate::cluster::RECORDS_VERSION))
    }
}

/// The node's wasmtime host as the layers below [`crate::guest`] see it
/// (see the module docs for why a trait): set by `Runtime::enable_guests`.
pub(crate) trait Guests: Send + Sync {
    /// The runner of agent `id` if its body is a component, for its owning
    /// incarnation; `took_over`: the membership and the node it was taken
    /// over from, if it was (`Membership::take_over_notice`).
    fn runner_for<'a>(
        self: Arc<Self>,
        rt: &'a Arc<Inner>,
        id: FormulaId,
        took_over: Option<(&'a Arc<crate::cluster::Membership>, String)>,
    ) -> RunnerFuture<'a>;

    /// The host itself, for `crate::guest` to get its own type back.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// What [`Guests::runner_for`] returns.
pub(crate) type RunnerFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<GuestRunner>, Error>> + Send + 'a>,
>;

/// The runner of a guest agent, owned by its incarnation (made by
/// [`Guests::runner_for`]). Wakes the runner task; dropping it ends the task after its current batch.
pub(crate) struct GuestRunner {
    pub(crate) kick: mpsc::Sender<()>,
    /// A channel keeps its incarnation alive (it polls the outside system).
    pub(crate) pinned: bool,
    /// Set while the runner works through the inbox: its incarnation is
    /// not idle then, however long a handler takes (a model call of
    /// minutes), though no mail arrives.
    pub(crate) busy: Arc<std::sync::atomic::AtomicBool>,
}

impl GuestRunner {
    /// Whether the runner is handling mail now.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// New mail: look at the inbox again.
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Whether the incarnation must not be passivated when idle.
    pub fn pinned(&self) -> bool {
        self.pinned
    }
}

/// The object model of one node.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
    /// The root host (see `Runtime::root_host`).
    pub(crate) root: Arc<Ctx>,
}

impl Runtime {
    /// A runtime with default options on a fresh in-memory store
    /// ([`capstan_cluster::mem_store::MemStore`]): for tests of the object
    /// model without processes.
    pub async fn in_memory() -> Result<Runtime, Error> {
        let store = Arc::new(capstan_cluster::mem_store::MemStore::new());
        Runtime::open(Db::new(store), RuntimeOptions::default()).await
    }

    /// Opens the runtime on a store, creating the root host on first use.
    pub async fn open(db: Db, opts: RuntimeOptions) -> Result<Runtime, Error> {
        let root = db
            .transact(|tx| {
                Box::pin(async move {
                    if let Some(b) = tx.get(&keys::root_host()).await? {
                        return FormulaId::from_slice(&b)
                            .map_err(|e| Error::Corrupt(format!("root host id: {e}")));
                    }
                    let id = FormulaId::random();
                    let store = FormulaId::random();
                    let now = now_ms();
                    model::put_formula(
                        tx,
                        &store,
                        &Formula {
                            created_ms: now,
                            cancelled: None,
                            kind: FormulaKind::Directory,
                        },
                    )?;
                    let rec = AgentRec {
                        pet_store: store,
                        host: None,
                        label: "root".into(),
                    };
                    model::put_formula(
                        tx,
                        &id,
                        &Formula {
                            created_ms: now,
                            cancelled: None,
                            kind: FormulaKind::Host(rec),
                        },
                    )?;
                    tx.set(&keys::root_host(), id.as_bytes())?;
                    Ok(id)
                })
            })
            .await?;
        let inner = Arc::new(Inner {
            db,
            opts,
            root,
            registry: Registry::new(),
            closed: AtomicBool::new(false),
            outbox: tokio::sync::Notify::new(),
            guests: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            search: Default::default(),
            reservations: Default::default(),
        });
        let rec = load_agent(&inner.db, root).await?;
        tracing::info!(root = %root, store = %inner.db.describe(), "runtime open");
        Ok(Runtime {
            inner,
            root: Arc::new(rec),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Joins the cluster whose store this runtime uses: registers this
    /// node with a lease and keeps renewing it. Returns the work for the
    /// node's links to other members (reservations at remote owners, wake-ups),
    /// which the caller must serve. Call once, inside tokio.
    pub async fn join_cluster(
        &self,
        cfg: crate::cluster::ClusterConfig,
    ) -> Result<mpsc::Receiver<crate::cluster::LinkOp>, Error> {
        let (tx, rx) = mpsc::channel(crate::cluster::LINK_QUEUE);
        let m = Arc::new(crate::cluster::Membership::new(cfg, tx));
        m.register(&self.inner.db).await?;
        self.inner
            .cluster
            .set(m)
            .map_err(|_| Error::Invalid("this runtime already joined a cluster".into()))?;
        tokio::spawn(lease_loop(Arc::downgrade(&self.inner)));
        Ok(rx)
    }

    /// This node's membership, in a cluster.
    pub fn membership(&self) -> Option<Arc<crate::cluster::Membership>> {
        self.inner.cluster.get().cloned()
    }

    /// Member `node` follows `agent`'s inbox (`gone`: no longer); this
    /// node owns it (else the interest is ignored: the follower asks the
    /// owner it finds).
    pub fn note_interest(&self, agent: FormulaId, node: String, gone: bool, seq: u64) {
        if let Some(c) = self.inner.cluster.get() {
            c.note_interest(agent, node, gone, seq);
        }
    }

    /// What the owner of `agent` answered a reservation with: the members
    /// following its inbox.
    pub fn learn_interest(&self, agent: FormulaId, nodes: Vec<String>) {
        if let Some(c) = self.inner.cluster.get() {
            c.learn_interest(agent, nodes);
        }
    }

    /// Leaves the cluster (`remove`: `cluster leave`) or just stops serving
    /// in it (`capstan stop`): gives up every placement at once, so that
    /// other nodes take over without waiting for the lease to lapse.
    pub async fn end_membership(&self, remove: bool) -> Result<(), Error> {
        let Some(c) = self.inner.cluster.get().cloned() else {
            return Ok(());
        };
        c.set_leaving();
        release_all(&self.inner, &c).await;
        crate::cluster::end_membership(&self.inner.db, &c, remove).await
    }

    /// Number of live incarnations.
    pub fn incarnations(&self) -> usize {
        self.inner.registry.count()
    }

    /// Stops every incarnation; later calls that need one fail with `Unavailable`.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let agents = self.inner.registry.agents_in_order();
        let promises = self.inner.registry.promises_in_order();
        for a in agents {
            let _ = a
                .stop_and_wait(None, Some(std::time::Duration::from_secs(2)))
                .await;
        }
        for p in promises {
            let _ = p
                .stop_and_wait(None, Some(std::time::Duration::from_secs(2)))
                .await;
        }
    }
}

/// Stops every agent incarnation of this node (a lost lease or a drain);
/// returns how many there were.
pub(crate) async fn stop_incarnations(inner: &Arc<Inner>) -> usize {
    let agents = inner.registry.agents_in_order();
    let n = agents.len();
    for a in agents {
        let _ = a
            .stop_and_wait(None, Some(std::time::Duration::from_secs(2)))
            .await;
    }
    n
}

/// Drain: stops this node's incarnations and gives up every placement it holds.
pub(crate) async fn release_all(inner: &Arc<Inner>, c: &crate::cluster::Membership) {
    let owned = inner.registry.agents.lock().map(|m| m.len()).unwrap_or(0);
    if owned > 0 {
        stop_incarnations(inner).await;
    }
    let r = crate::cluster::release_placements(&inner.db, &c.cfg.name).await;
    match r {
        Ok(0) => {}
        Ok(n) => tracing::info!(node = %c.cfg.name, placements = n, "draining: gave up placements"),
        Err(e) => tracing::warn!(node = %c.cfg.name, "draining: cannot give up placements: {e}"),
    }
}

/// Most placements one look hands over ([`rebalance`]): a member joining a
/// cluster of many agents takes them over a few at a time, not in one burst
/// of claims and re-incarnations.
pub const REBALANCE_MOVES: usize = 16;
/// Placements read per look.
const REBALANCE_PAGE: usize = 256;
/// A look every so many lease renewals (every 2 s at the default lease).
const REBALANCE_EVERY: u64 = 10;

/// Under the `spread` placement policy: hands over, at most
/// [`REBALANCE_MOVES`] at a time, the placements this node holds that
/// another live member now wins ([`crate::rules::placement::winner`]: a
/// member joined, or a drained one came back). Per formula: the placement
/// is cleared if it is still this node's under this epoch, then the
/// incarnation here stops; the next node that needs the
/// formula points at the winner, which claims it (a guest with unhandled
/// mail is resumed there by the winner's next look for such guests, or
/// its next message). Reads one page of placements per look, going on
/// from where the last one stopped. Returns how many it handed over.
pub(crate) async fn rebalance(
    inner: &Arc<Inner>,
    c: &crate::cluster::Membership,
) -> Result<usize, Error> {
    use crate::rules::placement::{Policy, to_hand_over};
    if c.policy() != Policy::Spread || !c.serving() || c.draining() || c.leaving() {
        return Ok(0);
    }
    let from = c.rebalance_from.lock().ok().and_then(|f| *f);
    let (page, next) = crate::cluster::placements_page(&inner.db, from, REBALANCE_PAGE).await?;
    if let Ok(mut f) = c.rebalance_from.lock() {
        *f = next;
    }
    let members = c.members();
    let views: Vec<_> = members.iter().map(|m| m.view()).collect();
    let held = page.iter().map(|(id, p)| (*id, p.node.as_str(), p.epoch));
    let mut moving = to_hand_over(held, &views, &c.cfg.name, c.epoch());
    moving.truncate(REBALANCE_MOVES);
    for id in &moving {
        // The placement first: once it is gone, this node no longer takes
        // itself for the owner (its cache is forgotten, and the store
        // points at the winner), so the incarnation stopped next is not
        // started again here as the owner by a message arriving between
        // the two, its runner fenced batch after batch (each leaving the
        // numbers it reserved unwritten: holes its next owner waits at).
        c.release(&inner.db, *id).await?;
        c.forget_owner(id);
        if let Some(a) = inner.registry.agent(id) {
            let _ = a
                .stop_and_wait(None, Some(std::time::Duration::from_secs(2)))
                .await;
        }
        c.handed_over.fetch_add(1, Ordering::Relaxed);
    }
    if !moving.is_empty() {
        tracing::info!(node = %c.cfg.name, placements = moving.len(), "spreading: handed placements over to the members that win them");
    }
    Ok(moving.len())
}

pub(crate) async fn load_agent(db: &Db, id: FormulaId) -> Result<Ctx, Error> {
    db.read(move |tx| {
        Box::pin(async move {
            let f = model::must_formula(tx, &id).await?;
            match f.kind {
                FormulaKind::Host(rec) => Ok(Ctx {
                    id,
                    rec,
                    is_host: true,
                }),
                FormulaKind::Guest(rec) => Ok(Ctx {
                    id,
                    rec,
                    is_host: false,
                }),
                other => Err(Error::WrongType {
                    name: id.short(),
                    expected: "host or guest".into(),
                    actual: other.type_name().into(),
                }),
            }
        })
    })
    .await
}

/// Renews the lease until the runtime closes; on a lost lease, steps down
/// (drops every incarnation) and registers again. Draining releases every
/// placement this node holds.
pub(crate) async fn lease_loop(rt: std::sync::Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let Some(inner) = rt.upgrade() else { return };
        let Some(c) = inner.cluster.get().cloned() else {
            return;
        };
        if inner.closed.load(Ordering::Acquire) || c.leaving() {
            return;
        }
        let interval = c.cfg.lease / 6;
        // Renew even when the lease lapsed on this node's clock (a slow store,
        // a paused process): if the record in the store is still ours and
        // live, nobody could have claimed our placements, so we carry on
        // with the same epoch; otherwise `renew` says so and we step down.
        // A renewal may take at most what is left of the lease (at least a
        // renewal interval): a store that does not answer (cut off, its
        // client retrying) must not keep the incarnations alive past the
        // lease while the rest of the cluster takes them over.
        let budget = c.lease_left().max(interval);
        let started = tokio::time::Instant::now().into_std();
        let renewal = match tokio::time::timeout(budget, c.renew(&inner.db)).await {
            Ok(Ok(Some(draining))) => {
                c.renewals.fetch_add(1, Ordering::Relaxed);
                c.note_renewal(None);
                failures = 0;
                Renewal::Renewed { started, draining }
            }
            Ok(Ok(None)) => Renewal::Lost,
            r => {
                let e = match r {
                    Ok(Err(e)) => e,
                    _ => Error::Unavailable(format!(
                        "the store did not answer the lease renewal within {budget:?}"
                    )),
                };
                c.renewal_failures.fetch_add(1, Ordering::Relaxed);
                c.note_renewal(Some(e.to_string()));
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(node = %c.cfg.name, "cannot renew the cluster lease: {e}");
                }
                Renewal::Failed
            }
        };
        let look = matches!(
            renewal,
            Renewal::Renewed {
                draining: false,
                ..
            }
        ) && c
            .renewals
            .load(Ordering::Relaxed)
            .is_multiple_of(REBALANCE_EVERY);
        match c.on_renewal(renewal) {
            // (in a task of its own: stopping incarnations takes time the
            // renewals cannot wait for; one look at a time)
            Action::Carry if look && !c.rebalancing.swap(true, Ordering::AcqRel) => {
                let (inner, c) = (inner.clone(), c.clone());
                tokio::spawn(async move {
                    if let Err(e) = rebalance(&inner, &c).await {
                        tracing::debug!(node = %c.cfg.name, "spreading: {e}");
                    }
                    c.rebalancing.store(false, Ordering::Release);
                });
            }
            Action::Carry => {}
            Action::ReleaseAll => release_all(&inner, &c).await,
            Action::StepDown { counted, register } => {
                step_down(&inner, &c, counted).await;
                if register {
                    match c.register_as(&inner.db, true).await {
                        Ok(epoch) => {
                            c.note_renewal(None);
                            tracing::warn!(node = %c.cfg.name, epoch, "re-registered after losing the lease")
                        }
                        Err(e) => {
                            c.note_renewal(Some(format!("cannot register again: {e}")));
                            tracing::warn!(node = %c.cfg.name, "cannot re-register yet: {e}")
                        }
                    }
                }
            }
        }
        drop(inner);
        tokio::time::sleep(interval).await;
    }
}

/// Stops every incarnation after the lease was lost or lapsed (`counted`:
/// a step-down from serving, counted and logged).
async fn step_down(inner: &Arc<Inner>, c: &crate::cluster::Membership, counted: bool) {
    let n = stop_incarnations(inner).await;
    c.forget_all();
    if counted {
        c.stepdowns.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %c.cfg.name, epoch = c.epoch(), incarnations = n, "lost the cluster lease: stepped down");
    }
}

/// `promise` settled in a commit of this node: wakes its waiters here and
/// tells the other members of the cluster, if any (theirs may wait too).
pub(crate) fn notify_settled(inner: &Inner, promise: FormulaId, state: PromiseState) {
    if let Some(a) = inner.registry.promise(&promise) {
        let _ = a.cast(PromiseMsg::Settled(state));
    }
    if let Some(c) = inner.cluster.get() {
        let to = c.others();
        if !to.is_empty() {
            let _ = c
                .link
                .try_send(crate::cluster::LinkOp::Settled { to, promise });
        }
    }
}
