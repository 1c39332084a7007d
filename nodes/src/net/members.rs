//! Links between the nodes of one cluster (the same cluster key, one
//! shared store): the [`Member`](capstan_proto::net_capnp::member) interface
//! served to them, and the queue of calls this node makes to them
//! ([`LinkOp`]s from the runtime: reservations at a remote owner, wake-ups
//! after commits).
//!
//! One QUIC connection per member address, dialled on first use with TLS
//! that trusts only this cluster's key; a failed call drops the link and
//! the next call dials again. Reservations time out after
//! [`RESERVE_TIMEOUT`] (the caller then looks the owner up again: a dead
//! owner's lease lapses and the caller's node claims the inbox). Wake-ups
//! are best effort and coalesced per member: at most one `wake` call is in
//! flight to a member, and what comes meanwhile goes in the next one
//! (bounded by [`MAX_PENDING_WAKEUPS`]; a missed wake-up only delays a
//! follower or guest until its next message or restart). One call per
//! message to every other member made a cluster slower with every node
//! added.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::Error as CapError;
use capstan_actors::cluster::{LinkOp, MemberRec};
use capstan_actors::{Error, Runtime};
use capstan_cluster::relay::{GroupFill, MAX_GROUP_FILLS, NO_FILL, RelayError};
use capstan_cluster::trace;
use capstan_proto::FormulaId;
use capstan_proto::net_capnp::member;
use tokio::sync::mpsc;

use super::{DIAL_TIMEOUT, Net, Peer, failed, tls, transport};

/// Longest wait for a remote owner's reservation.
pub const RESERVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest wait for a wake-up call.
pub const WAKEUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Wake-ups waiting for one member while a call to it is in flight; more
/// are dropped (best effort: a missed wake-up only delays a follower or a
/// guest until its next message or its next look).
pub const MAX_PENDING_WAKEUPS: usize = 8192;
/// Most entries of one `wake` call (the rest wait for the next call).
pub const MAX_WAKEUPS_PER_CALL: usize = 4096;
/// About the most bytes of carried message records in one `wake` call.
pub const MAX_WAKEUP_CALL_BYTES: usize = 1 << 20;
/// Most members named as following one inbox in a reservation's answer.
const MAX_INTERESTED: usize = 64;

/// The member interface of this node.
pub struct MemberServer {
    pub rt: Runtime,
}

/// What a relay answers in `unapplied` for a group it did not apply (an
/// outcome it cannot tell fails the call: its sender resolves the group).
fn unapplied(e: RelayError) -> Result<String, CapError> {
    match e {
        RelayError::NotApplied(e) => Ok(e),
        RelayError::NoFill(e) => Ok(format!("{NO_FILL}{e}")),
        RelayError::Unknown(e) => Err(failed(e)),
    }
}

/// The trace ids a call carries (at most `trace::MAX_TRACES_PER_CALL`).
fn traces_of(l: capnp::primitive_list::Reader<'_, u64>) -> Result<Vec<u64>, CapError> {
    if l.len() as usize > trace::MAX_TRACES_PER_CALL {
        return Err(failed(format!(
            "at most {} traces per call",
            trace::MAX_TRACES_PER_CALL
        )));
    }
    Ok(l.iter().collect())
}

fn id_of(b: &[u8]) -> Result<FormulaId, CapError> {
    FormulaId::from_slice(b).map_err(|_| failed("an id is 32 bytes"))
}

impl member::Server for MemberServer {
    async fn wake(
        self: Rc<Self>,
        params: member::WakeParams,
        _: member::WakeResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let delivered = p.get_delivered()?;
        let settled = p.get_settled()?;
        if delivered.len() as usize + settled.len() as usize > MAX_WAKEUPS_PER_CALL {
            return Err(failed(format!(
                "at most {MAX_WAKEUPS_PER_CALL} wake-ups per call"
            )));
        }
        let mut woken = Vec::with_capacity(delivered.len() as usize);
        for d in delivered.iter() {
            woken.push((
                id_of(d.get_agent()?)?,
                d.get_number(),
                d.get_record()?,
                d.get_trace(),
            ));
        }
        let mut promises = Vec::with_capacity(settled.len() as usize);
        for s in settled.iter() {
            promises.push(id_of(s?)?);
        }
        // What woke us is committed at or below this revision: the snapshots
        // the wake-ups take (a follower rendering a message, a waiter reading
        // its promise) may read there without asking etcd for its latest.
        if p.get_revision() > 0 {
            self.rt.db().learn_version(p.get_revision());
        }
        for (agent, number, record, traced) in woken {
            let timer = trace::Timer::start_one(traced);
            let r = self.rt.wake_delivered_with(agent, number, record).await;
            timer.done("wake-up served", || {
                let how = r
                    .as_ref()
                    .err()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                format!("message {number} in {}'s inbox{how}", agent.short())
            });
            if let Err(e) = r {
                tracing::debug!(agent = %agent.short(), number, "wake-up: {e}");
            }
        }
        for promise in promises {
            if let Err(e) = self.rt.wake_settled(promise).await {
                tracing::debug!(promise = %promise.short(), "wake-up: {e}");
            }
        }
        Ok(())
    }

    async fn reserve(
        self: Rc<Self>,
        params: member::ReserveParams,
        mut results: member::ReserveResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let agent = id_of(p.get_agent()?)?;
        let count = u64::from(p.get_count());
        if !(1..=capstan_actors::MAX_NUMBERS_PER_RESERVATION).contains(&count) {
            return Err(failed(format!(
                "a reservation takes 1 to {} numbers, not {count}",
                capstan_actors::MAX_NUMBERS_PER_RESERVATION
            )));
        }
        // A member without `quotaCount` admits one message per call.
        let admit = match (p.get_quota_count(), p.get_quota_bytes()) {
            (0, 0) => None,
            (n, bytes) => Some(capstan_actors::quota::Admit {
                messages: u64::from(n.max(1)).min(count),
                bytes,
            }),
        };
        let timer = trace::Timer::start_for(traces_of(p.get_traces()?)?);
        let served = self
            .rt
            .serve_reserve(agent, count, p.get_at_least(), admit)
            .await;
        timer.done("reservation at the inbox's owner", || match &served {
            Ok((first, _)) => format!(
                "{} from {first} in {}'s inbox",
                trace::count(count, "number"),
                agent.short()
            ),
            Err(e) => format!(
                "{} in {}'s inbox: {e}",
                trace::count(count, "number"),
                agent.short()
            ),
        });
        let (first, interested) = served.map_err(|e| failed(e.to_string()))?;
        let mut r = results.get();
        r.set_first(first);
        let mut l = r.init_interested(interested.len().min(MAX_INTERESTED) as u32);
        for (i, n) in interested.iter().take(MAX_INTERESTED).enumerate() {
            l.set(i as u32, n.as_str());
        }
        Ok(())
    }

    async fn relay(
        self: Rc<Self>,
        params: member::RelayParams,
        mut results: member::RelayResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let group = p.get_group()?.to_vec();
        let traces = traces_of(p.get_traces()?)?;
        let timer = trace::Timer::start_for(traces.clone());
        let size = group.len();
        let r = trace::scope(&traces, self.rt.db().store().commit_relayed(group)).await;
        timer.done("relayed group at the relay", || {
            let how = match &r {
                Ok(_) => "answered".to_string(),
                Err(e) => e.to_string(),
            };
            format!("a group of {size} bytes from another node: {how}")
        });
        match r {
            Ok(answer) => results.get().set_answer(&answer),
            Err(e) => results.get().set_unapplied(unapplied(e)?.as_str()),
        }
        Ok(())
    }

    async fn relay_filled(
        self: Rc<Self>,
        params: member::RelayFilledParams,
        mut results: member::RelayFilledResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let group = p.get_group()?.to_vec();
        let traces = traces_of(p.get_traces()?)?;
        let list = p.get_fills()?;
        if list.len() as usize > MAX_GROUP_FILLS {
            return Err(failed(format!(
                "at most {MAX_GROUP_FILLS} numbers to fill in per group"
            )));
        }
        let mut fills = Vec::with_capacity(list.len() as usize);
        for f in list.iter() {
            let placeholders = f.get_placeholders()?;
            if placeholders.len() as usize > MAX_GROUP_FILLS {
                return Err(failed(format!(
                    "at most {MAX_GROUP_FILLS} numbers to fill in per group"
                )));
            }
            fills.push(GroupFill {
                scope: f.get_scope()?.to_vec(),
                placeholders: placeholders.iter().collect(),
            });
        }
        let timer = trace::Timer::start_for(traces.clone());
        let size = group.len();
        let r = trace::scope(
            &traces,
            self.rt.db().store().commit_relayed_filled(group, fills),
        )
        .await;
        timer.done("relayed group at the relay", || {
            let how = match &r {
                Ok((_, filled)) => format!(
                    "answered, {} filled in",
                    trace::count(filled.len() as u64, "sequence")
                ),
                Err(e) => e.to_string(),
            };
            format!("a group of {size} bytes from another node: {how}")
        });
        match r {
            Ok((answer, filled)) => {
                let mut a = results.get();
                a.set_answer(&answer);
                let mut l = a.init_filled(filled.len() as u32);
                for (i, f) in filled.iter().enumerate() {
                    let mut o = l.reborrow().get(i as u32);
                    o.set_first(f.first);
                    let n = f.notes.len().min(MAX_INTERESTED);
                    let mut notes = o.init_notes(n as u32);
                    for (j, note) in f.notes.iter().take(n).enumerate() {
                        notes.set(j as u32, note.as_str());
                    }
                }
            }
            Err(e) => results.get().set_unapplied(unapplied(e)?.as_str()),
        }
        Ok(())
    }

    async fn spans(
        self: Rc<Self>,
        params: member::SpansParams,
        mut results: member::SpansResults,
    ) -> Result<(), CapError> {
        let spans = trace::spans_of(params.get()?.get_trace());
        let mut l = results.get().init_spans(spans.len() as u32);
        for (i, s) in spans.iter().enumerate() {
            let mut o = l.reborrow().get(i as u32);
            o.set_name(s.name);
            o.set_start_us(s.start_us);
            o.set_dur_us(s.dur_us);
            o.set_detail(s.detail.as_str());
        }
        Ok(())
    }

    async fn interest(
        self: Rc<Self>,
        params: member::InterestParams,
        _: member::InterestResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let agent = id_of(p.get_agent()?)?;
        let node = p
            .get_node()?
            .to_str()
            .map_err(|_| failed("the member name is not UTF-8"))?;
        if node.is_empty() || node.len() > 128 {
            return Err(failed("a member name is 1 to 128 bytes"));
        }
        self.rt
            .note_interest(agent, node.to_string(), p.get_gone(), p.get_seq());
        Ok(())
    }

    async fn delivered(
        self: Rc<Self>,
        params: member::DeliveredParams,
        _: member::DeliveredResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let agent = id_of(p.get_agent()?)?;
        self.rt
            .wake_delivered(agent, p.get_number())
            .await
            .map_err(|e| failed(e.to_string()))
    }

    async fn settled(
        self: Rc<Self>,
        params: member::SettledParams,
        _: member::SettledResults,
    ) -> Result<(), CapError> {
        let promise = id_of(params.get()?.get_promise()?)?;
        self.rt
            .wake_settled(promise)
            .await
            .map_err(|e| failed(e.to_string()))
    }
}

/// The links of this node to the other members, by address.
#[derive(Default)]
pub struct Links {
    by_addr: RefCell<HashMap<String, (Rc<Peer>, member::Client)>>,
    dialing: tokio::sync::Mutex<()>,
    /// Wake-ups waiting for each member (by address).
    pending: RefCell<HashMap<String, Pending>>,
}

/// Wake-ups for one member, and whether a call to it is in flight.
#[derive(Default)]
struct Pending {
    /// (agent, number, record, trace)
    delivered: Vec<(FormulaId, u64, Arc<Vec<u8>>, u64)>,
    settled: Vec<FormulaId>,
    sending: bool,
}

impl Links {
    /// The peer address of each open link, by the member address it was
    /// dialled for (what this node observes: a DNS name resolved, an
    /// address rewritten on the way).
    pub fn observed(&self) -> HashMap<String, String> {
        self.by_addr
            .borrow()
            .iter()
            .filter(|(_, (p, _))| p.live())
            .map(|(a, (p, _))| (a.clone(), p.conn.remote_address().to_string()))
            .collect()
    }

    pub(super) fn drop_link(&self, addr: &str) {
        if let Some((p, _)) = self.by_addr.borrow_mut().remove(addr) {
            p.conn.close(0u32.into(), b"link failed");
        }
    }
}

impl Net {
    /// The member interface of the node at `addr` (same cluster).
    pub(super) async fn member(self: &Rc<Self>, addr: &str) -> Result<member::Client, String> {
        if let Some((p, m)) = self.links.by_addr.borrow().get(addr)
            && p.live()
        {
            return Ok(m.clone());
        }
        let _g = self.links.dialing.lock().await;
        if let Some((p, m)) = self.links.by_addr.borrow().get(addr)
            && p.live()
        {
            return Ok(m.clone());
        }
        // An advertised address may be a DNS name.
        let sa: SocketAddr = match addr.parse() {
            Ok(sa) => sa,
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(|e| format!("bad member address {addr:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("member address {addr:?} resolves to nothing"))?,
        };
        let tls = tls::client_config(&self.id, self.id.cluster_id).map_err(|e| e.to_string())?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC TLS configuration: {e}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(Arc::new(transport()));
        let connecting = self
            .endpoint
            .connect_with(cfg, sa, "capstan")
            .map_err(|e| format!("{addr}: {e}"))?;
        let conn = tokio::time::timeout(DIAL_TIMEOUT.min(RESERVE_TIMEOUT), connecting)
            .await
            .map_err(|_| format!("{addr}: no answer"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        let peer = Rc::new(Peer::new(conn.clone(), true));
        let gateway = peer.gateway().await?;
        let m = gateway.member_request().send().pipeline.get_member();
        // The other side may open streams too (it serves ours on this one).
        let me = self.clone();
        let cluster = self.id.cluster_id;
        tokio::task::spawn_local(async move {
            let _ = me.serve_streams(conn, cluster).await;
        });
        self.links
            .by_addr
            .borrow_mut()
            .insert(addr.to_string(), (peer, m.clone()));
        Ok(m)
    }

    async fn reserve_at(
        self: &Rc<Self>,
        node: &MemberRec,
        agent: FormulaId,
        count: u32,
        at_least: u64,
        admit: Option<capstan_actors::quota::Admit>,
        traces: &[u64],
    ) -> Result<u64, Error> {
        if let Some(c) = self.rt.membership() {
            c.reserve_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let call = async {
            let m = self.member(&node.addr).await.map_err(CallError::Link)?;
            let mut r = m.reserve_request();
            r.get().set_agent(agent.as_bytes());
            r.get().set_count(count);
            r.get().set_at_least(at_least);
            super::traces::write_traces(traces, |n| r.get().init_traces(n));
            if let Some(a) = admit {
                r.get().set_quota_bytes(a.bytes);
                r.get()
                    .set_quota_count(a.messages.min(u64::from(u32::MAX)) as u32);
            }
            let a = r.send().promise.await.map_err(CallError::from)?;
            let a = a.get().map_err(|e| CallError::Answered(e.to_string()))?;
            let mut interested = Vec::new();
            if let Ok(l) = a.get_interested() {
                for n in l.iter().take(MAX_INTERESTED) {
                    if let Ok(n) = n.and_then(|n| n.to_string().map_err(Into::into)) {
                        interested.push(n);
                    }
                }
            }
            self.rt.learn_interest(agent, interested);
            Ok(a.get_first())
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(RESERVE_TIMEOUT, call).await;
        if let Some(c) = self.rt.membership() {
            c.reserve_us.fetch_add(
                started.elapsed().as_micros() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        match answer {
            Ok(Ok(first)) => Ok(first),
            Ok(Err(CallError::Answered(e)))
                if let Some(full) = capstan_actors::quota::parse_full(&e) =>
            {
                Err(full)
            }
            Ok(Err(CallError::Answered(e))) => Err(Error::Unavailable(format!(
                "node {} (owner of {}) did not reserve: {e}",
                node.name,
                agent.short()
            ))),
            Ok(Err(CallError::Link(e))) => {
                self.links.drop_link(&node.addr);
                Err(Error::Unreachable(format!(
                    "node {} (owner of {}) is unreachable: {e}",
                    node.name,
                    agent.short()
                )))
            }
            Err(_) => {
                self.links.drop_link(&node.addr);
                Err(Error::Unreachable(format!(
                    "node {} (owner of {}) did not answer within {} ms",
                    node.name,
                    agent.short(),
                    RESERVE_TIMEOUT.as_millis()
                )))
            }
        }
    }

    /// Tells `node` (the owner of `agent`) that this node follows the
    /// agent's inbox. Best effort: a follower also looks in the store.
    async fn tell_interest(
        self: &Rc<Self>,
        node: &MemberRec,
        agent: FormulaId,
        gone: bool,
        seq: u64,
    ) {
        let call = async {
            let m = self.member(&node.addr).await.map_err(CallError::Link)?;
            let mut r = m.interest_request();
            r.get().set_agent(agent.as_bytes());
            let me = self
                .rt
                .membership()
                .map(|c| c.cfg.name.clone())
                .unwrap_or_default();
            r.get().set_node(me.as_str());
            r.get().set_gone(gone);
            r.get().set_seq(seq);
            r.send().promise.await.map_err(CallError::from)?;
            Ok::<_, CallError>(())
        };
        match tokio::time::timeout(WAKEUP_TIMEOUT, call).await {
            Ok(Ok(())) => {}
            Ok(Err(CallError::Answered(e))) => {
                tracing::debug!(node = %node.name, "telling the owner of followers failed: {e}")
            }
            Ok(Err(CallError::Link(e))) => {
                tracing::debug!(node = %node.name, "telling the owner of followers failed: {e}");
                self.links.drop_link(&node.addr);
            }
            Err(_) => self.links.drop_link(&node.addr),
        }
    }

    fn wake(self: &Rc<Self>, to: Vec<MemberRec>, what: Wake) {
        for node in to {
            let start = {
                let mut pending = self.links.pending.borrow_mut();
                let p = pending.entry(node.addr.clone()).or_default();
                if p.delivered.len() + p.settled.len() >= MAX_PENDING_WAKEUPS {
                    tracing::debug!(node = %node.name, "too many wake-ups waiting; dropping one");
                    continue;
                }
                match &what {
                    Wake::Delivered(agent, number, record, traced) => {
                        p.delivered.push((*agent, *number, record.clone(), *traced))
                    }
                    Wake::Settled(promise) => p.settled.push(*promise),
                }
                !std::mem::replace(&mut p.sending, true)
            };
            if start {
                let me = self.clone();
                tokio::task::spawn_local(async move { me.send_wakeups(node).await });
            }
        }
    }

    /// Sends what waits for `node`, one call at a time, until nothing does.
    async fn send_wakeups(self: Rc<Self>, node: MemberRec) {
        loop {
            let (delivered, settled) = {
                let mut pending = self.links.pending.borrow_mut();
                let Some(p) = pending.get_mut(&node.addr) else {
                    return;
                };
                if p.delivered.is_empty() && p.settled.is_empty() {
                    // (no entry left behind for a member that went away)
                    pending.remove(&node.addr);
                    return;
                }
                // At most MAX_WAKEUPS_PER_CALL entries and about
                // MAX_WAKEUP_CALL_BYTES of carried records per call.
                let mut bytes = 0;
                let d = p
                    .delivered
                    .iter()
                    .take(MAX_WAKEUPS_PER_CALL)
                    .take_while(|(_, _, r, _)| {
                        bytes += r.len();
                        bytes <= MAX_WAKEUP_CALL_BYTES
                    })
                    .count()
                    .max(1)
                    .min(p.delivered.len());
                let delivered: Vec<_> = p.delivered.drain(..d).collect();
                let s = p.settled.len().min(MAX_WAKEUPS_PER_CALL - d);
                let settled: Vec<_> = p.settled.drain(..s).collect();
                (delivered, settled)
            };
            if let Some(c) = self.rt.membership() {
                c.wake_calls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let call = async {
                let m = self.member(&node.addr).await?;
                let mut r = m.wake_request();
                let mut dl = r.get().init_delivered(delivered.len() as u32);
                for (i, (agent, number, record, traced)) in delivered.iter().enumerate() {
                    let mut d = dl.reborrow().get(i as u32);
                    d.set_agent(agent.as_bytes());
                    d.set_number(*number);
                    d.set_record(record);
                    d.set_trace(*traced);
                }
                let mut sl = r.get().init_settled(settled.len() as u32);
                for (i, promise) in settled.iter().enumerate() {
                    sl.set(i as u32, promise.as_bytes());
                }
                // Read when the call is made, after the commits it tells of
                // (each was acknowledged before its wake-up was queued).
                r.get()
                    .set_revision(self.rt.db().seen_version().unwrap_or(0));
                r.send().promise.await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            // (only traced wake-ups: nothing collected for the others)
            let timer = trace::Timer::start_for(
                delivered.iter().map(|d| d.3).filter(|t| *t != 0).collect(),
            );
            let r = tokio::time::timeout(WAKEUP_TIMEOUT, call).await;
            timer.done("wake-up call", || {
                let how = match &r {
                    Ok(Ok(())) => "answered".to_string(),
                    Ok(Err(e)) => e.clone(),
                    Err(_) => "no answer".into(),
                };
                format!(
                    "{} to node {}: {how}",
                    trace::count(delivered.len() as u64, "wake-up"),
                    node.name
                )
            });
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(node = %node.name, "wake-up failed: {e}");
                    self.links.drop_link(&node.addr);
                }
                Err(_) => self.links.drop_link(&node.addr),
            }
        }
    }

    /// Serves the runtime's calls to other members until it closes.
    pub async fn run_links(self: Rc<Self>, mut rx: mpsc::Receiver<LinkOp>) {
        while let Some(op) = rx.recv().await {
            match op {
                LinkOp::Reserve {
                    node,
                    agent,
                    count,
                    at_least,
                    admit,
                    reply,
                    traces,
                } => {
                    let me = self.clone();
                    tokio::task::spawn_local(async move {
                        let r = me
                            .reserve_at(&node, agent, count, at_least, admit, &traces)
                            .await;
                        let _ = reply.send(r);
                    });
                }
                LinkOp::Delivered {
                    to,
                    agent,
                    number,
                    record,
                    trace,
                } => self.wake(to, Wake::Delivered(agent, number, record, trace)),
                LinkOp::Settled { to, promise } => self.wake(to, Wake::Settled(promise)),
                LinkOp::Interest {
                    node,
                    agent,
                    gone,
                    seq,
                } => {
                    let me = self.clone();
                    tokio::task::spawn_local(async move {
                        me.tell_interest(&node, agent, gone, seq).await
                    });
                }
            }
        }
    }
}

/// Why a call to another member failed.
enum CallError {
    /// It answered with an error: it is alive.
    Answered(String),
    /// No connection, or the connection broke.
    Link(String),
}

impl From<CapError> for CallError {
    fn from(e: CapError) -> Self {
        match e.kind {
            capnp::ErrorKind::Disconnected => CallError::Link(e.to_string()),
            _ => CallError::Answered(e.to_string()),
        }
    }
}

#[derive(Clone)]
enum Wake {
    Delivered(FormulaId, u64, Arc<Vec<u8>>, u64),
    Settled(FormulaId),
}
