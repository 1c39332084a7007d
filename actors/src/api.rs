//! The public face of the object model used by `nodes/`: a [`Runtime`] per
//! node process and [`AgentHandle`]s, the capability to act as one agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use capstan_cluster::Db;
use capstan_proto::{FormulaId, RequestId};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::incarnation::{self, AgentMsg, PromiseMsg, Registry};
use crate::keys;
use crate::model::{self, Ctx};
use crate::names::Path;
use crate::records::{
    AgentRec, BodyRec, DedupAnswer, Formula, FormulaKind, MessageRec, PromiseRec, RemoteRec,
    ValueRec,
};

/// Kind of a stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Text,
    Json,
    Bytes,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub name: String,
    pub id: FormulaId,
    /// host, guest, directory, value, promise
    pub kind: String,
    /// value: "text, 12 bytes"; promise: "pending" / "resolved" / "rejected: why"
    pub detail: String,
}

/// A promise's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromiseState {
    Pending,
    Resolved(FormulaId),
    Rejected(String),
}

/// A message as one agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    pub number: u64,
    pub message_id: RequestId,
    pub reply_to: Option<RequestId>,
    pub from: String,
    pub to: String,
    pub date_ms: u64,
    pub body: MessageBodyView,
}

/// The body of a [`MessageView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageBodyView {
    Package {
        strings: Vec<String>,
        names: Vec<String>,
    },
    Request {
        description: String,
        state: PromiseState,
    },
}

/// A reference embedded in a sent message: a path in the sender's names and
/// the name suggested to the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSpec {
    pub path: String,
    pub edge_name: String,
}

/// Options of a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Incarnations idle this long are passivated.
    pub idle_timeout: std::time::Duration,
    /// The key that seals the store's secrets (LLM API keys); without one,
    /// adding a key is refused and sealed keys cannot be used.
    pub secrets: Option<crate::secrets::SecretsKey>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            idle_timeout: std::time::Duration::from_secs(60),
            secrets: None,
        }
    }
}

/// Largest stored value.
pub const MAX_VALUE_BYTES: usize = capstan_cluster::blob::MAX_BLOB_SIZE;
/// Largest message text (all text chunks together).
pub const MAX_MESSAGE_TEXT: usize = 64 * 1024;
/// Most references in one message.
pub const MAX_MESSAGE_REFS: usize = 64;
/// Most entries returned by one listing.
pub const MAX_LIST: usize = 100_000;
/// Messages of one inbox page when the caller names no limit.
pub const DEFAULT_INBOX_PAGE: usize = 1000;
/// Most messages of one inbox page.
pub const MAX_INBOX_PAGE: usize = 10_000;
/// Messages read at a time by a scan of a whole inbox (threads).
const INBOX_SCAN_PAGE: usize = 1000;
/// A follower that got no push for this long looks in the store for
/// messages a push missed.
const FOLLOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// Most fresh inbox numbers one write tries after finding its number used.
pub const MAX_SLOT_RETRIES: u32 = 32;

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
    pub guests: std::sync::OnceLock<Arc<crate::guest::GuestHost>>,
    /// This node's membership, once [`Runtime::join_cluster`] ran.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Membership>>,
    /// The search indexes this node built (derived data, see [`crate::search`]).
    pub search: crate::search::Indexes,
}

/// The object model of one node.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
    root: AgentHandle,
}

pub(crate) fn now_ms() -> u64 {
    crate::clock::now_ms()
}

impl Runtime {
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
        });
        let rec = load_agent(&inner.db, root).await?;
        let root_handle = AgentHandle {
            rt: inner.clone(),
            ctx: Arc::new(rec),
            fence: None,
            journal: None,
            open: None,
        };
        tracing::info!(root = %root, store = %inner.db.describe(), "runtime open");
        Ok(Runtime {
            inner,
            root: root_handle,
        })
    }

    pub fn root_host(&self) -> AgentHandle {
        self.root.clone()
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Starts the wasmtime host: guest agents whose body is a component
    /// then run their handler on every message. Call once, inside tokio.
    pub fn enable_guests(&self, cfg: crate::guest::GuestConfig) -> Result<(), Error> {
        let gh = crate::guest::GuestHost::new(cfg)?;
        self.inner
            .guests
            .set(Arc::new(gh))
            .map_err(|_| Error::Invalid("guests are already enabled".into()))
    }

    /// Starts the guests that have mail they did not handle (their node
    /// died mid-handler, or mail came while no node ran them), now and, in a
    /// cluster, every two leases (owners die). Call once, inside tokio,
    /// after [`Runtime::enable_guests`] and [`Runtime::join_cluster`].
    pub fn start_guest_resumer(&self) {
        tokio::spawn(crate::guest::resume_loop(Arc::downgrade(&self.inner)));
    }

    /// Fires routines that are due (see [`crate::routines`]): on a lone
    /// node all of them, in a cluster those this node owns. Call once,
    /// inside tokio, after [`Runtime::join_cluster`].
    pub fn start_routines(&self) {
        tokio::spawn(crate::routines::routine_loop(Arc::downgrade(&self.inner)));
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
        tokio::spawn(crate::cluster::lease_loop(Arc::downgrade(&self.inner)));
        Ok(rx)
    }

    /// This node's membership, in a cluster.
    pub fn membership(&self) -> Option<Arc<crate::cluster::Membership>> {
        self.inner.cluster.get().cloned()
    }

    /// Serves a reservation another member asked of this node (the owner).
    pub async fn serve_reserve(
        &self,
        agent: FormulaId,
        count: u64,
        at_least: u64,
        quota_bytes: u64,
    ) -> Result<(u64, Vec<String>), Error> {
        let c = self
            .inner
            .cluster
            .get()
            .ok_or_else(|| Error::Invalid("this node is not in a cluster".into()))?;
        match c.owner(&self.inner.db, agent).await? {
            crate::cluster::Owner::Me => {
                let size = (quota_bytes > 0).then_some(quota_bytes);
                let first = local_reserve(&self.inner, agent, count, at_least, size).await?;
                Ok((first, c.interested(&agent)))
            }
            crate::cluster::Owner::Other(m) => Err(Error::Unavailable(format!(
                "not the owner: node {} owns {}",
                m.name,
                agent.short()
            ))),
        }
    }

    /// Member `node` follows `agent`'s inbox; this node owns it (else the
    /// interest is ignored: the follower asks the owner it finds).
    pub fn note_interest(&self, agent: FormulaId, node: String) {
        if let Some(c) = self.inner.cluster.get() {
            c.note_interest(agent, node);
        }
    }

    /// What the owner of `agent` answered a reservation with: the members
    /// following its inbox.
    pub fn learn_interest(&self, agent: FormulaId, nodes: Vec<String>) {
        if let Some(c) = self.inner.cluster.get() {
            c.learn_interest(agent, nodes);
        }
    }

    /// Another member committed message `number` to `agent`'s inbox: wake
    /// its incarnation here, if any.
    pub async fn wake_delivered(&self, agent: FormulaId, number: u64) -> Result<(), Error> {
        self.wake_delivered_with(agent, number, &[]).await
    }

    /// [`Runtime::wake_delivered`] with the message as stored (`record`,
    /// from the member that committed it; empty: read it from the store).
    /// A record that does not decode to message `number` of `agent` is
    /// ignored and the message read from the store.
    pub async fn wake_delivered_with(
        &self,
        agent: FormulaId,
        number: u64,
        record: &[u8],
    ) -> Result<(), Error> {
        if let Some(c) = self.inner.cluster.get() {
            c.deliveries_received
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(a) = self.inner.registry.agent(&agent) else {
            return Ok(());
        };
        if !record.is_empty()
            && let Ok(m) = MessageRec::decode(record)
            && m.number == number
            && (m.to == agent || m.from == agent)
        {
            let _ = a.cast(AgentMsg::Delivered(m));
            return Ok(());
        }
        let m = self
            .inner
            .db
            .read(move |tx| Box::pin(async move { model::get_message(tx, &agent, number).await }))
            .await?;
        let _ = a.cast(AgentMsg::Delivered(m));
        Ok(())
    }

    /// Another member settled `promise`: wake its waiters here, if any.
    pub async fn wake_settled(&self, promise: FormulaId) -> Result<(), Error> {
        // An agent cancelled on another member: stop its incarnation here.
        if self.inner.registry.agent(&promise).is_some() {
            let id = promise;
            let cancelled = self
                .inner
                .db
                .read(move |tx| {
                    Box::pin(async move {
                        Ok::<_, Error>(model::get_formula(tx, &id).await?.and_then(|f| f.cancelled))
                    })
                })
                .await?;
            if cancelled.is_some() {
                incarnation::stop_local(&self.inner, id);
            }
        }
        let Some(a) = self.inner.registry.promise(&promise) else {
            return Ok(());
        };
        let state = incarnation::read_promise(&self.inner, promise).await?;
        let _ = a.cast(PromiseMsg::Settled(state));
        Ok(())
    }

    /// Claims agent `id` for this node if nobody live owns it, and
    /// incarnates it here (its guest, if any, starts): after a drain.
    /// `Ok(false)` when another node owns it.
    pub async fn adopt_placement(&self, id: FormulaId) -> Result<bool, Error> {
        let c = self
            .inner
            .cluster
            .get()
            .ok_or_else(|| Error::Invalid("this node is not in a cluster".into()))?;
        match c.owner(&self.inner.db, id).await? {
            crate::cluster::Owner::Me => {
                incarnation::owned_agent_actor(&self.inner, id).await?;
                Ok(true)
            }
            crate::cluster::Owner::Other(_) => Ok(false),
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
        let agents: Vec<_> = self
            .inner
            .registry
            .agents
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let promises: Vec<_> = self
            .inner
            .registry
            .promises
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
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
    let agents: Vec<_> = inner
        .registry
        .agents
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
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
    let me = c.cfg.name.clone();
    let r = inner
        .db
        .transact(move |tx| {
            let me = me.clone();
            Box::pin(async move {
                let mine: Vec<FormulaId> = crate::cluster::list_placements(tx, 100)
                    .await?
                    .into_iter()
                    .filter(|(_, p)| p.node == me)
                    .map(|(id, _)| id)
                    .collect();
                for id in &mine {
                    crate::cluster::clear_placement(tx, id);
                }
                Ok::<_, Error>(mine.len())
            })
        })
        .await;
    match r {
        Ok(0) => {}
        Ok(n) => tracing::info!(node = %c.cfg.name, placements = n, "draining: gave up placements"),
        Err(e) => tracing::warn!(node = %c.cfg.name, "draining: cannot give up placements: {e}"),
    }
}

/// Reserves numbers from this node's owning incarnation of `agent`.
async fn local_reserve(
    inner: &Arc<Inner>,
    agent: FormulaId,
    n: u64,
    at_least: u64,
    size: Option<u64>,
) -> Result<u64, Error> {
    for _ in 0..3 {
        let a = incarnation::owned_agent_actor(inner, agent).await?;
        match a
            .call(|port| AgentMsg::Reserve(n, at_least, size, port), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => return r,
            _ => tokio::task::yield_now().await, // passivated meanwhile: incarnate again
        }
    }
    Err(Error::Unavailable(
        "the inbox actor is restarting; try again".into(),
    ))
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

/// The capability to act as one agent (host or guest).
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) rt: Arc<Inner>,
    pub(crate) ctx: Arc<Ctx>,
    /// In a cluster, for the handle a guest's component acts through: its
    /// writes are refused unless this node still owns the guest.
    pub(crate) fence: Option<crate::cluster::Fence>,
    /// For the handle a guest's handler acts through: the answers of its
    /// reads, written with its next write (see [`crate::guest::journal`]).
    pub(crate) journal: Option<Arc<crate::guest::journal::Journal>>,
    /// For the handle a guest runner's handlers act through: the batch
    /// their operations run in (see [`crate::open_tx`]).
    pub(crate) open: Option<Arc<crate::open_tx::OpenTx>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentHandle({})", self.ctx.id.short())
    }
}

/// What a message's transaction writes besides its copies: the body (and
/// the promise a request makes), given the transaction and the sender.
trait PostBody:
    for<'t> Fn(
        &'t mut capstan_cluster::Transaction,
        &Arc<Ctx>,
    ) -> capstan_cluster::TxFuture<'t, (BodyRec, Option<FormulaId>), Error>
    + Send
    + Sync
    + 'static
{
}

impl<F> PostBody for F where
    F: for<'t> Fn(
            &'t mut capstan_cluster::Transaction,
            &Arc<Ctx>,
        ) -> capstan_cluster::TxFuture<'t, (BodyRec, Option<FormulaId>), Error>
        + Send
        + Sync
        + 'static
{
}

/// Who a message goes to, as its sender named it.
struct Recipient {
    to_path: Option<Path>,
    to_name: String,
    reply_to: Option<u64>,
    refs: Vec<Path>,
}

/// A resolved recipient: the agent, the id of the message replied to, the
/// remote record of an agent of another cluster; and, when it was read on a
/// snapshot that may miss the latest commits, the recipient to resolve
/// again in the posting transaction.
struct Resolved {
    target: FormulaId,
    reply_id: Option<RequestId>,
    remote: Option<RemoteRec>,
    recheck: Option<Arc<Recipient>>,
}

/// The keys [`resolve_recipient`] reads for `r` when it resolves to
/// `target` by a plain name or a reply (others are read as it goes).
fn recipient_keys(ctx: &Ctx, r: &Recipient, target: &FormulaId) -> Vec<Vec<u8>> {
    let mut out = vec![keys::formula(target)];
    if let Some(n) = r.reply_to {
        out.push(keys::message(&ctx.id, n));
    }
    if let Some(p) = &r.to_path
        && let [first] = p.segments.as_slice()
        && !crate::names::is_special_form(first)
    {
        out.push(keys::name(&ctx.rec.pet_store, first));
    }
    out
}

/// Resolves `r` as `ctx` sees it in `tx` (see [`AgentHandle::recipient`]).
async fn resolve_recipient(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    r: &Recipient,
) -> Result<(FormulaId, Option<RequestId>, Option<RemoteRec>), Error> {
    let (to_path, reply_to, refs) = (&r.to_path, r.reply_to, &r.refs);
    let to_name = r.to_name.clone();
    for p in refs {
        resolve_reference(tx, ctx, p).await?;
    }
    let mut reply_id = None;
    let mut target = None;
    if let Some(n) = reply_to {
        let m = model::get_message(tx, &ctx.id, n).await?;
        reply_id = Some(m.message_id);
        target = Some(if m.from == ctx.id { m.to } else { m.from });
    }
    if let Some(p) = to_path {
        target = Some(model::resolve(tx, ctx, p).await?);
    }
    let target = target.ok_or_else(|| Error::Invalid("a message needs a recipient".into()))?;
    let f = model::must_formula(tx, &target).await?;
    if let Some(c) = &f.cancelled {
        let name = if to_name.is_empty() {
            "the recipient"
        } else {
            to_name.as_str()
        };
        return Err(crate::cancel::cancelled_error(
            name,
            c,
            ": nothing was sent",
        ));
    }
    if let FormulaKind::Remote(r) = f.kind {
        // An agent of another cluster (its side checks).
        return Ok((target, reply_id, Some(r)));
    }
    if f.kind.agent().is_none() {
        return Err(Error::WrongType {
            name: to_name,
            expected: "host or guest".into(),
            actual: f.kind.type_name().into(),
        });
    }
    Ok((target, reply_id, None))
}

/// What a store transaction of a mutating operation returns, with the answer
/// recorded for exactly-once retries.
async fn checked_dedup(
    tx: &mut capstan_cluster::Transaction,
    agent: &FormulaId,
    req: &RequestId,
) -> Result<Option<DedupAnswer>, Error> {
    model::dedup_get(tx, agent, req).await
}

pub(crate) fn entry_detail(f: &Formula) -> String {
    if let Some(c) = &f.cancelled {
        return c.reason.clone();
    }
    match &f.kind {
        FormulaKind::Value(v) => {
            let k = match v.kind {
                ValueKind::Text => "text",
                ValueKind::Json => "json",
                ValueKind::Bytes => "bytes",
            };
            format!("{k}, {} bytes", v.size)
        }
        FormulaKind::Promise(p) => state_text(&p.state),
        FormulaKind::Host(a) | FormulaKind::Guest(a) => a.label.clone(),
        FormulaKind::Directory => String::new(),
        FormulaKind::Remote(r) => format!(
            "cluster {} at {}",
            &capstan_proto::locator::encode32(&r.cluster)[..12],
            r.addrs.join(",")
        ),
        FormulaKind::Invitation(_) => "pending: not accepted yet".into(),
        FormulaKind::Accepting(_) => "accepting an invitation: waiting for the inviter".into(),
        FormulaKind::Llm(l) => crate::llm::detail(l),
    }
}

/// `pending`, `resolved`, or `rejected: REASON`.
pub fn state_text(s: &PromiseState) -> String {
    match s {
        PromiseState::Pending => "pending".into(),
        PromiseState::Resolved(_) => "resolved".into(),
        PromiseState::Rejected(r) => format!("rejected: {r}"),
    }
}

/// The special names a host has besides `SELF` and `HOST`, which name no
/// value (`list` shows them; they cannot be read, written or sent), with
/// what `list` says of them.
pub const HOST_ONLY_SPECIALS: [(&str, &str); 2] = [
    ("MAIL", "your inbox, not a value: see `capstan inbox`"),
    ("NONE", "names nothing, not a value"),
];

/// The `list` entry of a special name of [`HOST_ONLY_SPECIALS`]: type
/// `special`, and an id of zeros (it names no formula).
fn unvalued_special(name: &str) -> EntryInfo {
    let detail = HOST_ONLY_SPECIALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .unwrap_or("not a value");
    EntryInfo {
        name: name.into(),
        id: FormulaId([0; 32]),
        kind: "special".into(),
        detail: detail.into(),
    }
}

/// What a reference `@p` in a message's text designates; an unknown name
/// is an error that says how to write a literal `@`.
async fn resolve_reference(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    p: &Path,
) -> Result<FormulaId, Error> {
    model::resolve(tx, ctx, p).await.map_err(|e| match e {
        Error::UnknownName(_) => Error::Invalid(format!(
            "the reference @{p} names nothing: you have no name {:?} (see `capstan list`); write @@{p} for a literal @",
            p.to_string()
        )),
        other => other,
    })
}

/// The reason a request rejected without one is given.
pub const NO_REASON: &str = "no reason given";

/// Why `cat` of a promise that is not resolved shows nothing: pending (an
/// answer may still come) or rejected (none ever will, and why).
pub(crate) fn promise_has_no_value(name: &str, state: &PromiseState) -> Error {
    match state {
        PromiseState::Rejected(reason) => Error::Invalid(format!(
            "{name} is a request that was rejected: {reason}; it has no value"
        )),
        _ => Error::Invalid(format!(
            "{name} is a request that is still pending; nothing to show yet (its answer lands here once resolved)"
        )),
    }
}

/// The bytes of value `id`, checked against its record.
pub(crate) async fn value_bytes(
    tx: &mut capstan_cluster::Transaction,
    id: &FormulaId,
    v: &ValueRec,
) -> Result<Vec<u8>, Error> {
    let data = capstan_cluster::blob::get_blob(tx, &keys::value(id))
        .await?
        .ok_or_else(|| Error::Corrupt(format!("value {} has no bytes", id.short())))?;
    if data.len() as u64 != v.size || *blake3::hash(&data).as_bytes() != v.hash {
        return Err(Error::Corrupt(format!(
            "value {} does not match its hash",
            id.short()
        )));
    }
    Ok(data)
}

/// Follows resolved promises to what they resolved to (bounded chain).
pub(crate) async fn settle_target(
    tx: &mut capstan_cluster::Transaction,
    mut id: FormulaId,
) -> Result<(FormulaId, Formula), Error> {
    for _ in 0..16 {
        let f = model::must_formula(tx, &id).await?;
        match &f.kind {
            FormulaKind::Promise(PromiseRec {
                state: PromiseState::Resolved(t),
                ..
            }) => id = *t,
            _ => return Ok((id, f)),
        }
    }
    Err(Error::Corrupt("promise chain longer than 16".into()))
}

impl AgentHandle {
    /// Acting as agent `id` (for the guest host).
    pub(crate) async fn load(rt: &Arc<Inner>, id: FormulaId) -> Result<AgentHandle, Error> {
        let rec = load_agent(&rt.db, id).await?;
        Ok(AgentHandle {
            rt: rt.clone(),
            ctx: Arc::new(rec),
            fence: None,
            journal: None,
            open: None,
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.rt
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    pub fn id(&self) -> FormulaId {
        self.ctx.id
    }

    /// Whether this agent is a host.
    pub fn is_host(&self) -> bool {
        self.ctx.is_host
    }

    pub async fn list(&self, path: &str) -> Result<Vec<EntryInfo>, Error> {
        let ctx = self.ctx.clone();
        let path = if path.is_empty() {
            None
        } else {
            Some(Path::parse(path)?)
        };
        self.read(move |tx| {
            Box::pin(async move {
                let (dir, specials) = match &path {
                    None => (ctx.rec.pet_store, true),
                    Some(p) => {
                        let id = model::resolve(tx, &ctx, p).await?;
                        match model::must_formula(tx, &id).await?.kind {
                            FormulaKind::Directory => (id, false),
                            other => {
                                return Err(Error::WrongType {
                                    name: p.to_string(),
                                    expected: "directory".into(),
                                    actual: other.type_name().into(),
                                });
                            }
                        }
                    }
                };
                let mut out = Vec::new();
                if specials {
                    for (name, id) in [("HOST", ctx.host()), ("SELF", ctx.id)] {
                        let f = model::must_formula(tx, &id).await?;
                        out.push(EntryInfo {
                            name: name.into(),
                            id,
                            kind: f.kind.type_name().into(),
                            detail: entry_detail(&f),
                        });
                    }
                    if ctx.is_host {
                        out.extend(HOST_ONLY_SPECIALS.iter().map(|(n, _)| unvalued_special(n)));
                    }
                }
                for (name, id) in model::list_dir(tx, &dir, MAX_LIST).await? {
                    let f = model::must_formula(tx, &id).await?;
                    out.push(EntryInfo {
                        name,
                        id,
                        kind: f.kind.type_name().into(),
                        detail: entry_detail(&f),
                    });
                }
                Ok(out)
            })
        })
        .await
    }

    pub async fn show(&self, path: &str) -> Result<EntryInfo, Error> {
        if self.ctx.is_host && HOST_ONLY_SPECIALS.iter().any(|(n, _)| *n == path) {
            return Ok(unvalued_special(path));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.read(move |tx| {
            Box::pin(async move {
                let id = model::resolve(tx, &ctx, &p).await?;
                let f = model::must_formula(tx, &id).await?;
                let (tid, tf) = settle_target(tx, id).await?;
                let mut detail = entry_detail(&f);
                if tid != id {
                    detail = format!(
                        "resolved to {} ({}, {})",
                        tid.short(),
                        tf.kind.type_name(),
                        entry_detail(&tf)
                    );
                }
                Ok(EntryInfo {
                    name: p.to_string(),
                    id,
                    kind: f.kind.type_name().into(),
                    detail,
                })
            })
        })
        .await
    }

    pub async fn cat(&self, path: &str) -> Result<(ValueKind, Vec<u8>), Error> {
        self.cat_value(path).await.map(|(_, k, d)| (k, d))
    }

    /// What `path` designates, settled, when it is a value: its formula,
    /// kind and bytes.
    pub(crate) async fn cat_value(
        &self,
        path: &str,
    ) -> Result<(FormulaId, ValueKind, Vec<u8>), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        self.read(move |tx| {
            Box::pin(async move {
                let id = model::resolve(tx, &ctx, &p).await?;
                let (tid, f) = settle_target(tx, id).await?;
                match f.kind {
                    FormulaKind::Value(v) => {
                        if let Some(c) = &f.cancelled {
                            return Err(crate::cancel::cancelled_error(&p.to_string(), c, ""));
                        }
                        let data = value_bytes(tx, &tid, &v).await?;
                        Ok((tid, v.kind, data))
                    }
                    FormulaKind::Promise(PromiseRec { state, .. }) => {
                        Err(promise_has_no_value(&p.to_string(), &state))
                    }
                    other => Err(Error::WrongType {
                        name: p.to_string(),
                        expected: "value".into(),
                        actual: other.type_name().into(),
                    }),
                }
            })
        })
        .await
    }

    /// The bytes of value formula `id` (values never change).
    pub(crate) async fn value_by_id(&self, id: FormulaId) -> Result<(ValueKind, Vec<u8>), Error> {
        self.read(move |tx| {
            Box::pin(async move {
                match model::must_formula(tx, &id).await?.kind {
                    FormulaKind::Value(v) => Ok((v.kind, value_bytes(tx, &id, &v).await?)),
                    other => Err(Error::Corrupt(format!(
                        "{} is a {}, not a value",
                        id.short(),
                        other.type_name()
                    ))),
                }
            })
        })
        .await
    }

    pub async fn store(
        &self,
        req: RequestId,
        path: &str,
        kind: ValueKind,
        data: Vec<u8>,
    ) -> Result<FormulaId, Error> {
        let p = Path::parse_writable(path)?;
        if data.len() > MAX_VALUE_BYTES {
            return Err(Error::TooLarge {
                what: "value".into(),
                len: data.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        match kind {
            ValueKind::Text => {
                std::str::from_utf8(&data)
                    .map_err(|e| Error::Invalid(format!("text is not valid UTF-8: {e}")))?;
            }
            ValueKind::Json => {
                serde_json::from_slice::<serde_json::Value>(&data)
                    .map_err(|e| Error::Invalid(format!("invalid JSON: {e}")))?;
            }
            ValueKind::Bytes => {}
        }
        let ctx = self.ctx.clone();
        let data = Arc::new(data);
        let hash = *blake3::hash(&data).as_bytes();
        let id = FormulaId::random();
        self.transact(move |tx| {
            let (ctx, p, data) = (ctx.clone(), p.clone(), data.clone());
            Box::pin(async move {
                // The exactly-once record and, for a name in the agent's own
                // directory, the entry replaced: one round.
                let mut ahead = vec![keys::dedup(&ctx.id, &req)];
                if p.parent().is_empty() {
                    ahead.push(keys::name(&ctx.rec.pet_store, p.last()));
                }
                tx.prefetch(&ahead).await?;
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                let f = Formula {
                    created_ms: now_ms(),
                    cancelled: None,
                    kind: FormulaKind::Value(ValueRec {
                        kind,
                        size: data.len() as u64,
                        hash,
                    }),
                };
                model::put_formula(tx, &id, &f)?;
                capstan_cluster::blob::set_blob(tx, &keys::value(&id), &data).await?;
                model::set_name(tx, &dir, p.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now_ms())?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn remove(&self, req: RequestId, path: &str) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(path)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                    return Ok(());
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                model::remove_name(tx, &dir, p.last())
                    .await?
                    .ok_or_else(|| Error::UnknownName(p.to_string()))?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await
    }

    async fn relink(&self, req: RequestId, from: &str, to: &str, keep: bool) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let src = if keep {
            Path::parse(from)?
        } else {
            Path::parse_writable(from)?
        };
        let dst = Path::parse_writable(to)?;
        self.transact(move |tx| {
            let (ctx, src, dst) = (ctx.clone(), src.clone(), dst.clone());
            Box::pin(async move {
                if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                    return Ok(());
                }
                let id = model::resolve(tx, &ctx, &src).await?;
                let dst_dir = model::parent_dir(tx, &ctx, &dst).await?;
                if !keep {
                    let src_dir = model::parent_dir(tx, &ctx, &src).await?;
                    if src_dir == dst_dir && src.last() == dst.last() {
                        return Ok(());
                    }
                    if model::is_inside(tx, &ctx, &dst, &id).await? {
                        return Err(Error::Invalid(format!(
                            "cannot move {src} into itself ({dst}); nothing was changed"
                        )));
                    }
                    model::remove_name(tx, &src_dir, src.last()).await?;
                }
                model::set_name(tx, &dst_dir, dst.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await
    }

    pub async fn move_name(&self, req: RequestId, from: &str, to: &str) -> Result<(), Error> {
        self.relink(req, from, to, false).await
    }

    pub async fn copy_name(&self, req: RequestId, from: &str, to: &str) -> Result<(), Error> {
        self.relink(req, from, to, true).await
    }

    /// Creates a formula under `path` unless one of the same type is there
    /// already (then answers it: these commands are idempotent).
    async fn make(
        &self,
        req: RequestId,
        path: &str,
        what: &'static str,
    ) -> Result<FormulaId, Error> {
        if what != "directory" && !self.ctx.is_host {
            return Err(Error::Invalid(format!(
                "only a host can make a {what}; a guest has only what it was given"
            )));
        }
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(path)?;
        self.transact(move |tx| {
            let (ctx, p) = (ctx.clone(), p.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                // A cancelled agent makes nothing (read here, so a cancel racing this conflicts).
                if let Some(c) = model::must_formula(tx, &ctx.id).await?.cancelled {
                    return Err(crate::cancel::cancelled_error(
                        "this agent",
                        &c,
                        ": nothing was made",
                    ));
                }
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                if let Some(existing) = model::lookup(tx, &dir, p.last()).await? {
                    let f = model::must_formula(tx, &existing).await?;
                    if f.kind.type_name() == what {
                        return Ok(existing);
                    }
                    return Err(Error::NameTaken(p.to_string()));
                }
                let now = now_ms();
                let id = FormulaId::random();
                let kind = if what == "directory" {
                    FormulaKind::Directory
                } else {
                    let store = FormulaId::random();
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
                        host: Some(ctx.id),
                        label: p.last().to_string(),
                    };
                    if what == "host" {
                        FormulaKind::Host(rec)
                    } else {
                        FormulaKind::Guest(rec)
                    }
                };
                model::put_formula(
                    tx,
                    &id,
                    &Formula {
                        created_ms: now,
                        cancelled: None,
                        kind,
                    },
                )?;
                model::set_name(tx, &dir, p.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now)?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn mkdir(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "directory").await
    }

    pub async fn mkhost(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "host").await
    }

    pub async fn mkguest(&self, req: RequestId, path: &str) -> Result<FormulaId, Error> {
        self.make(req, path, "guest").await
    }

    /// The agent (host or guest) this agent holds under `path`.
    pub async fn agent(&self, path: &str) -> Result<AgentHandle, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse(path)?;
        let id = self
            .rt
            .db
            .read(move |tx| Box::pin(async move { model::resolve(tx, &ctx, &p).await }))
            .await?;
        if id == self.ctx.id {
            return Ok(self.clone());
        }
        if !self.ctx.is_host {
            return Err(Error::Invalid("a guest cannot act as another agent".into()));
        }
        let rec = load_agent(&self.rt.db, id).await.map_err(|e| match e {
            Error::WrongType { actual, .. } => Error::WrongType {
                name: path.to_string(),
                expected: "host or guest".into(),
                actual,
            },
            e => e,
        })?;
        let me = self.ctx.id;
        let (made, cancelled) = self
            .rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let cancelled = model::get_formula(tx, &id).await?.and_then(|f| f.cancelled);
                    Ok::<_, Error>((model::made_by(tx, &id, &me).await?, cancelled))
                })
            })
            .await?;
        if let Some(c) = cancelled {
            return Err(crate::cancel::cancelled_error(path, &c, ": it cannot act"));
        }
        if !made {
            return Err(Error::Invalid(format!(
                "{path} is not an agent you made: you can act only as yourself and the agents you made (and theirs)"
            )));
        }
        Ok(AgentHandle {
            rt: self.rt.clone(),
            ctx: Arc::new(rec),
            fence: None,
            journal: None,
            open: None,
        })
    }

    /// The inbox quota of the agent under `path` (a host's own agents, or
    /// itself), setting it first when `set` is given (`Some(None)`: back to
    /// the defaults). Hosts only. See [`crate::quota`].
    pub async fn quota(
        &self,
        req: RequestId,
        path: &str,
        set: Option<Option<crate::quota::Quota>>,
    ) -> Result<crate::quota::QuotaView, Error> {
        if !self.ctx.is_host {
            return Err(Error::Invalid(
                "only a host can see or set inbox quotas; ask your host".into(),
            ));
        }
        let id = self.agent(path).await?.id();
        if let Some(q) = set {
            let me = self.ctx.id;
            self.transact(move |tx| {
                Box::pin(async move {
                    if checked_dedup(tx, &me, &req).await?.is_some() {
                        return Ok(());
                    }
                    crate::quota::set_limits(tx, &id, q)?;
                    model::dedup_put(tx, &me, &req, DedupAnswer::None, now_ms())?;
                    Ok(())
                })
            })
            .await?;
            if let Some(a) = self.rt.registry.agent(&id) {
                let _ = a.cast(AgentMsg::Freed);
            }
        }
        self.rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let (q, own) = crate::quota::limits(tx, &id).await?;
                    let (messages, bytes) = crate::quota::count(tx, &id).await?;
                    Ok::<_, Error>(crate::quota::QuotaView {
                        agent: id,
                        messages,
                        bytes,
                        limits: q,
                        default: !own,
                    })
                })
            })
            .await
    }

    /// Runs a store transaction as this agent: fenced by the placement
    /// of the agent when the handle acts for a guest's component.
    pub(crate) async fn transact<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send,
        F: for<'t> Fn(
                &'t mut capstan_cluster::Transaction,
            ) -> capstan_cluster::TxFuture<'t, T, Error>
            + Send
            + Sync
            + 'static,
    {
        if let Some(open) = &self.open {
            let r = open.run(|tx| f(tx)).await;
            if let Err(Error::Fenced(why)) = &r
                && let Some(c) = self.rt.cluster.get()
            {
                c.fenced.fetch_add(1, Ordering::Relaxed);
                c.forget_owner(&self.ctx.id);
                tracing::warn!("{why}");
            }
            return r;
        }
        if self.fence.is_none() && self.journal.is_none() {
            return self.rt.db.transact(f).await;
        }
        let (fence, journal) = (self.fence.clone(), self.journal.clone());
        let f = Arc::new(f);
        let r = self
            .rt
            .db
            .transact(move |tx| {
                let (f, fence, journal) = (f.clone(), fence.clone(), journal.clone());
                Box::pin(async move {
                    if let Some(fence) = &fence {
                        fence.check(tx).await?;
                    }
                    let pending = journal.as_ref().and_then(|j| j.pending());
                    let t = f(tx).await?;
                    if let (Some(j), Some((bytes, _))) = (&journal, &pending) {
                        capstan_cluster::blob::set_blob(tx, j.key_bytes(), bytes).await?;
                    }
                    Ok((t, pending.map(|(_, g)| g)))
                })
            })
            .await;
        let r = r.map(|(t, generation)| {
            if let (Some(j), Some(g)) = (&self.journal, generation) {
                j.flushed(g);
            }
            t
        });
        if let Err(Error::Fenced(why)) = &r
            && let Some(c) = self.rt.cluster.get()
        {
            c.fenced.fetch_add(1, Ordering::Relaxed);
            c.forget_owner(&self.ctx.id);
            tracing::warn!("{why}");
        }
        r
    }

    /// A read-only transaction as this agent: inside its runner's batch when
    /// it has one (so that it sees the batch's writes), else on a snapshot.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send,
        F: for<'t> FnOnce(
                &'t mut capstan_cluster::Transaction,
            ) -> capstan_cluster::TxFuture<'t, T, Error>
            + Send,
    {
        match &self.open {
            Some(open) => open.run(f).await,
            None => self.rt.db.read(f).await,
        }
    }

    /// Runs `f` once what this agent wrote has committed: now, or after its
    /// runner's batch commits.
    pub(crate) fn after_commit(&self, f: impl FnOnce() + Send + 'static) {
        match &self.open {
            Some(open) => open.after_commit(f),
            None => f(),
        }
    }

    /// Makes what this agent's handler did so far durable (its batch, with
    /// the handler's journal).
    pub(crate) async fn make_durable(&self) -> Result<(), Error> {
        match &self.open {
            Some(open) => open.flush().await,
            None => {
                self.transact(|_| Box::pin(async { Ok::<_, Error>(()) }))
                    .await
            }
        }
    }

    /// Reserves `n` numbers in `agent`'s inbox, none below `at_least`: at
    /// this node's incarnation, or in a cluster at the owner's (claiming the
    /// inbox for this node when nobody live owns it).
    pub(crate) async fn reserve(
        &self,
        agent: FormulaId,
        n: u64,
        at_least: u64,
    ) -> Result<u64, Error> {
        self.reserve_admitting(agent, n, at_least, None).await
    }

    /// [`reserve`](Self::reserve), first admitting one message of about
    /// `size` bytes under the inbox's quota when a size is given (see
    /// [`crate::quota`]): a full inbox refuses at once.
    pub(crate) async fn reserve_admitting(
        &self,
        agent: FormulaId,
        n: u64,
        at_least: u64,
        size: Option<u64>,
    ) -> Result<u64, Error> {
        let Some(c) = self.rt.cluster.get() else {
            return local_reserve(&self.rt, agent, n, at_least, size).await;
        };
        // Bounded by time rather than a count: a dead owner is waited out
        // (its lease lapses, then this node claims the inbox), which takes
        // up to a lease plus one reservation timeout.
        let deadline =
            tokio::time::Instant::now() + 2 * c.cfg.lease + std::time::Duration::from_secs(3);
        let mut last = None;
        let mut attempt = 0u32;
        while tokio::time::Instant::now() < deadline {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(4))).await;
            }
            attempt += 1;
            match c.owner(&self.rt.db, agent).await? {
                crate::cluster::Owner::Me => {
                    match local_reserve(&self.rt, agent, n, at_least, size).await {
                        Ok(first) => return Ok(first),
                        Err(e @ Error::InboxFull { .. }) => return Err(e),
                        Err(e) => last = Some(e),
                    }
                }
                crate::cluster::Owner::Other(node) => {
                    let (tx, rx) = oneshot::channel();
                    let op = crate::cluster::LinkOp::Reserve {
                        node: node.clone(),
                        agent,
                        count: n.min(u32::MAX as u64) as u32,
                        at_least,
                        quota_bytes: size.unwrap_or(0),
                        reply: tx,
                    };
                    if c.link.send(op).await.is_err() {
                        return Err(Error::Unavailable("the node is shutting down".into()));
                    }
                    // A node that died leaves the call unanswered until its
                    // timeout: stop waiting once its record shows it dead.
                    let answer = tokio::select! {
                        r = rx => r,
                        () = c.until_dead(&self.rt.db, &node) => Ok(Err(Error::Unreachable(format!(
                            "node {} (owner of {}) stopped renewing its lease",
                            node.name,
                            agent.short()
                        )))),
                    };
                    match answer {
                        Ok(Ok(first)) => return Ok(first),
                        Ok(Err(e @ Error::InboxFull { .. })) => return Err(e),
                        Ok(Err(e)) => {
                            tracing::debug!(owner = %node.name, "remote reservation failed: {e}");
                            if matches!(e, Error::Unreachable(_)) {
                                c.forget_owner(&agent);
                                c.await_lapse(&self.rt.db, &node).await?;
                                attempt = 0;
                            }
                            last = Some(e);
                        }
                        Err(_) => {
                            last = Some(Error::Unavailable("the node is shutting down".into()))
                        }
                    }
                }
            }
            c.forget_owner(&agent);
        }
        Err(match last {
            // The owner kept its lease all along (a dead one is waited out
            // and taken over above): this node is cut off from it. Nothing
            // was written yet (numbers are reserved before the message).
            Some(Error::Unreachable(e)) => Error::Unreachable(format!(
                "{e}, but it holds its cluster lease: this node cannot reach it (a network partition?); nothing was sent: retry, or use another node"
            )),
            Some(e) => e,
            None => Error::Unavailable("no owner for the inbox; try again".into()),
        })
    }

    /// Reserves a number in `agent`'s inbox and runs `write` with it (a
    /// transaction that puts a message there), retrying with a fresh number
    /// above one a stale sequence handed out ([`Error::InboxSlotTaken`]: a
    /// cluster node that lost the inbox). Bounded by [`MAX_SLOT_RETRIES`].
    pub(crate) async fn with_fresh_number<T, F, Fut>(
        &self,
        agent: FormulaId,
        write: F,
    ) -> Result<T, Error>
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        self.with_fresh_number_admitting(agent, None, write).await
    }

    /// [`with_fresh_number`](Self::with_fresh_number), first admitting one
    /// message of about `size` bytes under the inbox's quota when a size
    /// is given ([`Error::InboxFull`] otherwise, nothing written).
    pub(crate) async fn with_fresh_number_admitting<T, F, Fut>(
        &self,
        agent: FormulaId,
        size: Option<u64>,
        mut write: F,
    ) -> Result<T, Error>
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut at_least = 0;
        for i in 0..MAX_SLOT_RETRIES {
            let admit = if i == 0 { size } else { None };
            let number = self.reserve_admitting(agent, 1, at_least, admit).await?;
            match write(number).await {
                Err(Error::InboxSlotTaken { number: taken, .. })
                    if taken == number && at_least <= taken =>
                {
                    at_least = taken + 1
                }
                r => return r,
            }
        }
        Err(Error::Unavailable(format!(
            "inbox numbers of {} kept colliding with used ones; try again",
            agent.short()
        )))
    }

    /// Tells the other members of the cluster, if any, that `agent` got
    /// message `m` (carrying it when small: they need not read it back).
    fn broadcast_delivered(&self, agent: FormulaId, m: &MessageRec) {
        if let Some(c) = self.rt.cluster.get() {
            // Only the owner and the members following the inbox: a wake-up
            // for every member would make each node handle the whole
            // cluster's mail, so adding nodes would add work per message.
            let to = c.delivery_targets(&agent).unwrap_or_else(|| c.others());
            if !to.is_empty() {
                c.deliveries_sent
                    .fetch_add(to.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mut record = m.encode();
                if record.len() > crate::cluster::MAX_CARRIED_RECORD {
                    record = Vec::new();
                }
                let _ = c.link.try_send(crate::cluster::LinkOp::Delivered {
                    to,
                    agent,
                    number: m.number,
                    record: Arc::new(record),
                });
            }
        }
    }

    pub(crate) fn notify_delivered(&self, agent: FormulaId, m: MessageRec) {
        self.broadcast_delivered(agent, &m);
        if let Some(a) = self.rt.registry.agent(&agent) {
            let _ = a.cast(AgentMsg::Delivered(m));
        }
    }

    /// Resolves the recipient (an agent) of a message and validates it, and
    /// checks that the references a message will carry resolve — before any
    /// inbox number is reserved, so that a refused message leaves no gap in
    /// the numbering. (The posting transaction resolves them again: a name
    /// removed in between still fails cleanly there.)
    ///
    /// Outside a guest's batch it reads a snapshot for commit (no round trip
    /// for the latest version, see [`capstan_cluster::Store::snapshot_for_commit`]):
    /// then the answer carries the recipient to resolve again in the posting
    /// transaction, whose commit validates it; an error read there is
    /// checked on the latest version before it is returned.
    async fn recipient(
        &self,
        to: &str,
        reply_to: Option<u64>,
        refs: &[Path],
    ) -> Result<Resolved, Error> {
        let to_path = if to.is_empty() {
            None
        } else {
            Some(Path::parse(to)?)
        };
        if to_path.is_none() && reply_to.is_none() {
            return Err(Error::Invalid("a message needs a recipient".into()));
        }
        let spec = Arc::new(Recipient {
            to_path,
            to_name: to.to_string(),
            reply_to,
            refs: refs.to_vec(),
        });
        if self.open.is_none() {
            let (ctx, s) = (self.ctx.clone(), spec.clone());
            let (r, fresh) = self
                .rt
                .db
                .read_for_commit(move |tx| {
                    Box::pin(async move { Ok::<_, Error>(resolve_recipient(tx, &ctx, &s).await) })
                })
                .await?;
            match r {
                Ok((target, reply_id, remote)) => {
                    return Ok(Resolved {
                        target,
                        reply_id,
                        remote,
                        recheck: (!fresh).then_some(spec),
                    });
                }
                Err(e) if fresh => return Err(e),
                Err(_) => {}
            }
        }
        self.recipient_fresh(spec).await
    }

    /// [`recipient`](Self::recipient) on the latest version (or in the
    /// guest's batch).
    async fn recipient_fresh(&self, spec: Arc<Recipient>) -> Result<Resolved, Error> {
        let ctx = self.ctx.clone();
        let (target, reply_id, remote) = self
            .read(move |tx| Box::pin(async move { resolve_recipient(tx, &ctx, &spec).await }))
            .await?;
        Ok(Resolved {
            target,
            reply_id,
            remote,
            recheck: None,
        })
    }

    /// Sends a package; returns its number in the sender's own inbox.
    pub async fn send(
        &self,
        req: RequestId,
        to: &str,
        strings: Vec<String>,
        refs: Vec<RefSpec>,
        reply_to: Option<u64>,
    ) -> Result<u64, Error> {
        if strings.len() != refs.len() + 1 {
            return Err(Error::Invalid(format!(
                "a message has one more text chunk than references; got {} chunks and {} references",
                strings.len(),
                refs.len()
            )));
        }
        if refs.len() > MAX_MESSAGE_REFS {
            return Err(Error::TooLarge {
                what: "references".into(),
                len: refs.len(),
                max: MAX_MESSAGE_REFS,
            });
        }
        let text_len: usize = strings.iter().map(String::len).sum();
        if text_len > MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "message text".into(),
                len: text_len,
                max: MAX_MESSAGE_TEXT,
            });
        }
        let mut paths = Vec::with_capacity(refs.len());
        for r in &refs {
            paths.push(Path::parse(&r.path)?);
            if !crate::names::is_pet_name(&r.edge_name) {
                return Err(Error::InvalidName(r.edge_name.clone()));
            }
        }
        let names: Vec<String> = refs.into_iter().map(|r| r.edge_name).collect();
        let size =
            crate::quota::message_size(text_len, names.iter().map(String::len).sum(), names.len());
        let to_name = to;
        let to = self.recipient(to, reply_to, &paths).await?;
        let (n, _) = self
            .post(req, to, size, move |tx, ctx| {
                let (paths, strings, names, ctx) =
                    (paths.clone(), strings.clone(), names.clone(), ctx.clone());
                Box::pin(async move {
                    let mut ids = Vec::with_capacity(paths.len());
                    for p in &paths {
                        ids.push(resolve_reference(tx, &ctx, p).await?);
                    }
                    Ok((
                        BodyRec::Package {
                            strings,
                            names,
                            ids,
                        },
                        None,
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        Ok(n)
    }

    /// Sends a text package only while the key `alive` exists, checked in
    /// the message's own transaction (a routine's fire: removing the routine
    /// conflicts with a fire in flight, so none lands after the removal).
    pub(crate) async fn send_while(
        &self,
        req: RequestId,
        to: &str,
        text: String,
        alive: Vec<u8>,
    ) -> Result<u64, Error> {
        if text.len() > MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "message text".into(),
                len: text.len(),
                max: MAX_MESSAGE_TEXT,
            });
        }
        let size = crate::quota::message_size(text.len(), 0, 0);
        let to_name = to;
        let to = self.recipient(to, None, &[]).await?;
        let (n, _) = self
            .post(req, to, size, move |tx, _ctx| {
                let (text, alive) = (text.clone(), alive.clone());
                Box::pin(async move {
                    if tx.get(&alive).await?.is_none() {
                        return Err(Error::Invalid("the routine was removed".into()));
                    }
                    Ok((
                        BodyRec::Package {
                            strings: vec![text],
                            names: vec![],
                            ids: vec![],
                        },
                        None,
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        Ok(n)
    }

    /// The common path of send and request: reserve numbers in both inboxes,
    /// then one transaction writes both copies and the exactly-once record.
    /// `size`: about the bytes of the message, admitted under the
    /// recipient's inbox quota by its owner as it reserves the number.
    async fn post<F: PostBody>(
        &self,
        req: RequestId,
        to: Resolved,
        size: u64,
        body: F,
    ) -> Result<(u64, Option<FormulaId>), Error> {
        let body = Arc::new(body);
        let r = match self.post_to(req, &to, size, body.clone()).await {
            // read on an old snapshot, the recipient changed since: resolve
            // it again on the latest version
            Err(Error::RecipientMoved) if let Some(spec) = to.recheck => {
                let to = self.recipient_fresh(spec).await?;
                self.post_to(req, &to, size, body).await
            }
            r => r,
        };
        match r {
            // a retry of a send that was applied before the inbox filled up
            Err(e @ Error::InboxFull { .. }) => {
                let me = self.ctx.id;
                let earlier = self
                    .read(move |tx| Box::pin(async move { model::dedup_get(tx, &me, &req).await }))
                    .await?;
                match earlier {
                    Some(DedupAnswer::Number(n)) => Ok((n, None)),
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    async fn post_to<F: PostBody>(
        &self,
        req: RequestId,
        to: &Resolved,
        size: u64,
        body: Arc<F>,
    ) -> Result<(u64, Option<FormulaId>), Error> {
        let (target, reply_id, recheck) = (to.target, to.reply_id, to.recheck.clone());
        let remote = to.remote.clone();
        let me = self.ctx.id;
        let remote_target = remote.is_some();
        let remote = Arc::new(remote);
        let message_id = RequestId::random();
        let date_ms = now_ms();
        // Numbers from a stale sequence (a cluster node that lost the inbox)
        // are refused by the store; retry with fresh ones above them.
        let (mut own_min, mut their_min) = (0, 0);
        let mut tries = 0;
        let result = loop {
            tries += 1;
            if tries > MAX_SLOT_RETRIES {
                return Err(Error::Unavailable(
                    "inbox numbers kept colliding with used ones; try again".into(),
                ));
            }
            // The recipient's number first: its owner may refuse (a full
            // inbox, see crate::quota) before anything is reserved here.
            let theirs = if target == me || remote_target {
                None
            } else {
                Some(
                    self.reserve_admitting(target, 1, their_min, Some(size))
                        .await?,
                )
            };
            let own = self.reserve(me, 1, own_min).await?;
            let theirs = theirs.unwrap_or(own);
            let ctx = self.ctx.clone();
            let (body, remote, recheck) = (body.clone(), remote.clone(), recheck.clone());
            let r = self
                .transact(move |tx| {
                    let (ctx, body, remote, recheck) =
                        (ctx.clone(), body.clone(), remote.clone(), recheck.clone());
                    Box::pin(async move {
                        // A fresh request id and freshly reserved inbox slots
                        // are absent: on a first, possibly stale attempt they
                        // are checked by the commit instead of read (a retry,
                        // or a slot a stale sequence handed out, conflicts,
                        // and the attempt after reads them).
                        tx.expect_absent(&keys::dedup(&ctx.id, &req));
                        tx.expect_absent(&keys::message(&ctx.id, own));
                        if target != ctx.id && remote.is_none() {
                            tx.expect_absent(&keys::message(&target, theirs));
                        }
                        // Everything this transaction reads for sure, in one
                        // round (with what the recipient's check reads).
                        let mut ahead = vec![
                            keys::dedup(&ctx.id, &req),
                            keys::inbox_mark(&ctx.id),
                            keys::message(&ctx.id, own),
                        ];
                        if target != ctx.id && remote.is_none() {
                            ahead.push(keys::inbox_mark(&target));
                            ahead.push(keys::message(&target, theirs));
                        }
                        if let Some(r) = &recheck {
                            ahead.extend(recipient_keys(&ctx, r, &target));
                        }
                        tx.prefetch(&ahead).await?;
                        if let Some(r) = &recheck {
                            match resolve_recipient(tx, &ctx, r).await {
                                Ok((t, _, _)) if t == target => {}
                                Err(e @ Error::Store(_)) => return Err(e),
                                _ => return Err(Error::RecipientMoved),
                            }
                        }
                        match checked_dedup(tx, &ctx.id, &req).await? {
                            Some(DedupAnswer::Number(n)) => return Ok((n, None, None)),
                            Some(_) => {
                                return Err(Error::Invalid(
                                    "request id reused for another operation".into(),
                                ));
                            }
                            None => {}
                        }
                        let (b, created) = body(tx, &ctx).await?;
                        let mine = MessageRec {
                            number: own,
                            message_id,
                            reply_to: reply_id,
                            from: ctx.id,
                            to: target,
                            date_ms,
                            body: b,
                        };
                        model::put_message(tx, &ctx.id, &mine).await?;
                        if let Some(to) = remote.as_ref() {
                            let env = crate::federation::envelope_of(tx, &mine).await?;
                            crate::federation::enqueue(
                                tx,
                                &crate::federation::OutboxItem {
                                    id: RequestId::random(),
                                    sender: ctx.id,
                                    peer: target,
                                    to: to.clone(),
                                    created_us: crate::federation::now_us(),
                                    op: crate::federation::OutOp::Deliver(env),
                                },
                            )?;
                            model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Number(own), date_ms)?;
                            return Ok((own, created, Some((mine, None))));
                        }
                        let copy = (target != ctx.id).then(|| MessageRec {
                            number: theirs,
                            ..mine.clone()
                        });
                        if let Some(c) = &copy {
                            model::put_message(tx, &target, c).await?;
                        }
                        model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Number(own), date_ms)?;
                        Ok((own, created, Some((mine, copy))))
                    })
                })
                .await;
            match r {
                Err(Error::InboxSlotTaken { number, .. }) if number == own && own_min <= number => {
                    own_min = number + 1
                }
                Err(Error::InboxSlotTaken { number, .. })
                    if number == theirs && their_min <= number =>
                {
                    their_min = number + 1
                }
                r => break r?,
            }
        };
        let (n, created, delivered) = result;
        if let (Some(open), Some(_)) = (&self.open, &delivered) {
            open.own_copy(n);
        }
        if let Some((mine, copy)) = delivered {
            let me_h = self.clone();
            self.after_commit(move || {
                if remote_target {
                    me_h.rt.outbox.notify_one();
                }
                me_h.notify_delivered(me, mine);
                if let Some(c) = copy {
                    me_h.notify_delivered(target, c);
                }
            });
        }
        Ok((n, created))
    }

    /// Sends a request; returns its number in the sender's own inbox and the promise id.
    pub async fn request(
        &self,
        req: RequestId,
        to: &str,
        description: &str,
        result_name: Option<&str>,
    ) -> Result<(u64, FormulaId), Error> {
        if description.len() > MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "description".into(),
                len: description.len(),
                max: MAX_MESSAGE_TEXT,
            });
        }
        let result_path = result_name
            .filter(|s| !s.is_empty())
            .map(Path::parse_writable)
            .transpose()?;
        let size = crate::quota::message_size(description.len(), 0, 1);
        let to_name = to;
        let to = self.recipient(to, None, &[]).await?;
        let description = description.to_string();
        let promise = FormulaId::random();
        let (n, created) = self
            .post(req, to, size, move |tx, ctx| {
                let (ctx, description, result_path) =
                    (ctx.clone(), description.clone(), result_path.clone());
                Box::pin(async move {
                    let f = Formula {
                        created_ms: now_ms(),
                        cancelled: None,
                        kind: FormulaKind::Promise(PromiseRec {
                            description: description.clone(),
                            requester: ctx.id,
                            state: PromiseState::Pending,
                            resolver: None,
                        }),
                    };
                    model::put_formula(tx, &promise, &f)?;
                    if let Some(p) = &result_path {
                        let dir = model::parent_dir(tx, &ctx, p).await?;
                        model::set_name(tx, &dir, p.last(), &promise).await?;
                    }
                    Ok((
                        BodyRec::Request {
                            description,
                            promise,
                        },
                        Some(promise),
                    ))
                })
            })
            .await
            .map_err(|e| crate::quota::named(e, to_name))?;
        match created {
            Some(p) => Ok((n, p)),
            // a retry of a request that was already applied: find its promise
            None => {
                let me = self.ctx.id;
                let m = self
                    .rt
                    .db
                    .read(move |tx| Box::pin(async move { model::get_message(tx, &me, n).await }))
                    .await?;
                match m.body {
                    BodyRec::Request { promise, .. } => Ok((n, promise)),
                    _ => Err(Error::Invalid(
                        "request id reused for another operation".into(),
                    )),
                }
            }
        }
    }

    /// The promise of request `number` in this inbox.
    async fn promise_of(&self, number: u64) -> Result<(MessageRec, FormulaId), Error> {
        let me = self.ctx.id;
        let m = self
            .rt
            .db
            .read(move |tx| Box::pin(async move { model::get_message(tx, &me, number).await }))
            .await?;
        let promise = model::promise_of_request(&m)?;
        Ok((m, promise))
    }

    /// Waits until the promise of request `number` (in this inbox) settles.
    pub async fn wait_request(&self, number: u64) -> Result<PromiseState, Error> {
        // One read for the request and its promise: a settled one answers
        // at once, without incarnating anything.
        let me = self.ctx.id;
        let (promise, state) = self
            .rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let m = model::get_message(tx, &me, number).await?;
                    let promise = model::promise_of_request(&m)?;
                    Ok::<_, Error>((promise, model::promise_state(tx, &promise).await?))
                })
            })
            .await?;
        if state != PromiseState::Pending {
            return Ok(state);
        }
        for _ in 0..3 {
            let a = incarnation::promise_actor(&self.rt, promise).await?;
            let (tx, rx) = oneshot::channel();
            if a.cast(PromiseMsg::Wait(tx)).is_err() {
                tokio::task::yield_now().await;
                continue;
            }
            match rx.await {
                Ok(r) => return r,
                Err(_) => {
                    if self.rt.closed.load(Ordering::Acquire) {
                        return Err(Error::Unavailable("the node is shutting down".into()));
                    }
                }
            }
        }
        Err(Error::Unavailable(
            "the request's incarnation keeps stopping; try again".into(),
        ))
    }

    async fn settle(
        &self,
        req: RequestId,
        number: u64,
        outcome: Result<Path, String>,
    ) -> Result<(), Error> {
        let (m, promise) = self.promise_of(number).await?;
        if m.from == self.ctx.id {
            return Err(Error::Invalid(format!(
                "message {number} is your own request; only its recipient can answer it"
            )));
        }
        let ctx = self.ctx.clone();
        let state = self
            .transact(move |tx| {
                let (ctx, outcome) = (ctx.clone(), outcome.clone());
                Box::pin(async move {
                    tx.prefetch(&[keys::dedup(&ctx.id, &req), keys::formula(&promise)])
                        .await?;
                    if checked_dedup(tx, &ctx.id, &req).await?.is_some() {
                        return Ok(None);
                    }
                    let mut f = model::must_formula(tx, &promise).await?;
                    let FormulaKind::Promise(p) = &mut f.kind else {
                        return Err(Error::Corrupt("request without a promise".into()));
                    };
                    if p.state != PromiseState::Pending {
                        return Err(Error::AlreadySettled(number));
                    }
                    p.state = match outcome {
                        Ok(path) => PromiseState::Resolved(model::resolve(tx, &ctx, &path).await?),
                        Err(reason) => PromiseState::Rejected(reason),
                    };
                    let state = p.state.clone();
                    if let PromiseState::Resolved(t) = &state {
                        model::note_ref(tx, t).await?;
                    }
                    let answer = match (&p.resolver, &state) {
                        (Some(to), PromiseState::Resolved(id)) => Some((
                            to.clone(),
                            p.requester,
                            crate::federation::Settlement::Resolved(
                                crate::federation::wire_ref(tx, id).await?,
                            ),
                        )),
                        (Some(to), PromiseState::Rejected(why)) => Some((
                            to.clone(),
                            p.requester,
                            crate::federation::Settlement::Rejected(why.clone()),
                        )),
                        _ => None,
                    };
                    model::put_formula(tx, &promise, &f)?;
                    if let Some((to, peer, s)) = answer {
                        crate::federation::enqueue(
                            tx,
                            &crate::federation::OutboxItem {
                                id: RequestId::random(),
                                sender: ctx.id,
                                peer,
                                to,
                                created_us: crate::federation::now_us(),
                                op: crate::federation::OutOp::Settle(s),
                            },
                        )?;
                    }
                    model::dedup_put(tx, &ctx.id, &req, DedupAnswer::None, now_ms())?;
                    Ok(Some(state))
                })
            })
            .await?;
        if state.is_some() {
            self.rt.outbox.notify_one();
        }
        if let Some(state) = state {
            notify_settled(&self.rt, promise, state);
        }
        Ok(())
    }

    pub async fn resolve(&self, req: RequestId, number: u64, path: &str) -> Result<(), Error> {
        let p = Path::parse(path)?;
        self.settle(req, number, Ok(p)).await
    }

    pub async fn reject(&self, req: RequestId, number: u64, reason: &str) -> Result<(), Error> {
        if reason.len() > MAX_MESSAGE_TEXT {
            return Err(Error::TooLarge {
                what: "reason".into(),
                len: reason.len(),
                max: MAX_MESSAGE_TEXT,
            });
        }
        let reason = if reason.is_empty() {
            NO_REASON.to_string()
        } else {
            reason.to_string()
        };
        self.settle(req, number, Err(reason)).await
    }

    pub async fn adopt(
        &self,
        req: RequestId,
        number: u64,
        edge_name: &str,
        path: &str,
    ) -> Result<FormulaId, Error> {
        let ctx = self.ctx.clone();
        let p = Path::parse_writable(if path.is_empty() { edge_name } else { path })?;
        let edge = edge_name.to_string();
        self.transact(move |tx| {
            let (ctx, p, edge) = (ctx.clone(), p.clone(), edge.clone());
            Box::pin(async move {
                if let Some(DedupAnswer::Id(prev)) = checked_dedup(tx, &ctx.id, &req).await? {
                    return Ok(prev);
                }
                let m = model::get_message(tx, &ctx.id, number).await?;
                let BodyRec::Package { names, ids, .. } = &m.body else {
                    return Err(Error::WrongMessage {
                        number,
                        expected: "package".into(),
                        actual: m.body.type_name().into(),
                    });
                };
                let i = names.iter().position(|n| *n == edge).ok_or_else(|| {
                    Error::Invalid(format!(
                        "message {number} has no reference named {edge:?}; it has: {}",
                        names.join(", ")
                    ))
                })?;
                let id = ids[i];
                let dir = model::parent_dir(tx, &ctx, &p).await?;
                model::set_name(tx, &dir, p.last(), &id).await?;
                model::dedup_put(tx, &ctx.id, &req, DedupAnswer::Id(id), now_ms())?;
                Ok(id)
            })
        })
        .await
    }

    pub async fn dismiss(&self, req: RequestId, number: u64) -> Result<(), Error> {
        let me = self.ctx.id;
        self.transact(move |tx| {
            Box::pin(async move {
                if checked_dedup(tx, &me, &req).await?.is_some() {
                    return Ok(());
                }
                model::get_message(tx, &me, number).await?;
                model::raise_inbox_mark(tx, &me, number).await?;
                tx.clear(&keys::message(&me, number));
                model::dedup_put(tx, &me, &req, DedupAnswer::None, now_ms())?;
                Ok(())
            })
        })
        .await?;
        // room given back: the owner, if here, recounts at its next refusal
        if let Some(a) = self.rt.registry.agent(&me) {
            let _ = a.cast(AgentMsg::Freed);
        }
        Ok(())
    }

    /// The first [`DEFAULT_INBOX_PAGE`] messages (of the thread, if one is
    /// named); see [`inbox_page`](Self::inbox_page) for the rest.
    pub async fn inbox(&self, thread: Option<RequestId>) -> Result<Vec<MessageView>, Error> {
        Ok(self.inbox_page(thread, 0, DEFAULT_INBOX_PAGE).await?.0)
    }

    /// At most `limit` (1 to [`MAX_INBOX_PAGE`]) messages numbered `from` or
    /// above, in number order, and whether more follow. Without a thread it
    /// is one bounded range read; with one, the inbox is scanned a page at a
    /// time (a thread's members are found by following replies).
    pub async fn inbox_page(
        &self,
        thread: Option<RequestId>,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<MessageView>, bool), Error> {
        if limit == 0 || limit > MAX_INBOX_PAGE {
            return Err(Error::Invalid(format!(
                "the inbox page size must be from 1 to {MAX_INBOX_PAGE} messages; got {limit}"
            )));
        }
        let ctx = self.ctx.clone();
        self.rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let mut page = match thread {
                        None => model::list_messages_page(tx, &ctx.id, from, limit + 1).await?,
                        Some(t) => thread_page(tx, &ctx.id, t, from, limit + 1).await?,
                    };
                    let more = page.len() > limit;
                    page.truncate(limit);
                    let mut out = Vec::with_capacity(page.len());
                    let mut names = std::collections::HashMap::new();
                    for m in page {
                        out.push(view(tx, &ctx, m, &mut names).await?);
                    }
                    Ok((out, more))
                })
            })
            .await
    }

    /// Every message numbered >= `after`: existing ones first, then new ones as they
    /// commit. The channel is bounded; a follower too slow to keep up is dropped.
    pub async fn follow(&self, after: u64) -> Result<mpsc::Receiver<MessageView>, Error> {
        let (live_tx, mut live_rx) = mpsc::channel(incarnation::FOLLOWER_BUFFER);
        let a = incarnation::agent_actor(&self.rt, self.ctx.id).await?;
        match a.call(|port| AgentMsg::Follow(live_tx, port), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => {
                return Err(Error::Unavailable(
                    "the inbox actor stopped; try again".into(),
                ));
            }
        }
        let (out_tx, out_rx) = mpsc::channel(256);
        let ctx = self.ctx.clone();
        let db = self.rt.db.clone();
        tokio::spawn(async move {
            // The history a page at a time (bounded memory); the numbers
            // seen are kept to skip their live copies.
            let mut seen = std::collections::HashSet::new();
            let mut from = Some(after);
            while let Some(f) = from {
                let c = ctx.clone();
                let page = db
                    .read(move |tx| {
                        Box::pin(async move {
                            let ms =
                                model::list_messages_page(tx, &c.id, f, INBOX_SCAN_PAGE).await?;
                            let mut names = std::collections::HashMap::new();
                            let mut out = Vec::with_capacity(ms.len());
                            for m in ms {
                                out.push(view(tx, &c, m, &mut names).await?);
                            }
                            Ok::<_, Error>(out)
                        })
                    })
                    .await;
                let Ok(page) = page else { return };
                from = if page.len() == INBOX_SCAN_PAGE {
                    page.last().and_then(|m| m.number.checked_add(1))
                } else {
                    None
                };
                for m in page {
                    seen.insert(m.number);
                    if out_tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
            // Live messages as they are pushed, and now and then a look in
            // the store for what a push missed (a wake-up dropped, or sent
            // before the inbox's owner knew of this follower: wake-ups go
            // only to the members following an inbox). See rules::follow.
            let mut cursor = crate::rules::follow::FollowCursor::new(after);
            for n in seen {
                cursor.accept(n);
            }
            let mut last_look = tokio::time::Instant::now();
            loop {
                let next_look = last_look + FOLLOW_RECHECK;
                let batch = match tokio::time::timeout_at(next_look, live_rx.recv()).await {
                    Ok(Some(m)) => vec![m],
                    Ok(None) => return,
                    Err(_) => Vec::new(),
                };
                let look = tokio::time::Instant::now() >= next_look;
                let batch = if look {
                    last_look = tokio::time::Instant::now();
                    let (c, from) = (ctx.clone(), cursor.look_from());
                    let page = db
                        .read(move |tx| {
                            Box::pin(async move {
                                model::list_messages_page(tx, &c.id, from, INBOX_SCAN_PAGE).await
                            })
                        })
                        .await;
                    match page {
                        Ok(mut ms) => {
                            ms.extend(batch);
                            ms
                        }
                        Err(e) => {
                            tracing::debug!("follower's look at the store failed: {e}");
                            batch
                        }
                    }
                } else {
                    batch
                };
                for m in batch {
                    if !cursor.accept(m.number) {
                        continue;
                    }
                    let c = ctx.clone();
                    let v = db
                        .read(move |tx| {
                            Box::pin(async move {
                                let mut names = std::collections::HashMap::new();
                                view(tx, &c, m, &mut names).await
                            })
                        })
                        .await;
                    match v {
                        Ok(v) => {
                            if out_tx.send(v).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("follower stopped: {e}");
                            return;
                        }
                    }
                }
                if look {
                    cursor.looked();
                }
            }
        });
        Ok(out_rx)
    }
}

/// Renders a message for the acting agent.
async fn view(
    tx: &mut capstan_cluster::Transaction,
    ctx: &Ctx,
    m: MessageRec,
    names: &mut std::collections::HashMap<FormulaId, String>,
) -> Result<MessageView, Error> {
    for id in [m.from, m.to] {
        if let std::collections::hash_map::Entry::Vacant(e) = names.entry(id) {
            e.insert(model::name_for(tx, ctx, &id).await?);
        }
    }
    let body = match m.body {
        BodyRec::Package { strings, names, .. } => MessageBodyView::Package { strings, names },
        BodyRec::Request {
            description,
            promise,
        } => {
            let state = match model::get_formula(tx, &promise).await? {
                Some(Formula {
                    kind: FormulaKind::Promise(p),
                    ..
                }) => p.state,
                _ => PromiseState::Rejected("the request's promise is gone".into()),
            };
            MessageBodyView::Request { description, state }
        }
    };
    Ok(MessageView {
        number: m.number,
        message_id: m.message_id,
        reply_to: m.reply_to,
        from: names[&m.from].clone(),
        to: names[&m.to].clone(),
        date_ms: m.date_ms,
        body,
    })
}

/// At most `limit` messages numbered `from` or above of the thread of `root`
/// (the message `root` and, transitively, the replies to its members).
/// Passes over the inbox a page at a time until a pass adds no member: the
/// messages kept in that pass are the answer.
async fn thread_page(
    tx: &mut capstan_cluster::Transaction,
    agent: &FormulaId,
    root: RequestId,
    from: u64,
    limit: usize,
) -> Result<Vec<crate::records::MessageRec>, Error> {
    let mut members: std::collections::HashSet<RequestId> = [root].into();
    loop {
        let before = members.len();
        let mut out = Vec::new();
        let mut next = Some(0u64);
        while let Some(n) = next {
            let ms = model::list_messages_page(tx, agent, n, INBOX_SCAN_PAGE).await?;
            next = if ms.len() == INBOX_SCAN_PAGE {
                ms.last().and_then(|m| m.number.checked_add(1))
            } else {
                None
            };
            for m in ms {
                if m.reply_to.is_some_and(|r| members.contains(&r)) {
                    members.insert(m.message_id);
                }
                if m.number >= from && out.len() < limit && members.contains(&m.message_id) {
                    out.push(m);
                }
            }
        }
        if members.len() == before {
            return Ok(out);
        }
    }
}
