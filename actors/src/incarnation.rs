//! Incarnations: the live actors made from formulas, on demand.
//!
//! ```text
//! Runtime (one per node)
//! ├── AgentActor   one per agent with recent mail activity: sequences its
//! │                inbox numbers, fans committed messages out to followers
//! └── PromiseActor one per awaited request: holds waiters until it settles
//! ```
//!
//! State lives in the store, not in the actors: an actor rebuilds what it
//! needs from the store in `pre_start` (reincarnation after a restart is the
//! same code path as first incarnation), and stops itself when it has been
//! idle for `RuntimeOptions::idle_timeout` with nobody waiting on it
//! (passivation). Every state change is a store transaction made by the
//! caller; actors only sequence and notify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_proto::FormulaId;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::model;
use crate::node::Runtime;
use crate::records::MessageRec;
use crate::registry::{AgentMsg, PromiseMsg};
use crate::types::PromiseState;

/// Most followers per inbox.
pub const MAX_FOLLOWERS: usize = 64;
/// Most waiters per promise.
pub const MAX_WAITERS: usize = 1024;
/// Messages buffered per follower before it is dropped as too slow.
pub const FOLLOWER_BUFFER: usize = 1024;

pub(crate) struct AgentActor;

pub(crate) struct AgentArgs {
    pub rt: Arc<crate::node::Inner>,
    pub id: FormulaId,
    /// Whether this incarnation owns the formula (always, outside a
    /// cluster); an incarnation that does not only serves followers.
    pub owned: bool,
}

pub(crate) struct AgentState {
    rt: Arc<crate::node::Inner>,
    id: FormulaId,
    next: u64,
    owned: bool,
    followers: Vec<mpsc::Sender<MessageRec>>,
    last_active: Instant,
    _ticker: tokio::task::JoinHandle<()>,
    /// For a guest whose body is a component: its runner.
    guest: Option<crate::node::GuestRunner>,
    /// The runner failed to start (a store read failed, as during an etcd
    /// leader change): started again at the next message or tick, and
    /// woken meanwhile as a runner would be.
    guest_failed: bool,
    /// The inbox's use against its quota (kept while this owns it).
    account: crate::quota::Account,
    /// A count of the inbox runs in a task of its own (`AgentMsg::Counted`
    /// answers it): admissions wait in `waiting` meanwhile, while
    /// reservations that admit nothing go on being served.
    counting: bool,
    /// Admitting reservations waiting for the count, in arrival order (at
    /// most [`MAX_WAITING_ADMISSIONS`]).
    waiting: std::collections::VecDeque<WaitingAdmission>,
    /// When the owner was last told again after a missed push (at most
    /// once per [`RETELL_AFTER_MISS`]).
    retold: Option<Instant>,
    /// What this incarnation last told the membership: whether, as the
    /// owner, it needs no wake-ups (see [`note_wakes`]).
    quiet: Option<bool>,
    /// Its placement's release, begun as it is passivated (before it
    /// leaves the registry), finished after it stopped (`post_stop`).
    release: Option<crate::cluster::ReleaseGuard>,
}

/// Admitting reservations an inbox's owner holds while it counts the
/// inbox; more are refused ("try again").
pub const MAX_WAITING_ADMISSIONS: usize = 4096;

/// A reservation that admits, waiting for the count of its inbox.
pub(crate) struct WaitingAdmission {
    n: u64,
    at_least: u64,
    admit: crate::types::Admit,
    reply: ractor::RpcReplyPort<Result<u64, Error>>,
}

/// Hands out `n` numbers, none below `at_least`, recording an admission.
fn hand_out(st: &mut AgentState, n: u64, at_least: u64, admit: Option<crate::types::Admit>) -> u64 {
    st.next = st.next.max(at_least);
    let first = st.next;
    st.next += n;
    if let Some(admit) = admit {
        st.account.handed_out(first, n, admit);
    }
    first
}

/// Least time between two tellings of the owner caused by missed pushes.
const RETELL_AFTER_MISS: Duration = Duration::from_millis(500);

/// Tells the membership, when it changed, whether this incarnation as the
/// owner needs no wake-ups for messages other members commit to its inbox
/// (it runs no guest and has no follower here), so that it says so with
/// the numbers it hands out (`cluster::NO_WAKE`). A follower that starts
/// here after a sender learned that misses those senders' pushes until
/// their next reservation, and finds those messages by its looks, as a
/// follower whose owner was not told yet does.
fn note_wakes(st: &mut AgentState) {
    let quiet = st.owned && st.guest.is_none() && !st.guest_failed && st.followers.is_empty();
    if st.quiet != Some(quiet) {
        if let Some(c) = st.rt.cluster.get() {
            c.set_needs_wakes(st.id, !quiet);
        }
        st.quiet = Some(quiet);
    }
}

/// In a cluster, tells the owner of this agent's inbox (when another node)
/// that this node has followers of it, so that senders wake this node too
/// (`LinkOp::Interest`; renewed at every tick while followers last), or,
/// `gone`, that the last of them ended. In the background: the owner is
/// looked up in the store.
fn tell_owner_of_followers(st: &AgentState, gone: bool) {
    if st.owned {
        return;
    }
    let Some(c) = st.rt.cluster.get().cloned() else {
        return;
    };
    let (db, agent) = (st.rt.db.clone(), st.id);
    // numbered now: the calls may overtake each other from here on
    let seq = c.next_interest_seq();
    tokio::spawn(async move {
        match c.peek_owner(&db, agent).await {
            Ok(Some(node)) => {
                let _ = c.link.try_send(crate::cluster::LinkOp::Interest {
                    node,
                    agent,
                    gone,
                    seq,
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(agent = %agent.short(), "owner lookup for followers failed: {e}")
            }
        }
    });
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        let id = args.id;
        let next = if args.owned {
            read_next(&args.rt, id).await?
        } else {
            0
        };
        let tick = (args.rt.opts.idle_timeout / 2).max(Duration::from_millis(50));
        let ticker = myself.send_interval(tick, || AgentMsg::Tick);
        tracing::debug!(agent = %id.short(), next, owned = args.owned, "incarnated agent");
        let (guest, guest_failed) = if args.owned {
            start_guest(&args.rt, id).await
        } else {
            (None, false)
        };
        let mut st = AgentState {
            guest,
            guest_failed,
            rt: args.rt,
            id,
            next,
            owned: args.owned,
            followers: Vec::new(),
            last_active: Instant::now(),
            _ticker: ticker,
            account: crate::quota::Account::default(),
            counting: false,
            waiting: std::collections::VecDeque::new(),
            retold: None,
            quiet: None,
            release: None,
        };
        note_wakes(&mut st);
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        st: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Reserve(n, at_least, admit, reply) => {
                if !st.owned {
                    let _ = reply.send(Err(Error::Unavailable(
                        "this node does not own the inbox".into(),
                    )));
                    return Ok(());
                }
                st.last_active = Instant::now();
                if let Some(admit) = admit {
                    // A count reads the whole inbox: in a task of its own,
                    // so that reservations admitting nothing (senders' own
                    // copies, numbers the relay fills in) are served
                    // meanwhile; admissions wait for it, in order.
                    if st.counting || st.account.needs_count(admit) {
                        if st.waiting.len() >= MAX_WAITING_ADMISSIONS {
                            let _ = reply.send(Err(Error::Unavailable(format!(
                                "the inbox of {} is being counted for its quota; try again",
                                st.id.short()
                            ))));
                            return Ok(());
                        }
                        st.waiting.push_back(WaitingAdmission {
                            n,
                            at_least,
                            admit,
                            reply,
                        });
                        if !st.counting {
                            st.counting = true;
                            st.account.begin_count();
                            let (db, id, me) = (st.rt.db.clone(), st.id, myself.clone());
                            tokio::spawn(async move {
                                let c = crate::quota::Account::read_count(&db, id).await;
                                let _ = me.cast(AgentMsg::Counted(c));
                            });
                        }
                        return Ok(());
                    }
                    if let Err(e) = st.account.take(&st.id, admit) {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                }
                let first = hand_out(st, n, at_least, admit);
                let _ = reply.send(Ok(first));
            }
            AgentMsg::Counted(c) => {
                st.counting = false;
                let waiting = std::mem::take(&mut st.waiting);
                let mut counted = match c {
                    Ok(c) => Some(c),
                    Err(e) => {
                        for w in waiting {
                            let _ = w.reply.send(Err(e.clone()));
                        }
                        return Ok(());
                    }
                };
                for w in waiting {
                    if !st.owned {
                        let _ = w.reply.send(Err(Error::Unavailable(
                            "this node does not own the inbox".into(),
                        )));
                        continue;
                    }
                    if let Some(c) = counted.take() {
                        st.account.install(c, w.admit);
                    }
                    match st.account.take(&st.id, w.admit) {
                        Ok(()) => {
                            let first = hand_out(st, w.n, w.at_least, Some(w.admit));
                            let _ = w.reply.send(Ok(first));
                        }
                        Err(e) => {
                            let _ = w.reply.send(Err(e));
                        }
                    }
                }
            }
            AgentMsg::Own(reply) => {
                if !st.owned {
                    match read_next(&st.rt, st.id).await {
                        Ok(n) => {
                            st.next = n;
                            st.owned = true;
                            (st.guest, st.guest_failed) = start_guest(&st.rt, st.id).await;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Ok(());
                        }
                    }
                }
                let _ = reply.send(Ok(()));
            }
            AgentMsg::Delivered(m) => {
                if st.guest_failed && m.from != st.id {
                    retry_guest(st).await;
                }
                if let Some(g) = &st.guest
                    && m.from != st.id
                {
                    st.last_active = Instant::now();
                    g.kick();
                }
                let had = !st.followers.is_empty();
                st.followers.retain(|f| match f.try_send(m.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(agent = %st.id.short(), "dropping a follower that fell {FOLLOWER_BUFFER} messages behind");
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
                if had && st.followers.is_empty() {
                    // the last follower ended: stop the wake-ups for it
                    tell_owner_of_followers(st, true);
                }
            }
            AgentMsg::Follow(tx, reply) => {
                st.last_active = Instant::now();
                st.followers.retain(|f| !f.is_closed());
                if st.followers.len() >= MAX_FOLLOWERS {
                    let _ = reply.send(Err(Error::Unavailable(format!(
                        "this inbox already has {MAX_FOLLOWERS} followers; stop one first"
                    ))));
                } else {
                    st.followers.push(tx);
                    let _ = reply.send(Ok(()));
                    tell_owner_of_followers(st, false);
                }
            }
            AgentMsg::MissedPush => {
                let now = Instant::now();
                if !st.followers.is_empty()
                    && st
                        .retold
                        .is_none_or(|t| now.duration_since(t) >= RETELL_AFTER_MISS)
                {
                    st.retold = Some(now);
                    // the cached owner may be the stale part
                    if let Some(c) = st.rt.cluster.get() {
                        c.forget_owner(&st.id);
                    }
                    tell_owner_of_followers(st, false);
                }
            }
            AgentMsg::Freed => st.account.note_freed(),
            AgentMsg::Tick => {
                if st.owned && st.account.counted() {
                    let (db, id) = (st.rt.db.clone(), st.id);
                    match db
                        .read(move |tx| {
                            Box::pin(async move { crate::quota::limits(tx, &id).await })
                        })
                        .await
                    {
                        Ok((q, _)) => st.account.set_limits(q),
                        Err(e) => tracing::debug!(agent = %id.short(), "quota not read: {e}"),
                    }
                }
                let had = !st.followers.is_empty();
                st.followers.retain(|f| !f.is_closed());
                if !st.followers.is_empty() {
                    tell_owner_of_followers(st, false);
                } else if had {
                    tell_owner_of_followers(st, true);
                }
                if st.guest_failed {
                    retry_guest(st).await;
                }
                // a channel guest stays incarnated: it polls the outside
                // system; and a guest handling mail is not idle, however
                // long its handler takes (stopped, its next commit would be
                // fenced, and the message handled again from the start)
                if st.guest.as_ref().is_some_and(|g| g.busy()) {
                    st.last_active = Instant::now();
                }
                let pinned = st.guest.as_ref().is_some_and(|g| g.pinned());
                if !pinned
                    && st.followers.is_empty()
                    && st.last_active.elapsed() >= st.rt.opts.idle_timeout
                {
                    tracing::debug!(agent = %st.id.short(), "passivating idle agent");
                    // (the release begins before the registry forgets this
                    // incarnation: a message arriving now waits for it)
                    if st.owned
                        && let Some(c) = st.rt.cluster.get()
                        && c.serving()
                    {
                        st.release = Some(c.begin_release(st.id));
                    }
                    unregister(&st.rt.registry.agents, &st.id, &myself);
                    myself.stop(None);
                }
            }
        }
        note_wakes(st);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<AgentMsg>,
        st: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        st._ticker.abort();
        unregister(&st.rt.registry.agents, &st.id, &myself);
        if st.quiet == Some(true)
            && let Some(c) = st.rt.cluster.get()
        {
            c.set_needs_wakes(st.id, true);
        }
        if st.owned
            && let Some(c) = st.rt.cluster.get().cloned()
        {
            // Give the placement up so that the next caller's node claims it
            // at once (a stopped owner's placement would otherwise hold until
            // its lease lapsed). Not on a lost lease: then it is not ours.
            let (db, id) = (st.rt.db.clone(), st.id);
            let guard = st.release.take();
            if c.serving() {
                let guard = guard.unwrap_or_else(|| c.begin_release(id));
                tokio::spawn(async move {
                    if let Err(e) = c.release(&db, id).await {
                        tracing::debug!(agent = %id.short(), "placement not released: {e}");
                    }
                    drop(guard);
                });
            } else {
                c.forget_owner(&id);
            }
        }
        Ok(())
    }
}

/// Stops this node's incarnation of agent `id` (cancelled: see
/// [`crate::cancel`]), if any.
pub(crate) fn stop_local(rt: &crate::node::Inner, id: FormulaId) {
    if let Some(a) = rt.registry.agent(&id) {
        unregister(&rt.registry.agents, &id, &a);
        a.stop(Some("cancelled".into()));
    }
}

/// Agent `id` was cancelled by this node: stops its incarnation here and
/// tells the other members of a cluster to stop theirs (they read the
/// formula's mark before they do).
pub(crate) fn stop_cancelled(rt: &crate::node::Inner, id: FormulaId) {
    stop_local(rt, id);
    if let Some(c) = rt.cluster.get() {
        let to = c.others();
        if !to.is_empty() {
            let _ = c
                .link
                .try_send(crate::cluster::LinkOp::Settled { to, promise: id });
        }
    }
}

async fn read_next(rt: &crate::node::Inner, id: FormulaId) -> Result<u64, Error> {
    rt.db
        .read(move |tx| Box::pin(async move { model::next_message_number(tx, &id).await }))
        .await
}

/// Starts the runner that failed to start before, if it starts now.
async fn retry_guest(st: &mut AgentState) {
    if st.owned && st.guest.is_none() {
        (st.guest, st.guest_failed) = start_guest(&st.rt, st.id).await;
        if st.guest.is_some() {
            tracing::info!(agent = %st.id.short(), "guest component started on a second try");
        }
    } else {
        st.guest_failed = false;
    }
}

/// The runner of agent `id`'s component, if it has one; and whether
/// starting it failed (then `None`, to be tried again).
async fn start_guest(
    rt: &Arc<crate::node::Inner>,
    id: FormulaId,
) -> (Option<crate::node::GuestRunner>, bool) {
    // Taken now, whatever the agent is, so that agents without a component
    // (which never notify) do not keep entries in the take-over map.
    let took_over = rt
        .cluster
        .get()
        .and_then(|c| Some((c, c.take_over_notice(&id)?)));
    let Some(gh) = rt.guests.get().cloned() else {
        return (None, false);
    };
    match gh.runner_for(rt, id, took_over).await {
        Ok(runner) => (runner, false),
        // (a store that failed now may answer later; a damaged body or
        // component will not)
        Err(e) if e.is_transient() && !matches!(e, Error::Corrupt(_)) => {
            tracing::warn!(agent = %id.short(), "guest component not started (tried again at its next message): {e}");
            (None, true)
        }
        Err(e) => {
            tracing::warn!(agent = %id.short(), "guest component not started: {e}");
            (None, false)
        }
    }
}

fn unregister<M: ractor::Message>(
    map: &Mutex<HashMap<FormulaId, ActorRef<M>>>,
    id: &FormulaId,
    me: &ActorRef<M>,
) {
    if let Ok(mut m) = map.lock()
        && m.get(id).is_some_and(|a| a.get_id() == me.get_id())
    {
        m.remove(id);
    }
}

pub(crate) struct PromiseActor;

pub(crate) struct PromiseState_ {
    rt: Arc<crate::node::Inner>,
    id: FormulaId,
    state: PromiseState,
    waiters: Vec<oneshot::Sender<Result<PromiseState, Error>>>,
    last_active: Instant,
    _ticker: tokio::task::JoinHandle<()>,
}

pub(crate) async fn read_promise(
    rt: &crate::node::Inner,
    id: FormulaId,
) -> Result<PromiseState, Error> {
    rt.db
        .read(move |tx| Box::pin(async move { model::promise_state(tx, &id).await }))
        .await
}

impl Actor for PromiseActor {
    type Msg = PromiseMsg;
    type State = PromiseState_;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PromiseMsg>,
        args: AgentArgs,
    ) -> Result<PromiseState_, ActorProcessingErr> {
        let state = read_promise(&args.rt, args.id).await?;
        let tick = (args.rt.opts.idle_timeout / 2).max(Duration::from_millis(50));
        let ticker = myself.send_interval(tick, || PromiseMsg::Tick);
        Ok(PromiseState_ {
            rt: args.rt,
            id: args.id,
            state,
            waiters: Vec::new(),
            last_active: Instant::now(),
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PromiseMsg>,
        msg: PromiseMsg,
        st: &mut PromiseState_,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PromiseMsg::Wait(tx) => {
                st.last_active = Instant::now();
                if st.state == PromiseState::Pending {
                    // A settlement committed before this actor was registered
                    // sent no notification: read the store again.
                    match read_promise(&st.rt, st.id).await {
                        Ok(s) => st.state = s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return Ok(());
                        }
                    }
                }
                if st.state != PromiseState::Pending {
                    let _ = tx.send(Ok(st.state.clone()));
                } else if st.waiters.len() >= MAX_WAITERS {
                    let _ = tx.send(Err(Error::Unavailable(
                        "too many waiters on this request".into(),
                    )));
                } else {
                    st.waiters.push(tx);
                }
            }
            PromiseMsg::Settled(s) => {
                st.state = s;
                for w in st.waiters.drain(..) {
                    let _ = w.send(Ok(st.state.clone()));
                }
            }
            PromiseMsg::Tick => {
                st.waiters.retain(|w| !w.is_closed());
                if st.waiters.is_empty() && st.last_active.elapsed() >= st.rt.opts.idle_timeout {
                    unregister(&st.rt.registry.promises, &st.id, &myself);
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<PromiseMsg>,
        st: &mut PromiseState_,
    ) -> Result<(), ActorProcessingErr> {
        st._ticker.abort();
        unregister(&st.rt.registry.promises, &st.id, &myself);
        Ok(())
    }
}

/// The incarnation of agent `id`, made on demand: owning it outside a
/// cluster, only serving followers in one (see [`owned_agent_actor`]).
pub(crate) async fn agent_actor(
    rt: &Arc<crate::node::Inner>,
    id: FormulaId,
) -> Result<ActorRef<AgentMsg>, Error> {
    let owned = rt.cluster.get().is_none();
    incarnate(rt, &rt.registry.agents, id, AgentActor, owned).await
}

/// The owning incarnation of agent `id` (the caller holds its placement).
pub(crate) async fn owned_agent_actor(
    rt: &Arc<crate::node::Inner>,
    id: FormulaId,
) -> Result<ActorRef<AgentMsg>, Error> {
    let a = incarnate(rt, &rt.registry.agents, id, AgentActor, true).await?;
    if rt.cluster.get().is_some() {
        match a.call(AgentMsg::Own, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => {
                return Err(Error::Unavailable(
                    "the inbox actor is restarting; try again".into(),
                ));
            }
        }
    }
    Ok(a)
}

/// The incarnation of promise `id`, made on demand.
pub(crate) async fn promise_actor(
    rt: &Arc<crate::node::Inner>,
    id: FormulaId,
) -> Result<ActorRef<PromiseMsg>, Error> {
    incarnate(rt, &rt.registry.promises, id, PromiseActor, true).await
}

async fn incarnate<A>(
    rt: &Arc<crate::node::Inner>,
    map: &Mutex<HashMap<FormulaId, ActorRef<A::Msg>>>,
    id: FormulaId,
    actor: A,
    owned: bool,
) -> Result<ActorRef<A::Msg>, Error>
where
    A: Actor<Arguments = AgentArgs>,
{
    if let Some(a) = map.lock().map_err(|_| poisoned())?.get(&id) {
        return Ok(a.clone());
    }
    if rt.closed.load(std::sync::atomic::Ordering::Acquire) {
        return Err(Error::Unavailable("the node is shutting down".into()));
    }
    let _guard = rt.registry.spawn_lock.lock().await;
    if let Some(a) = map.lock().map_err(|_| poisoned())?.get(&id) {
        return Ok(a.clone());
    }
    let (a, _join) = Actor::spawn(
        None,
        actor,
        AgentArgs {
            rt: rt.clone(),
            id,
            owned,
        },
    )
    .await
    .map_err(|e| Error::Unavailable(format!("could not incarnate {}: {e}", id.short())))?;
    map.lock().map_err(|_| poisoned())?.insert(id, a.clone());
    Ok(a)
}

fn poisoned() -> Error {
    Error::Unavailable("internal registry lock poisoned".into())
}

// The node's side of other members' news and of placements: waking and
// making incarnations (the node itself sits below them).
impl Runtime {
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
        if let Some(c) = self.inner().cluster.get() {
            c.deliveries_received
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(a) = self.inner().registry.agent(&agent) else {
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
            .inner()
            .db
            .read(move |tx| Box::pin(async move { model::get_message(tx, &agent, number).await }))
            .await?;
        let _ = a.cast(AgentMsg::Delivered(m));
        Ok(())
    }

    /// Another member settled `promise`: wake its waiters here, if any.
    pub async fn wake_settled(&self, promise: FormulaId) -> Result<(), Error> {
        // An agent cancelled on another member: stop its incarnation here.
        if self.inner().registry.agent(&promise).is_some() {
            let id = promise;
            let cancelled = self
                .inner()
                .db
                .read(move |tx| {
                    Box::pin(async move {
                        Ok::<_, Error>(model::get_formula(tx, &id).await?.and_then(|f| f.cancelled))
                    })
                })
                .await?;
            if cancelled.is_some() {
                stop_local(self.inner(), id);
            }
        }
        let Some(a) = self.inner().registry.promise(&promise) else {
            return Ok(());
        };
        let state = read_promise(self.inner(), promise).await?;
        let _ = a.cast(PromiseMsg::Settled(state));
        Ok(())
    }

    /// Claims agent `id` for this node if nobody live owns it, and
    /// incarnates it here (its guest, if any, starts): after a drain.
    /// `Ok(false)` when another node owns it.
    pub async fn adopt_placement(&self, id: FormulaId) -> Result<bool, Error> {
        let c = self
            .inner()
            .cluster
            .get()
            .ok_or_else(|| Error::Invalid("this node is not in a cluster".into()))?;
        match c.owner(&self.inner().db, id).await? {
            crate::cluster::Owner::Me => {
                owned_agent_actor(self.inner(), id).await?;
                Ok(true)
            }
            crate::cluster::Owner::Other(_) => Ok(false),
        }
    }
}
