//! Group commit for the etcd backend: concurrent commits whose read and write
//! sets do not overlap share one etcd Txn.
//!
//! Each commit is prepared on its caller's task into a *member*: its compares
//! (the marker's and the read set's, module docs of [`super`]) and its writes.
//! A single committer task takes the members waiting in its queue and sends
//! them as one Txn with one nested Txn per member:
//!
//! ```text
//! Txn { compare: [create_revision(B) == 0],
//!       success: [ Txn{compare: c1, success: w1},
//!                  Txn{compare: c2, success: w2}, …,
//!                  put(guard) if any member deletes,
//!                  put(B) ] }
//! ```
//!
//! Etcd evaluates every compare of every nested Txn against the state before
//! the outer Txn, then applies the writes of the branches taken, all in one
//! raft entry at one revision. Each member therefore succeeds or fails on its
//! own compares, exactly as if it had been sent alone: a conflicting member
//! fails (its caller retries it) without taking the others down, so there is
//! no need to fall back to committing the parts alone.
//!
//! Members that make the same compares (an agent's sends all check its
//! inbox mark; sends to one recipient, the recipient's) are gathered under
//! a nested Txn that checks them once ([`super::hoist`]): a send's 7
//! compares became about 3.5 sent (`capstan bench --cluster`, 3 nodes).
//!
//! That is serializable only if no member reads anything another member of
//! the same batch writes (they are all checked against the state before the
//! batch), and etcd refuses a Txn in which two branches put the same key.
//! [`pick`] therefore never puts two members in one batch when the read set
//! of either overlaps the write set of the other, or their write sets
//! overlap; such a member waits for the next batch (the conformance check
//! `batches_never_merge_conflicting_transactions` holds the store to it).
//! The deletion guard is put once by the outer Txn when any member deletes
//! (a guard write without a deletion costs coarse read sets a false conflict,
//! never a missed one).
//!
//! Etcd's `--max-txn-ops` bounds the outer Txn's operations (one per member,
//! plus the guard) and each nested Txn's compares and operations by what is
//! left of it (etcd checks a nested Txn against the budget its parents
//! left). [`pick`] keeps every batch inside that, and inside
//! `max-request-bytes`.
//!
//! One commit marker `B` serves the whole batch (a member that puts no key
//! carries its own marker too): a marker is a put now and a delete when its
//! lease ends, so one per member was two of a send's five writes. A batch
//! whose outcome is unknown (connection dropped, timeout) is resolved by `B`
//! as a single commit is by its own marker ([`super`]): absent, the batch is
//! fenced and no member applied; present at revision `R`, the batch applied
//! at `R`, and a member took its success branch exactly if its first put key
//! was modified at `R` (read at revision `R`: members of a batch write
//! disjoint keys, and every write of one Txn carries its revision). A batch etcd
//! refuses outright (too large, too many operations: the estimate was off) is
//! sent again one member at a time. A commit arriving while the committer is
//! idle goes out alone at once, so batching adds no latency at low load;
//! while a batch is in flight the next one gathers what arrives and goes
//! when it is answered, unless it is already full: then up to
//! [`MAX_IN_FLIGHT`] batches are in flight. Relayed groups are two at a
//! time ([`RELAYS_IN_FLIGHT`]).

use std::sync::Weak;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    Failure, Inner, KeyRange, MARKER_COMMITTED, REQUEST_TIMEOUT, TIMEOUT_PER_MB, bump, classify,
    header_revision, hoist, timed_out, to_store_error,
};
use crate::etcd_rpc::{Compare, RequestOp, TxnRequest, TxnResponse, compare_result};
use crate::relay::RelayError;
use crate::store::{StoreError, Version};

/// Most members of one batch.
pub const MAX_BATCH: usize = 256;
/// Batches sent at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Relayed groups a client has in flight before the next batch waits for
/// an answer (its own Txns: one). A group waits at the relay for the
/// relay's Txn in flight: holding the next group back until the first is
/// answered made each commit wait out two Txns. Measured with `capstan
/// bench --cluster`, 3 nodes, in two interleaved rounds: one group
/// 4,140/4,233 sends/s (p50 14.4 ms), two 4,507/4,548 (13.6/13.0 ms),
/// three 4,418/4,492; at 6 nodes (CPU-bound) two and one alike.
pub const RELAYS_IN_FLIGHT: usize = 2;
/// Commits waiting for the committer (bounded: callers wait for room).
pub const QUEUE: usize = 8192;

/// One prepared commit.
pub(super) struct Member {
    pub compares: Vec<Compare>,
    /// Deletes and puts of user data (not the guard, not the marker).
    pub writes: Vec<RequestOp>,
    /// This commit's own marker: checked and put when it goes alone, or
    /// in a batch when it puts no key ([`Member::first_put`]).
    pub marker: Vec<u8>,
    /// The etcd key of its first put, if any: how a resolved batch tells
    /// whether this member applied.
    pub first_put: Option<Vec<u8>>,
    /// What batching needs to know (its deletions and size included).
    pub shape: Shape,
    pub reply: Reply,
    /// The traces this commit works for and when it was made (none:
    /// untraced, nothing recorded): see [`crate::trace`].
    pub traced: Option<Box<Traced>>,
    /// Numbers the relay fills in ([`crate::Transaction::fill`]): such a
    /// member goes only in a relayed group.
    pub fills: Vec<crate::store::Fill>,
}

/// A traced member's traces, and when it was made (wall clock µs, instant).
pub(super) type Traced = (Vec<u64>, u64, Instant);

/// A member's [`Traced`] for the current task's traces (none if untraced).
pub(super) fn traced_now() -> Option<Box<Traced>> {
    crate::trace::active().then(|| {
        Box::new((
            crate::trace::current(),
            crate::trace::now_us(),
            Instant::now(),
        ))
    })
}

/// The traces the members of `batch` work for.
fn traces_of(batch: &[Member]) -> Vec<u64> {
    let mut out = Vec::new();
    for m in batch {
        if let Some(t) = &m.traced {
            out.extend_from_slice(&t.0);
        }
    }
    out
}

/// Records, for each traced member of `batch`, its wait from when it was
/// made until its batch goes (now).
fn note_queued(batch: &[Member]) {
    for m in batch {
        if let Some(t) = &m.traced {
            let dur_us = t.2.elapsed().as_micros() as u64;
            for trace in &t.0 {
                crate::trace::record(crate::trace::Span {
                    trace: *trace,
                    name: if m.relayed() {
                        "relayed group waits for the relay's Txn"
                    } else {
                        "commit waits for its batch to go"
                    },
                    start_us: t.1,
                    dur_us,
                    detail: format!(
                        "{} in the batch",
                        crate::trace::count(batch.len() as u64, "commit")
                    ),
                });
            }
        }
    }
}

/// Who waits for a member's outcome.
pub(super) enum Reply {
    /// A commit of this client: its version, or why it has none.
    Local(oneshot::Sender<Result<Version, StoreError>>),
    /// A group another member's client relayed ([`super::relay`]): its
    /// marker compare and put are its own `compares` and `writes`. It waits
    /// for etcd's answer to it (the Txn's revision and the group's nested
    /// answer), which its sender reads.
    Relayed(oneshot::Sender<Result<(Version, TxnResponse), RelayError>>),
}

/// How one member's commit ended, as the batch saw it.
pub(super) enum Outcome {
    /// Etcd answered: the Txn's revision, and the member's own answer
    /// (whether its branch ran, and what its operations answered).
    Answered(Version, TxnResponse),
    /// Settled otherwise: resolved by markers, refused, conflicted.
    Settled(Result<Version, StoreError>),
    /// Etcd did not answer; a local member is resolved before it is told,
    /// a relayed group's sender resolves it.
    Unknown,
}

impl Member {
    fn relayed(&self) -> bool {
        matches!(self.reply, Reply::Relayed(_))
    }

    /// Tells whoever waits how the member's commit ended.
    pub(super) fn answer(self, outcome: Outcome) {
        match self.reply {
            Reply::Local(tx) => {
                let r = match outcome {
                    Outcome::Answered(v, t) if t.succeeded => Ok(v),
                    Outcome::Answered(..) => Err(StoreError::Conflict),
                    Outcome::Settled(r) => r,
                    Outcome::Unknown => Err(StoreError::MaybeCommitted),
                };
                let _ = tx.send(r);
            }
            Reply::Relayed(tx) => {
                let r = match outcome {
                    Outcome::Answered(v, t) => Ok((v, t)),
                    // (not known: its sender resolves it by its marker; taken
                    // for "not applied", the sender would commit it again)
                    Outcome::Settled(Err(StoreError::MaybeCommitted)) => Err(RelayError::Unknown(
                        "its outcome is not known (etcd answered NOSPACE and its marker could not be read)".into(),
                    )),
                    Outcome::Settled(Err(e)) => Err(RelayError::NotApplied(e.to_string())),
                    Outcome::Settled(Ok(_)) | Outcome::Unknown => {
                        Err(RelayError::Unknown("etcd did not answer the Txn".into()))
                    }
                };
                let _ = tx.send(r);
            }
        }
    }

    /// The Txn of this member alone: its marker's compare first (a relayed
    /// group's is among its own compares already).
    fn alone(&self, lease: i64, guard: Option<&[u8]>) -> TxnRequest {
        if self.relayed() {
            let mut success = self.writes.clone();
            if let Some(g) = guard {
                success.push(RequestOp::put(g.to_vec(), Vec::new(), 0));
            }
            return TxnRequest {
                compare: self.compares.clone(),
                success,
                failure: Vec::new(),
            };
        }
        let mut compare = Vec::with_capacity(self.compares.len() + 1);
        compare.push(Compare::create_revision(
            self.marker.clone(),
            compare_result::EQUAL,
            0,
        ));
        compare.extend(self.compares.iter().cloned());
        let mut success = self.writes.clone();
        if let Some(g) = guard {
            success.push(RequestOp::put(g.to_vec(), Vec::new(), 0));
        }
        success.push(RequestOp::put(
            self.marker.clone(),
            MARKER_COMMITTED.to_vec(),
            lease,
        ));
        TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        }
    }

    /// Its nested Txn in a batch: the batch's marker stands for its own
    /// unless it puts no key.
    pub(super) fn nested(&self, lease: i64) -> TxnRequest {
        let mut success = self.writes.clone();
        let mut compare = self.compares.clone();
        if self.first_put.is_none() && !self.relayed() {
            compare.insert(
                0,
                Compare::create_revision(self.marker.clone(), compare_result::EQUAL, 0),
            );
            success.push(RequestOp::put(
                self.marker.clone(),
                MARKER_COMMITTED.to_vec(),
                lease,
            ));
        }
        TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        }
    }
}

/// What batching needs to know of a member: the key ranges it read and
/// wrote (user keys), its operation count and size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub reads: Vec<KeyRange>,
    pub writes: Vec<KeyRange>,
    /// Most of its compares and its operations (its own marker's included,
    /// the guard's not).
    pub ops: usize,
    pub deletes: bool,
    pub size: usize,
}

#[cfg(test)]
fn overlaps(a: &[KeyRange], b: &[KeyRange]) -> bool {
    a.iter()
        .any(|(ab, ae)| b.iter().any(|(bb, be)| ab < be && bb < ae))
}

/// Whether `a` and `b` may share a batch: neither reads what the other
/// writes, and they write nothing in common (the rule [`pick`] applies
/// through its index; the tests check the two agree).
#[cfg(test)]
pub fn compatible(a: &Shape, b: &Shape) -> bool {
    !overlaps(&a.writes, &b.writes)
        && !overlaps(&a.reads, &b.writes)
        && !overlaps(&b.reads, &a.writes)
}

/// The key ranges a batch's members read and write so far, indexed so that
/// checking one more member costs a few ordered-set lookups per range, not a
/// comparison with every range of every member already chosen (that was
/// quadratic in the batch, and a tenth of a busy node's CPU with batches of
/// hundreds). Single keys (`[k, k\0)`, most of a transaction's ranges) are
/// kept in ordered sets; the few wider ranges (listings) are scanned.
#[derive(Default)]
struct Taken {
    write_keys: std::collections::BTreeSet<Vec<u8>>,
    read_keys: std::collections::BTreeSet<Vec<u8>>,
    write_spans: Vec<KeyRange>,
    read_spans: Vec<KeyRange>,
}

fn is_key((b, e): &KeyRange) -> bool {
    e.len() == b.len() + 1 && e.last() == Some(&0) && e.starts_with(b)
}

/// Whether any key of `keys` lies in `[b, e)`.
fn any_in(keys: &std::collections::BTreeSet<Vec<u8>>, (b, e): &KeyRange) -> bool {
    b < e
        && keys
            .range::<Vec<u8>, _>((std::ops::Bound::Included(b), std::ops::Bound::Excluded(e)))
            .next()
            .is_some()
}

/// Whether `r` overlaps one of the keys or spans.
fn hits(keys: &std::collections::BTreeSet<Vec<u8>>, spans: &[KeyRange], r: &KeyRange) -> bool {
    let (b, e) = r;
    let by_key = if is_key(r) {
        keys.contains(b)
    } else {
        any_in(keys, r)
    };
    by_key || spans.iter().any(|(sb, se)| b < se && sb < e)
}

impl Taken {
    /// The keys `batch` writes (its reads left out).
    fn writes_of(batch: &[Member]) -> Taken {
        let mut t = Taken::default();
        for m in batch {
            t.take(&Shape {
                writes: m.shape.writes.clone(),
                ..Shape::default()
            });
        }
        t
    }

    /// Whether `s` reads something written here.
    fn stales(&self, s: &Shape) -> bool {
        s.reads
            .iter()
            .any(|r| hits(&self.write_keys, &self.write_spans, r))
    }

    /// Whether `s` may join: it reads nothing written, writes nothing read
    /// or written ([`compatible`] with every member taken).
    fn admits(&self, s: &Shape) -> bool {
        s.reads
            .iter()
            .all(|r| !hits(&self.write_keys, &self.write_spans, r))
            && s.writes.iter().all(|w| {
                !hits(&self.write_keys, &self.write_spans, w)
                    && !hits(&self.read_keys, &self.read_spans, w)
            })
    }

    fn take(&mut self, s: &Shape) {
        for r in &s.reads {
            if is_key(r) {
                self.read_keys.insert(r.0.clone());
            } else {
                self.read_spans.push(r.clone());
            }
        }
        for w in &s.writes {
            if is_key(w) {
                self.write_keys.insert(w.0.clone());
            } else {
                self.write_spans.push(w.clone());
            }
        }
    }
}

/// The members of the next batch, as indices into `queue` (in order; the
/// first is always taken): each compatible with every other, the outer
/// Txn's operations (members, marker, guard) plus the largest member's
/// within `max_txn_ops`, and the
/// total size within `max_bytes`.
pub fn pick(queue: &[&Shape], max_txn_ops: usize, max_bytes: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    let mut taken = Taken::default();
    let (mut size, mut widest, mut deletes) = (0usize, 0usize, false);
    for (i, s) in queue.iter().enumerate() {
        if chosen.len() >= MAX_BATCH {
            break;
        }
        if chosen.is_empty() {
            chosen.push(i);
            taken.take(s);
            size = s.size;
            widest = s.ops;
            deletes = s.deletes;
            continue;
        }
        // one nested Txn per member (`s` too), the batch marker, the guard
        let outer = chosen.len() + 2 + usize::from(deletes || s.deletes);
        if outer + widest.max(s.ops) > max_txn_ops || size + s.size > max_bytes {
            continue;
        }
        if taken.admits(s) {
            chosen.push(i);
            taken.take(s);
            size += s.size;
            widest = widest.max(s.ops);
            deletes |= s.deletes;
        }
    }
    chosen
}

/// Whether what is waiting fills a batch (more than one batch takes, by
/// count, operations or bytes): then it goes even while another is in
/// flight. Cheap (no conflict checks): it runs on every arrival.
fn fills_a_batch(waiting: &[Member], max_txn_ops: usize, max_bytes: usize) -> bool {
    if waiting.len() >= MAX_BATCH {
        return true;
    }
    let (mut size, mut widest, mut deletes) = (0usize, 0usize, false);
    for m in waiting {
        size += m.shape.size;
        widest = widest.max(m.shape.ops);
        deletes |= m.shape.deletes;
    }
    waiting.len() + 2 + usize::from(deletes) + widest > max_txn_ops || size > max_bytes
}

/// The committer's end of the queue.
pub(super) struct Committer {
    tx: mpsc::Sender<Member>,
}

impl Committer {
    /// Starts the committer task of `inner` (it ends when the store is dropped).
    pub fn start(inner: Weak<Inner>) -> Committer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(inner, rx));
        Committer { tx }
    }

    /// Queues `m` and waits for its outcome.
    pub async fn commit(
        &self,
        m: Member,
        rx: oneshot::Receiver<Result<Version, StoreError>>,
    ) -> Result<Version, StoreError> {
        self.queue(m).await?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Io("the etcd committer stopped".into())))
    }

    /// Queues `m` (its reply tells its outcome).
    pub async fn queue(&self, m: Member) -> Result<(), StoreError> {
        self.tx
            .send(m)
            .await
            .map_err(|_| StoreError::Io("the etcd store is closed".into()))
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Member>) {
    let slots = std::sync::Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Told when a batch is answered (a stored wake-up: none is lost).
    let answered = std::sync::Arc::new(tokio::sync::Notify::new());
    // What the batches in flight write, by batch.
    let flying: std::sync::Arc<std::sync::Mutex<Vec<(u64, Taken)>>> = Default::default();
    let mut sent = 0u64;
    let mut waiting: Vec<Member> = Vec::new();
    // The first `clean` waiting members read nothing a batch in flight writes.
    let mut clean = 0usize;
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(m) => waiting.push(m),
                None => return,
            }
        }
        while waiting.len() < 4 * MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => waiting.push(m),
                Err(_) => break,
            }
        }
        let Some(store) = inner.upgrade() else { return };
        let (max_ops, max_bytes) = (store.max_txn_ops, store.config.max_request_bytes);
        let relaying = store.relaying.load(std::sync::atomic::Ordering::Relaxed);
        drop(store);
        // A batch that could still grow waits while another is in flight:
        // it goes when that one is answered, with whatever arrived
        // meanwhile. Fewer, larger Txns cost etcd less per commit (measured
        // with `capstan bench --cluster`: 4 partial batches in flight gave
        // 2,932 sends/s at 410 µs of etcd CPU per send; one, 3,184/s at
        // 372 µs, and guest messages 828 -> 943/s). A full batch (what is
        // waiting does not fit one) goes at once on a free slot.
        // Except a member that read what a batch in flight writes: it is
        // likely to conflict, and holding it back only makes its read
        // staler (one key many transactions update starved: their reads
        // never reached etcd before the next batch changed the key).
        // While only relayed groups are in flight, fewer than
        // [`RELAYS_IN_FLIGHT`], the next batch goes too (to the relay,
        // where it waits with the others for the relay's Txn).
        let flying_now = MAX_IN_FLIGHT - slots.available_permits();
        let in_flight = flying_now > 0;
        let hold = in_flight && (flying_now > relaying || relaying >= RELAYS_IN_FLIGHT);
        // (only the members that arrived since the last look are checked:
        // one found clean stays so until the next batch goes, as batches
        // only leave the flying set meanwhile; checking every waiting
        // member on every arrival was quadratic in a batch)
        let mut contended = || {
            flying.lock().is_ok_and(|f| {
                let stale = waiting[clean.min(waiting.len())..]
                    .iter()
                    .any(|m| f.iter().any(|(_, t)| t.stales(&m.shape)));
                if !stale {
                    clean = waiting.len();
                }
                stale
            })
        };
        if hold && !fills_a_batch(&waiting, max_ops, max_bytes) && !contended() {
            tokio::select! {
                _ = answered.notified() => {}
                m = rx.recv() => match m {
                    Some(m) => waiting.push(m),
                    None => return,
                },
            }
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(store) = inner.upgrade() else { return };
        let picked = {
            let shapes: Vec<&Shape> = waiting.iter().map(|m| &m.shape).collect();
            pick(&shapes, store.max_txn_ops, store.config.max_request_bytes)
        };
        let mut batch = Vec::with_capacity(picked.len());
        let mut rest = Vec::with_capacity(waiting.len() - picked.len());
        let mut next = picked.iter().peekable();
        for (i, m) in waiting.drain(..).enumerate() {
            if next.peek() == Some(&&i) {
                next.next();
                batch.push(m);
            } else {
                rest.push(m);
            }
        }
        waiting = rest;
        clean = 0;
        sent += 1;
        let id = sent;
        if let Ok(mut f) = flying.lock() {
            f.push((id, Taken::writes_of(&batch)));
        }
        let (answered, flying) = (answered.clone(), flying.clone());
        // Commits that met others (a batch of several, or one formed while
        // another was in flight) may be relayed; a lone commit on an idle
        // client goes to etcd at once.
        let busy = in_flight || batch.len() > 1;
        tokio::spawn(async move {
            send_batch(&store, batch, busy).await;
            if let Ok(mut f) = flying.lock() {
                f.retain(|(i, _)| *i != id);
            }
            drop(permit);
            answered.notify_one();
        });
    }
}

/// Sends `batch` and answers each member: through the relay when there is
/// one and the batch may go there ([`super::relay`]), else to etcd.
async fn send_batch(inner: &Inner, batch: Vec<Member>, busy: bool) {
    note_queued(&batch);
    // (a member with numbers to fill goes to the relay, busy or not)
    let filling = batch.iter().any(|m| !m.fills.is_empty());
    if let Some(relay) = super::relay::route(inner, &batch, busy || filling) {
        return super::relay::relay_batch(inner, batch, relay).await;
    }
    // Not to the relay as a whole (too large for half its limits, holding
    // groups relayed to this member, or a lone commit): its members with
    // numbers to fill go there alone, the others to etcd, at once (a
    // batch's members never conflict, so they may commit apart).
    let (fill, direct): (Vec<Member>, Vec<Member>) =
        batch.into_iter().partition(|m| !m.fills.is_empty());
    let relay = match fill.is_empty() {
        true => None,
        false => super::relay::route(inner, &fill, true),
    };
    match relay {
        Some(relay) if direct.is_empty() => super::relay::relay_batch(inner, fill, relay).await,
        Some(relay) => {
            tokio::join!(
                super::relay::relay_batch(inner, fill, relay),
                send_direct(inner, direct)
            );
        }
        None => send_apart(inner, fill, direct).await,
    }
}

/// Sends `batch` to etcd, but for its members with numbers to fill in,
/// which only a relay fills: they fail with [`StoreError::FillUnavailable`]
/// (nothing of them written; their callers commit with numbers of their own).
pub(super) async fn send_direct_unfilled(inner: &Inner, batch: Vec<Member>) {
    let (fill, direct): (Vec<Member>, Vec<Member>) =
        batch.into_iter().partition(|m| !m.fills.is_empty());
    send_apart(inner, fill, direct).await
}

/// [`send_direct_unfilled`] of a batch already split into its members
/// with numbers to fill (`fill`) and the others.
async fn send_apart(inner: &Inner, fill: Vec<Member>, direct: Vec<Member>) {
    for m in fill {
        m.answer(Outcome::Settled(Err(StoreError::FillUnavailable(
            "no relay to fill its numbers in now".into(),
        ))));
    }
    if !direct.is_empty() {
        send_direct(inner, direct).await
    }
}

/// Sends `batch` to etcd and answers each member.
pub(super) async fn send_direct(inner: &Inner, batch: Vec<Member>) {
    let timer = crate::trace::Timer::start_for(traces_of(&batch));
    let groups = batch.iter().filter(|m| m.relayed()).count();
    let what = move |n: usize, how: &str| {
        let of = match groups {
            0 => String::new(),
            g => format!(" ({g} of them groups relayed by other nodes)"),
        };
        format!(
            "{} in one Txn{of}: {how}",
            crate::trace::count(n as u64, "commit")
        )
    };
    if batch.len() == 1 {
        if let Some(m) = batch.into_iter().next() {
            let r = send_alone(inner, &m).await;
            timer.done("etcd Txn", || what(1, outcome_text(&r)));
            m.answer(r);
        }
        return;
    }
    let n = batch.len();
    let sent = send_nested(inner, &batch).await;
    timer.done("etcd Txn", || match &sent {
        Ok(o) => what(n, o.first().map(outcome_text).unwrap_or("answered")),
        Err(_) => what(n, "refused as a whole; its commits go one by one"),
    });
    match sent {
        Ok(outcomes) => {
            for (m, r) in batch.into_iter().zip(outcomes) {
                m.answer(r);
            }
        }
        Err(e) => {
            // Refused as a whole (not applied): each member alone.
            tracing::debug!(members = batch.len(), error = %e, "etcd refused a batch; committing its members one by one");
            let outcomes =
                futures::future::join_all(batch.iter().map(|m| send_alone(inner, m))).await;
            for (m, r) in batch.into_iter().zip(outcomes) {
                m.answer(r);
            }
        }
    }
}

/// How a traced commit's Txn ended, in a span's words.
fn outcome_text(o: &Outcome) -> &'static str {
    match o {
        Outcome::Answered(_, t) if t.succeeded => "applied",
        Outcome::Answered(..) => "answered (a compare failed)",
        Outcome::Settled(Ok(_)) => "applied (settled by its marker)",
        Outcome::Settled(Err(_)) => "not applied",
        Outcome::Unknown => "no answer",
    }
}

pub(super) fn time_limit(size: usize) -> std::time::Duration {
    REQUEST_TIMEOUT + TIMEOUT_PER_MB * u32::try_from(size >> 20).unwrap_or(16)
}

/// How a commit Txn ended when etcd did not answer it.
enum Unanswered {
    /// The outcome is unknown: resolve by the markers (sent at this time).
    Unknown(Instant),
    /// Refused or failed for sure: nothing was applied.
    Failed(StoreError),
    /// Etcd's database is full (the error): answered, applied or not; the
    /// commit marker settles which.
    Full(String),
}

/// Sends the Txn `build` makes for the current marker lease (renewing the
/// lease once if etcd lost it): its answer, or why there is none.
async fn send_txn(
    inner: &Inner,
    what: &str,
    size: usize,
    mut build: impl FnMut(i64) -> TxnRequest,
) -> Result<crate::etcd_rpc::TxnResponse, Unanswered> {
    let mut renewed = false;
    loop {
        let lease = inner.lease(renewed).await.map_err(Unanswered::Failed)?;
        let txn = build(lease);
        let sent = Instant::now();
        let i = inner.endpoints.current_index();
        let kv = inner.endpoints.clients[i].clone();
        let limit = time_limit(size);
        let outcome = tokio::time::timeout(limit, kv.txn(txn))
            .await
            .unwrap_or_else(|_| Err(timed_out(limit)));
        bump(&inner.counters.commit_txns, 1);
        bump(&inner.counters.commit_us, sent.elapsed().as_micros() as u64);
        match outcome {
            Ok(resp) => return Ok(resp),
            Err(e) => match classify(e, what) {
                Failure::LeaseNotFound if !renewed => {
                    tracing::debug!("commit-marker lease expired; granting a new one");
                    renewed = true;
                }
                Failure::NoSpace(msg) => return Err(Unanswered::Full(msg)),
                Failure::Transient(msg) => {
                    inner.endpoints.failed(i, &msg);
                    tracing::info!(endpoint = %inner.endpoints.names[i], error = %msg, "{what} outcome unknown; resolving by commit marker");
                    return Err(Unanswered::Unknown(sent));
                }
                Failure::Definite(StoreError::Io(msg)) if msg.contains("as too large") => {
                    tracing::warn!(error = %msg, "etcd refused a {what} as too large");
                    return Err(Unanswered::Failed(StoreError::TransactionTooLarge {
                        len: size,
                        max: inner.config.max_request_bytes,
                    }));
                }
                other => return Err(Unanswered::Failed(to_store_error(other))),
            },
        }
    }
}

/// One member as a Txn of its own.
async fn send_alone(inner: &Inner, m: &Member) -> Outcome {
    let guard = m.shape.deletes.then_some(inner.guard.as_slice());
    match send_txn(inner, "commit", m.shape.size, |lease| m.alone(lease, guard)).await {
        Ok(resp) => match header_revision(resp.header.as_ref()) {
            Ok(v) => Outcome::Answered(v, resp),
            Err(e) => Outcome::Settled(Err(e)),
        },
        Err(Unanswered::Unknown(_)) if m.relayed() => Outcome::Unknown,
        Err(Unanswered::Unknown(sent)) => Outcome::Settled(inner.resolve(&m.marker, sent).await),
        Err(Unanswered::Failed(e)) => Outcome::Settled(Err(e)),
        Err(Unanswered::Full(why)) => Outcome::Settled(inner.settle_answered(&m.marker, why).await),
    }
}

/// The members as nested Txns of one Txn: each member's outcome, or an error
/// when etcd refused the whole Txn (then nothing was applied).
async fn send_nested(inner: &Inner, batch: &[Member]) -> Result<Vec<Outcome>, StoreError> {
    let size: usize = batch.iter().map(|m| m.shape.size).sum();
    let deletes = batch.iter().any(|m| m.shape.deletes);
    tracing::trace!(members = batch.len(), "sending an etcd batch");
    let marker = inner.new_marker();
    // (built again for a renewed lease: the same layout, the lease is only
    // in the markers' puts)
    let mut layout = None;
    let sent = send_txn(inner, "commit batch", size, |lease| {
        let (txn, l) = batch_txn(inner, batch, &marker, deletes, lease);
        layout = Some(l);
        txn
    })
    .await;
    // (counted as sent: a Txn etcd refused as a whole is sent again member
    // by member, sharing nothing)
    if let (Some(l), false) = (&layout, matches!(sent, Err(Unanswered::Failed(_)))) {
        bump(&inner.counters.compares_shared, l.saved() as u64);
    }
    match sent {
        // the marker is fresh: only a fenced resend could fail its compare
        Ok(resp) if !resp.succeeded => Ok(batch
            .iter()
            .map(|_| Outcome::Settled(Err(StoreError::Conflict)))
            .collect()),
        Ok(resp) => {
            let version = header_revision(resp.header.as_ref())?;
            let answers = match &layout {
                Some(layout) => hoist::answers(layout, resp.responses),
                None => vec![None; batch.len()],
            };
            Ok(answers
                .into_iter()
                .map(|t| match t {
                    Some(t) => Outcome::Answered(version, t),
                    None => Outcome::Settled(Err(StoreError::Io(
                        "etcd answered a batch without a result per member".into(),
                    ))),
                })
                .collect())
        }
        Err(Unanswered::Unknown(sent)) => Ok(resolve_batch(inner, batch, &marker, sent).await),
        Err(Unanswered::Failed(e)) => Err(e),
        // answered: the batch's marker says whether it applied (absent:
        // refused as a whole; its members then go alone, and are refused)
        Err(Unanswered::Full(why)) => match inner.settle_answered(&marker, why).await {
            Ok(applied_at) => {
                Ok(members_applied_at(inner, batch, applied_at, Instant::now()).await)
            }
            // The marker could not be read: the batch may have applied (the
            // Txn that crosses the quota is), so its members must not go
            // again alone, which "refused as a whole" would do.
            Err(StoreError::MaybeCommitted) => Ok(batch
                .iter()
                .map(|_| Outcome::Settled(Err(StoreError::MaybeCommitted)))
                .collect()),
            Err(e) => Err(e),
        },
    }
}

/// The Txn of a batch under the commit marker `marker` (module docs), and
/// where each member's answer will be in etcd's.
fn batch_txn(
    inner: &Inner,
    batch: &[Member],
    marker: &[u8],
    deletes: bool,
    lease: i64,
) -> (TxnRequest, hoist::Layout) {
    let guard = deletes.then_some(inner.guard.as_slice());
    members_txn(batch, marker, lease, guard, Some(inner.max_txn_ops))
}

/// The members' nested Txns under the commit marker `marker` (putting
/// `guard` too, when given), the compares they share gathered ([`hoist`])
/// within `budget` operations, or as given without one; and where each
/// member's answer will be. A node's batch and the group it relays.
pub(super) fn members_txn(
    batch: &[Member],
    marker: &[u8],
    lease: i64,
    guard: Option<&[u8]>,
    budget: Option<usize>,
) -> (TxnRequest, hoist::Layout) {
    let members = batch.iter().map(|m| m.nested(lease)).collect();
    let (mut success, layout) = match budget {
        // around the members: the marker's put, and the guard's
        Some(budget) => hoist::hoist(members, 1 + usize::from(guard.is_some()), budget),
        None => hoist::as_given(members),
    };
    if let Some(g) = guard {
        success.push(RequestOp::put(g.to_vec(), Vec::new(), 0));
    }
    (under_marker(success, marker, lease), layout)
}

/// The Txn that runs `success` once, under the commit marker `marker`: it
/// applies only while the marker is absent, and puts it (with `lease`).
pub(super) fn under_marker(mut success: Vec<RequestOp>, marker: &[u8], lease: i64) -> TxnRequest {
    success.push(RequestOp::put(
        marker.to_vec(),
        MARKER_COMMITTED.to_vec(),
        lease,
    ));
    TxnRequest {
        compare: vec![Compare::create_revision(
            marker.to_vec(),
            compare_result::EQUAL,
            0,
        )],
        success,
        failure: Vec::new(),
    }
}

/// Each member's outcome of a batch sent under `marker` whose answer was
/// lost (module docs): the batch is resolved by its marker, then each
/// member by the revision of its first put key (or by its own marker). A
/// relayed group is left to its sender, which resolves it by its own marker.
pub(super) async fn resolve_batch(
    inner: &Inner,
    batch: &[Member],
    marker: &[u8],
    sent: Instant,
) -> Vec<Outcome> {
    let local = batch.iter().any(|m| !m.relayed());
    let applied_at = if local {
        inner.resolve(marker, sent).await
    } else {
        Err(StoreError::MaybeCommitted)
    };
    let applied_at = match applied_at {
        Ok(v) => v,
        // fenced, or still unknown: the same for every member
        Err(e) => {
            return batch
                .iter()
                .map(|m| match m.relayed() {
                    true => Outcome::Unknown,
                    false => Outcome::Settled(Err(e.clone())),
                })
                .collect();
        }
    };
    members_applied_at(inner, batch, applied_at, sent).await
}

/// Each member's outcome of a batch that applied at `applied_at`: by the
/// revision of its first put key (or by its own marker); a relayed one is
/// left to its sender.
async fn members_applied_at(
    inner: &Inner,
    batch: &[Member],
    applied_at: Version,
    sent: Instant,
) -> Vec<Outcome> {
    futures::future::join_all(batch.iter().map(|m| async move {
        if m.relayed() {
            return Outcome::Unknown;
        }
        Outcome::Settled(match &m.first_put {
            Some(key) => inner.modified_at(key, applied_at).await,
            None => inner.resolve(&m.marker, sent).await,
        })
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn r(a: &str, b: &str) -> KeyRange {
        (a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    fn shape(reads: &[KeyRange], writes: &[KeyRange]) -> Shape {
        Shape {
            reads: reads.to_vec(),
            writes: writes.to_vec(),
            ops: 3,
            deletes: false,
            size: 100,
        }
    }

    #[test]
    fn conflicting_members_never_share_a_batch() {
        let a = shape(&[r("a", "b")], &[r("x", "y")]);
        let reads_a_write = shape(&[r("x0", "x1")], &[r("m", "n")]);
        let writes_a_read = shape(&[r("q", "r")], &[r("a0", "a1")]);
        let same_write = shape(&[], &[r("x", "x\0")]);
        let free = shape(&[r("c", "d")], &[r("e", "f")]);
        let free_too = shape(&[r("c", "d")], &[r("g", "h")]);
        let q = [
            &a,
            &reads_a_write,
            &writes_a_read,
            &same_write,
            &free,
            &free_too,
        ];
        assert_eq!(pick(&q, 128, 1 << 20), vec![0, 4, 5]);
        // The next batch starts with what was left, and still checks pairs.
        let q2 = [&reads_a_write, &writes_a_read, &same_write];
        assert_eq!(pick(&q2, 128, 1 << 20), vec![0, 1, 2]);
        let q3 = [&writes_a_read, &a];
        assert_eq!(pick(&q3, 128, 1 << 20), vec![0]);
        // Reading each other's keys is fine; two writers of one key are not.
        let r1 = shape(&[r("k", "l")], &[]);
        let r2 = shape(&[r("k", "l")], &[]);
        assert_eq!(pick(&[&r1, &r2], 128, 1 << 20), vec![0, 1]);
    }

    /// The indexed check admits exactly what the pairwise rule does, on
    /// random mixes of single keys and spans over a small key space.
    #[test]
    fn indexed_pick_matches_the_pairwise_rule() {
        let mut next = super::super::test_rng(0x9e37_79b9_7f4a_7c15);
        for _round in 0..300 {
            let mut shapes = Vec::new();
            for _ in 0..(1 + next(40)) {
                let (rn, wn) = (next(5), next(4));
                let mut ranges = |count: u64| {
                    let mut out = Vec::new();
                    for _ in 0..count {
                        let k = vec![b'a' + next(12) as u8];
                        let e = if next(4) == 0 {
                            vec![k[0] + 1 + next(3) as u8]
                        } else {
                            [k.as_slice(), &[0]].concat()
                        };
                        out.push((k, e));
                    }
                    out
                };
                let reads = ranges(rn);
                let writes = ranges(wn);
                shapes.push(shape(&reads, &writes));
            }
            let q: Vec<&Shape> = shapes.iter().collect();
            let got = pick(&q, 100_000, 1 << 30);
            let mut want: Vec<usize> = Vec::new();
            for (i, s) in q.iter().enumerate() {
                if want.iter().all(|&j| compatible(q[j], s)) {
                    want.push(i);
                }
            }
            assert_eq!(got, want, "{shapes:?}");
        }
    }

    #[test]
    fn batches_stay_inside_etcd_limits() {
        let shapes: Vec<Shape> = (0..300)
            .map(|i| {
                shape(
                    &[],
                    &[(
                        vec![i as u8, (i >> 8) as u8],
                        vec![i as u8, (i >> 8) as u8, 0],
                    )],
                )
            })
            .collect();
        let q: Vec<&Shape> = shapes.iter().collect();
        // 128 ops: n members, the batch marker and their 3 ops each must fit.
        let p = pick(&q, 128, 1 << 20);
        assert_eq!(p.len(), 124);
        assert_eq!(pick(&q, 100_000, 1 << 20).len(), MAX_BATCH);
        assert_eq!(pick(&q, 4096, 1000).len(), 10);
        // One too wide for any company still goes out, alone.
        let wide = Shape {
            ops: 128,
            ..shape(&[], &[r("z", "zz")])
        };
        assert_eq!(pick(&[&wide, q[0]], 128, 1 << 20), vec![0]);
    }

    /// Against a live cluster (`CAPSTAN_ETCD_ENDPOINTS`; skipped without it):
    /// members whose shared compares are checked once ([`hoist`]) apply
    /// exactly as each would alone: those whose compares all hold, and no
    /// other — a failed shared compare fails every member that shares it,
    /// a failed compare of its own only that member.
    #[tokio::test]
    async fn gathered_members_apply_exactly_as_alone() {
        let Ok(eps) = std::env::var("CAPSTAN_ETCD_ENDPOINTS") else {
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            return;
        };
        let id = String::from_utf8(super::super::random_id()).unwrap();
        let store =
            super::super::EtcdStore::open(&format!("etcd://{eps}/capstan-test/gather-{id}"))
                .await
                .unwrap();
        let inner = &store.inner;
        let client = inner.endpoints.clients[0].clone();
        let put = client
            .txn(TxnRequest {
                compare: Vec::new(),
                success: vec![RequestOp::put(inner.dk(b"mark"), b"1".to_vec(), 0)],
                failure: Vec::new(),
            })
            .await
            .unwrap();
        let at = put.header.unwrap().revision;
        let modified = |k: &str, rev: i64| {
            Compare::mod_revision(inner.dk(k.as_bytes()), compare_result::EQUAL, rev)
        };
        let mut replies = Vec::new();
        let mut member = |compares: Vec<Compare>, key: &str| {
            let (reply, rx) = oneshot::channel();
            replies.push(rx);
            Member {
                compares,
                writes: vec![RequestOp::put(inner.dk(key.as_bytes()), b"1".to_vec(), 0)],
                marker: inner.new_marker(),
                first_put: Some(inner.dk(key.as_bytes())),
                shape: Shape::default(),
                reply: Reply::Local(reply),
                traced: None,
                fills: Vec::new(),
            }
        };
        let batch = vec![
            // share a compare that holds
            member(vec![modified("mark", at), modified("a", 0)], "a"),
            member(vec![modified("mark", at), modified("b", 0)], "b"),
            // ... and one whose own compare fails
            member(vec![modified("mark", at), modified("mark", at + 100)], "c"),
            // share a compare that fails
            member(vec![modified("gone", 3), modified("d", 0)], "d"),
            member(vec![modified("gone", 3), modified("e", 0)], "e"),
            // shares nothing
            member(vec![modified("f", 0)], "f"),
        ];
        let (txn, _) = batch_txn(inner, &batch, b"m", false, 0);
        // the members and the marker's put: fewer operations when gathered
        let slots = txn.success.len() - 1;
        assert!(slots < batch.len(), "the members were gathered");
        send_direct(inner, batch).await;
        let mut got = Vec::new();
        for rx in replies {
            got.push(rx.await.unwrap().is_ok());
        }
        assert_eq!(got, vec![true, true, false, false, false, true]);
        let snap = store.snapshot().await.unwrap();
        for (k, there) in [
            ("a", true),
            ("b", true),
            ("c", false),
            ("d", false),
            ("e", false),
            ("f", true),
        ] {
            assert_eq!(
                snap.get(k.as_bytes()).await.unwrap().is_some(),
                there,
                "{k}"
            );
        }
    }

    /// Against a live cluster (`CAPSTAN_ETCD_ENDPOINTS`; skipped without it):
    /// a batch whose answer was lost is resolved member by member. Never
    /// sent: fenced, every member retries and the late Txn changes nothing.
    /// Applied: the member whose compare held is committed at the batch's
    /// revision, the one whose compare failed is not, and a member that puts
    /// nothing is told by its own marker.
    #[tokio::test]
    async fn a_lost_batch_is_resolved_member_by_member() {
        let Ok(eps) = std::env::var("CAPSTAN_ETCD_ENDPOINTS") else {
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            return;
        };
        let id = String::from_utf8(super::super::random_id()).unwrap();
        let store = super::super::EtcdStore::open(&format!("etcd://{eps}/capstan-test/batch-{id}"))
            .await
            .unwrap();
        let inner = &store.inner;
        let member = |compare_at: i64, writes: Vec<RequestOp>, first_put: Option<&[u8]>| {
            let (reply, _rx) = oneshot::channel();
            Member {
                compares: vec![Compare::mod_revision(
                    inner.dk(b"watched"),
                    compare_result::EQUAL,
                    compare_at,
                )],
                writes,
                marker: inner.new_marker(),
                first_put: first_put.map(|k| inner.dk(k)),
                shape: Shape::default(),
                reply: Reply::Local(reply),
                traced: None,
                fills: Vec::new(),
            }
        };
        // what a local member is told after a resolution
        let settled = |o: Vec<Outcome>| -> Vec<Result<Version, StoreError>> {
            o.into_iter()
                .map(|o| match o {
                    Outcome::Settled(r) => r,
                    _ => panic!("a resolved local member is settled"),
                })
                .collect()
        };
        let batch_of = || {
            vec![
                // holds: "watched" is absent (mod revision 0)
                member(
                    0,
                    vec![RequestOp::put(inner.dk(b"held"), b"1".to_vec(), 0)],
                    Some(b"held"),
                ),
                // fails
                member(
                    7,
                    vec![RequestOp::put(inner.dk(b"failed"), b"1".to_vec(), 0)],
                    Some(b"failed"),
                ),
                // holds, and puts nothing
                member(
                    0,
                    vec![RequestOp::delete(inner.dk(b"gone"), Vec::new())],
                    None,
                ),
            ]
        };
        let lease = inner.lease(false).await.unwrap();
        let client = inner.endpoints.clients[0].clone();

        let lost = batch_of();
        let marker = inner.new_marker();
        let outcomes = settled(resolve_batch(inner, &lost, &marker, Instant::now()).await);
        assert_eq!(outcomes, vec![Err(StoreError::Conflict); 3]);
        let late = client
            .txn(batch_txn(inner, &lost, &marker, true, lease).0)
            .await
            .unwrap();
        assert!(!late.succeeded, "a fenced batch applied");
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.get(b"held").await.unwrap(), None);

        let applied = batch_of();
        let marker = inner.new_marker();
        let resp = client
            .txn(batch_txn(inner, &applied, &marker, true, lease).0)
            .await
            .unwrap();
        assert!(resp.succeeded);
        let at = super::super::rev(resp.header.unwrap().revision);
        let outcomes = settled(resolve_batch(inner, &applied, &marker, Instant::now()).await);
        assert_eq!(
            outcomes,
            vec![Ok(at), Err(StoreError::Conflict), Ok(at)],
            "each member's outcome as etcd applied it"
        );
        // a later write of the applied member's key does not change the answer
        let again = client
            .txn(TxnRequest {
                compare: Vec::new(),
                success: vec![RequestOp::put(inner.dk(b"held"), b"2".to_vec(), 0)],
                failure: Vec::new(),
            })
            .await
            .unwrap();
        assert!(again.succeeded);
        assert_eq!(
            settled(resolve_batch(inner, &applied, &marker, Instant::now()).await),
            vec![Ok(at), Err(StoreError::Conflict), Ok(at)]
        );
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.get(b"failed").await.unwrap(), None);
    }
}
