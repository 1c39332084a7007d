//! Inbox numbers: reserved at the inbox's owner (under its quota), and the
//! news of a delivery to the other members of the cluster.

use crate::error::Error;
use crate::incarnation;
use crate::records::MessageRec;
use crate::registry::AgentMsg;
use crate::types::Admit;
use capstan_proto::FormulaId;
use std::sync::Arc;
use tokio::sync::oneshot;

use crate::agent::AgentHandle;
use crate::coalesce::{Role, Waiter};
use crate::node::{Inner, Runtime};
use crate::types::MAX_SLOT_RETRIES;

// A relayed group's fills are one reservation (`InboxFiller`).
const _: () = assert!(
    capstan_cluster::relay::MAX_GROUP_FILLS as u64 <= crate::coalesce::MAX_NUMBERS_PER_RESERVATION
);

/// Reserves numbers from this node's owning incarnation of `agent`.
pub(crate) async fn local_reserve(
    inner: &Arc<Inner>,
    agent: FormulaId,
    n: u64,
    at_least: u64,
    admit: Option<Admit>,
) -> Result<u64, Error> {
    for _ in 0..3 {
        let a = incarnation::owned_agent_actor(inner, agent).await?;
        match a
            .call(|port| AgentMsg::Reserve(n, at_least, admit, port), None)
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

/// Reserves `n` numbers in `agent`'s inbox for this node (`rt`), wherever
/// its owner is ([`AgentHandle::reserve_admitting`]), first admitting
/// `admit` (all or none).
async fn reserve_batch_at(
    rt: &Arc<Inner>,
    agent: FormulaId,
    n: u64,
    at_least: u64,
    admit: Option<Admit>,
) -> Result<u64, Error> {
    let Some(c) = rt.cluster.get() else {
        return local_reserve(rt, agent, n, at_least, admit).await;
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
        match c.owner(&rt.db, agent).await? {
            crate::cluster::Owner::Me => match local_reserve(rt, agent, n, at_least, admit).await {
                Ok(first) => return Ok(first),
                Err(e @ Error::InboxFull { .. }) => return Err(e),
                Err(e) => last = Some(e),
            },
            crate::cluster::Owner::Other(node) => {
                let (tx, rx) = oneshot::channel();
                let timer = capstan_cluster::trace::Timer::start();
                let op = crate::cluster::LinkOp::Reserve {
                    node: node.clone(),
                    agent,
                    count: n.min(u32::MAX as u64) as u32,
                    at_least,
                    admit,
                    reply: tx,
                    traces: timer.traces().to_vec(),
                };
                if c.link.send(op).await.is_err() {
                    return Err(Error::Unavailable("the node is shutting down".into()));
                }
                // A node that died leaves the call unanswered until its
                // timeout: stop waiting once its record shows it dead.
                let answer = tokio::select! {
                    r = rx => r,
                    () = c.until_dead(&rt.db, &node) => Ok(Err(Error::Unreachable(format!(
                        "node {} (owner of {}) stopped renewing its lease",
                        node.name,
                        agent.short()
                    )))),
                };
                timer.done("reservation call to the inbox's owner", || {
                    let how = match &answer {
                        Ok(Ok(first)) => format!("numbers from {first}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "no answer".into(),
                    };
                    format!(
                        "{} in {}'s inbox at node {}: {how}",
                        capstan_cluster::trace::count(n, "number"),
                        agent.short(),
                        node.name
                    )
                });
                match answer {
                    Ok(Ok(first)) => return Ok(first),
                    Ok(Err(e @ Error::InboxFull { .. })) => return Err(e),
                    Ok(Err(e)) => {
                        tracing::debug!(owner = %node.name, "remote reservation failed: {e}");
                        if !matches!(e, Error::Unreachable(_)) {
                            c.reserve_refused
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if matches!(e, Error::Unreachable(_)) {
                            c.forget_owner(&agent);
                            c.await_lapse(&rt.db, &node).await?;
                            attempt = 0;
                        }
                        last = Some(e);
                    }
                    Err(_) => last = Some(Error::Unavailable("the node is shutting down".into())),
                }
            }
        }
        // (what this node remembered of the owner failed it: the next
        // attempt asks the store, where a hand-over or a take-over shows)
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

impl AgentHandle {
    /// Reserves `n` numbers in `agent`'s inbox, none below `at_least`: at
    /// this node's incarnation, or in a cluster at the owner's (claiming the
    /// inbox for this node when nobody live owns it); first admitting one
    /// message of about `size` bytes under the inbox's quota when a size is
    /// given (see [`crate::quota`]): a full inbox refuses at once.
    pub(crate) async fn reserve_admitting(
        &self,
        agent: FormulaId,
        n: u64,
        at_least: u64,
        size: Option<u64>,
    ) -> Result<u64, Error> {
        reserve_batch_at(&self.rt, agent, n, at_least, size.map(Admit::one)).await
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
                    trace: capstan_cluster::trace::current()
                        .first()
                        .copied()
                        .unwrap_or(0),
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
}

/// Ends a lead: whoever queued behind it is served by a task.
struct Lead {
    rt: Arc<Inner>,
    agent: FormulaId,
}

impl Drop for Lead {
    fn drop(&mut self) {
        let waiting = self.rt.reservations.next(&self.agent);
        if !waiting.is_empty() {
            tokio::spawn(serve(self.rt.clone(), self.agent, waiting));
        }
    }
}

/// Serves queued reservations, a batch at a time, until none are left.
/// The messages a batch admits under the inbox's quota are admitted all
/// at once; when the inbox cannot take them all, each is asked alone, so
/// that each gets its own answer (some may fit).
async fn serve(rt: Arc<Inner>, agent: FormulaId, mut batch: Vec<Waiter>) {
    while !batch.is_empty() {
        let floor = batch.iter().map(|w| w.at_least).max().unwrap_or(0);
        let n: u64 = batch.iter().map(|w| w.count).sum();
        let sizes: Vec<u64> = batch.iter().filter_map(|w| w.size).collect();
        let admit = (!sizes.is_empty()).then(|| Admit {
            messages: sizes.len() as u64,
            bytes: sizes.iter().sum(),
        });
        // (the call carries the traces of the operations it serves)
        let traces: Vec<u64> = batch
            .iter()
            .flat_map(|w| w.traces.iter().copied())
            .collect();
        let first =
            capstan_cluster::trace::scope(&traces, reserve_batch_at(&rt, agent, n, floor, admit))
                .await;
        match first {
            Err(Error::InboxFull { .. }) => {
                for w in batch.drain(..) {
                    let admit = w.size.map(Admit::one);
                    let r = reserve_batch_at(&rt, agent, w.count, w.at_least, admit).await;
                    let _ = w.reply.send(r);
                }
            }
            r => {
                let mut offset = 0;
                for w in batch.drain(..) {
                    let _ = w.reply.send(r.clone().map(|first| first + offset));
                    offset += w.count;
                }
            }
        }
        batch = rt.reservations.next(&agent);
    }
}

/// `count` consecutive numbers (at least 1) in `agent`'s inbox, none below
/// `at_least`, coalesced with this node's (`rt`) other reservations for
/// the same inbox (`crate::coalesce`); first admitting one message of
/// about `size` bytes under the inbox's quota when a size is given. With
/// how it went, for a trace.
async fn reserve_coalesced(
    rt: &Arc<Inner>,
    agent: FormulaId,
    count: u64,
    at_least: u64,
    size: Option<u64>,
) -> (Result<u64, Error>, &'static str) {
    let admit = size.map(Admit::one);
    match rt.reservations.join(agent, count, at_least, size) {
        Role::Alone => (
            reserve_batch_at(rt, agent, count, at_least, admit).await,
            "alone (too many queued)",
        ),
        Role::Follow(rx) => (
            rx.await
                .unwrap_or_else(|_| Err(Error::Unavailable("the node is shutting down".into()))),
            "queued behind this node's reservation in flight",
        ),
        Role::Lead => {
            let _lead = Lead {
                rt: rt.clone(),
                agent,
            };
            (
                reserve_batch_at(rt, agent, count, at_least, admit).await,
                "leading this node's reservations",
            )
        }
    }
}

impl AgentHandle {
    /// One number in `agent`'s inbox, none below `at_least`, coalesced with
    /// the other reservations of this node for the same inbox (module docs).
    pub(crate) async fn reserve_one(&self, agent: FormulaId, at_least: u64) -> Result<u64, Error> {
        self.reserve_one_admitting(agent, at_least, None).await
    }

    /// [`reserve_one`](Self::reserve_one), first admitting one message of
    /// about `size` bytes under the inbox's quota when a size is given
    /// ([`Error::InboxFull`] otherwise): the admissions of a batch go to
    /// the owner in its one call.
    pub(crate) async fn reserve_one_admitting(
        &self,
        agent: FormulaId,
        at_least: u64,
        size: Option<u64>,
    ) -> Result<u64, Error> {
        let timer = capstan_cluster::trace::Timer::start();
        let (r, how) = reserve_coalesced(&self.rt, agent, 1, at_least, size).await;
        timer.done("inbox number", || match &r {
            Ok(n) => format!("number {n} in {}'s inbox, {how}", agent.short()),
            Err(e) => format!("{}'s inbox, {how}: {e}", agent.short()),
        });
        r
    }
}

/// The numbers a relay fills in for the other nodes' sends
/// ([`capstan_cluster::relay::Filler`]): an inbox's numbers, from its owner
/// (this node's incarnation when it owns the inbox; else a reservation
/// call to the owner, coalesced with this node's other reservations in
/// that inbox: the groups that arrive while one call is in flight, and
/// this node's own sends, share the next), with the members following
/// the inbox.
pub struct InboxFiller(pub Runtime);

impl capstan_cluster::relay::Filler for InboxFiller {
    fn fill(&self, scope: &[u8], count: u32) -> capstan_cluster::relay::FillFuture {
        let rt = self.0.clone();
        let agent = FormulaId::from_slice(scope);
        Box::pin(async move {
            let agent =
                agent.map_err(|_| "a sequence to fill is an agent's 32-byte id".to_string())?;
            if !(1..=capstan_cluster::relay::MAX_GROUP_FILLS as u32).contains(&count) {
                return Err(format!("cannot fill {count} numbers at once"));
            }
            let inner = rt.inner();
            let (first, _) = reserve_coalesced(inner, agent, u64::from(count), 0, None).await;
            let first = first.map_err(|e| e.to_string())?;
            let notes = inner
                .cluster
                .get()
                .map(|c| c.followers_of(&agent))
                .unwrap_or_default();
            Ok(capstan_cluster::relay::FillAnswer { first, notes })
        })
    }
}

impl Runtime {
    /// Serves a reservation another member asked of this node (the owner).
    pub async fn serve_reserve(
        &self,
        agent: FormulaId,
        count: u64,
        at_least: u64,
        admit: Option<Admit>,
    ) -> Result<(u64, Vec<String>), Error> {
        let c = self
            .inner()
            .cluster
            .get()
            .ok_or_else(|| Error::Invalid("this node is not in a cluster".into()))?;
        let db = &self.inner().db;
        let mut owner = c.owner(db, agent).await?;
        if let crate::cluster::Owner::Other(_) = owner {
            // The caller found in the store that this node owns the inbox,
            // or is the one to claim it (spreading, a drain): what this
            // node remembers of another owner may be older than that.
            c.forget_owner(&agent);
            owner = c.owner(db, agent).await?;
        }
        match owner {
            crate::cluster::Owner::Me => {
                let first = local_reserve(self.inner(), agent, count, at_least, admit).await?;
                Ok((first, c.interested(&agent)))
            }
            crate::cluster::Owner::Other(m) => Err(Error::Unavailable(format!(
                "not the owner: node {} owns {}",
                m.name,
                agent.short()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalesce::MAX_QUEUED;
    use crate::types::RuntimeOptions;
    use capstan_proto::RequestId;

    /// While an inbox's owner counts the inbox for its quota (its first
    /// admission reads every message), reservations that admit nothing
    /// (a sender's own copy, a number the relay fills in) are served, not
    /// held behind the count; the admission is answered after it. Every
    /// store read here is delayed by up to 100 ms, so the count (several
    /// reads) is still running when the plain reservation, which reads
    /// nothing, is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reservations_admitting_nothing_do_not_wait_for_a_count() {
        use capstan_cluster::mem_store::{Faults, MemStore, PPM};
        let faults = Faults {
            read_delay_ppm: PPM,
            max_delay: std::time::Duration::from_millis(100),
            ..Faults::seeded(41)
        };
        let store = Arc::new(MemStore::with_faults(faults));
        let rt = Runtime::open(capstan_cluster::Db::new(store), RuntimeOptions::default())
            .await
            .unwrap();
        let host = rt.root_host();
        let (inner, me) = (host.rt.clone(), host.id());
        // the inbox's actor incarnated (its sequence read)
        let first = local_reserve(&inner, me, 1, 0, None).await.unwrap();
        let counting = tokio::spawn({
            let inner = inner.clone();
            async move { local_reserve(&inner, me, 1, 0, Some(Admit::one(100))).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let plain = local_reserve(&inner, me, 1, 0, None).await.unwrap();
        assert!(
            !counting.is_finished(),
            "the reservation admitting nothing waited for the count"
        );
        let admitted = counting.await.unwrap().unwrap();
        let mut got = [first, plain, admitted];
        got.sort();
        assert_eq!(got, [first, first + 1, first + 2], "distinct numbers");
    }

    /// A runtime on a fresh in-memory store.
    async fn mem_runtime() -> Runtime {
        let store = Arc::new(capstan_cluster::mem_store::MemStore::new());
        Runtime::open(capstan_cluster::Db::new(store), RuntimeOptions::default())
            .await
            .unwrap()
    }

    /// `n` sends from `host` to its agent "g" at once, "m0", "m1", …
    fn spawn_sends(
        host: &AgentHandle,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<u64, Error>>> {
        (0..n)
            .map(|i| {
                let h = host.clone();
                tokio::spawn(async move {
                    h.send(
                        RequestId::random(),
                        "g",
                        vec![format!("m{i}")],
                        vec![],
                        None,
                    )
                    .await
                })
            })
            .collect()
    }

    /// Many senders of one agent at once: each gets a number of its own,
    /// whether it led, waited in a batch or went alone (the queue full),
    /// and every send lands once under its number.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_in_one_inbox_get_distinct_numbers() {
        let rt = mem_runtime().await;
        let host = rt.root_host();
        let me = host.id();
        let n = MAX_QUEUED + 64;
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let h = host.clone();
                tokio::spawn(async move { h.reserve_one(me, 0).await })
            })
            .collect();
        let mut got = std::collections::BTreeSet::new();
        for t in tasks {
            let number = t.await.unwrap().unwrap();
            assert!(got.insert(number), "number {number} handed out twice");
        }
        assert_eq!(got.len(), n);
        // Nothing is left in flight: the next one leads at once. (The last
        // waiter is answered just before its leader removes the emptied
        // queue, on another worker thread: give that a moment.)
        let empty = || host.rt.reservations.queues.lock().unwrap().is_empty();
        for _ in 0..500 {
            if empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(empty(), "a reservation queue outlived its last waiter");
        let next = host.reserve_one(me, 0).await.unwrap();
        assert!(!got.contains(&next));
        // Sends through the coalesced path land once each, in the sender's
        // inbox too.
        host.mkguest(RequestId::random(), "g").await.unwrap();
        let sends = spawn_sends(&host, 40);
        let mut own = std::collections::BTreeSet::new();
        for s in sends {
            assert!(own.insert(s.await.unwrap().unwrap()));
        }
        let inbox = host.inbox(None).await.unwrap();
        let mine: Vec<u64> = inbox
            .iter()
            .map(|m| m.number)
            .filter(|n| own.contains(n))
            .collect();
        assert_eq!(mine.len(), 40, "each send once in the sender's inbox");
    }

    /// A relay's fills (several numbers each, for groups of the other
    /// nodes' sends) queue behind a reservation in flight in the inbox, as
    /// the node's own sends do, and one reservation then serves them all:
    /// each gets a consecutive run of its own, shared with no other fill
    /// and no plain reservation queued with them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_fills_share_one_reservation_and_get_runs_of_their_own() {
        use capstan_cluster::relay::Filler;
        let rt = mem_runtime().await;
        let host = rt.root_host();
        let me = host.id();
        // a reservation of the inbox in flight (this test leads it)
        assert!(matches!(
            host.rt.reservations.join(me, 1, 0, None),
            Role::Lead
        ));
        let filler = Arc::new(InboxFiller(rt.clone()));
        let counts = [3u32, 1, 5, 2];
        let fills: Vec<_> = counts
            .iter()
            .map(|&c| {
                let f = filler.clone();
                tokio::spawn(async move { (c, f.fill(me.as_bytes(), c).await) })
            })
            .collect();
        let plain = {
            let h = host.clone();
            tokio::spawn(async move { h.reserve_one(me, 0).await })
        };
        let queued = || host.rt.reservations.queues.lock().unwrap()[&me].len();
        for _ in 0..500 {
            if queued() == counts.len() + 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert_eq!(queued(), counts.len() + 1, "the fills queue too");
        // the reservation in flight ends: the queue is served
        drop(Lead {
            rt: host.rt.clone(),
            agent: me,
        });
        let mut got = std::collections::BTreeSet::new();
        for f in fills {
            let (c, a) = f.await.unwrap();
            let first = a.unwrap().first;
            for n in first..first + u64::from(c) {
                assert!(got.insert(n), "number {n} handed out twice");
            }
        }
        let n = plain.await.unwrap().unwrap();
        assert!(got.insert(n), "number {n} handed out twice");
        let (lo, hi) = (*got.first().unwrap(), *got.last().unwrap());
        assert_eq!(hi - lo + 1, 12, "one reservation of all 12 numbers");
    }

    /// Concurrent sends into an inbox with room for 40 messages: their
    /// admissions under the quota go in batches (each counted as the
    /// messages it holds), and still exactly 40 are admitted (a batch that
    /// does not fit asks each of its messages alone); every other send is
    /// refused as a full inbox, having written nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_admissions_keep_the_quota_exact() {
        let rt = mem_runtime().await;
        let host = rt.root_host();
        host.mkguest(RequestId::random(), "g").await.unwrap();
        let quota = crate::quota::Quota {
            max_messages: 40,
            ..Default::default()
        };
        host.quota(RequestId::random(), "g", Some(Some(quota)))
            .await
            .unwrap();
        let sends = spawn_sends(&host, 60);
        let (mut sent, mut full) = (0, 0);
        for s in sends {
            match s.await.unwrap() {
                Ok(_) => sent += 1,
                Err(Error::InboxFull { .. }) => full += 1,
                Err(e) => panic!("a send failed otherwise: {e}"),
            }
        }
        assert_eq!((sent, full), (40, 20), "sends admitted, and refused");
        let g = host.agent("g").await.unwrap();
        assert_eq!(g.inbox(None).await.unwrap().len(), 40, "the guest's inbox");
    }
}
