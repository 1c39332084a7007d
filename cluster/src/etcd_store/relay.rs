//! Relayed commits on etcd ([`crate::relay`]): a node's batch goes to the
//! member that merges commits, as one *group*, and shares that member's Txn.
//!
//! A group is the Txn of a batch under its sender's commit marker `G`, with
//! no deletion guard:
//!
//! ```text
//! Txn { compare: [create_revision(G) == 0],
//!       success: [ Txn{compare: c1, success: w1}, …, put(G) ] }
//! ```
//!
//! The relay takes it as one member of its own batch (whose outer Txn nests
//! it once more, and puts the guard when a group deletes): so a group
//! applies exactly when the relay's Txn does and `G` is absent, and each of
//! its members on its own compares, as in a batch of the sender's. The
//! answer is the relay's Txn's revision and the group's nested answer,
//! which the sender reads as it reads a batch's answer.
//!
//! An unanswered group (the relay died or was cut off, the answer was lost,
//! no answer within [`RELAY_WAIT`]) is resolved by its sender by `G`, as a batch by its
//! marker: `G` absent, the sender fences it, and the group fails its compare
//! should it reach etcd later; present, it applied, and each member is
//! settled by its first key's revision. A group the relay says it did not
//! apply (refused by the relay or by etcd; nothing of it reached etcd) is
//! sent to etcd by its sender. After either, the sender commits alone for
//! [`RELAY_PAUSE`].
//!
//! The relay checks a group before taking it: its keys inside this store's
//! data and markers (none of another prefix, the guard's put, the meta key),
//! the form above, and its operations and bytes within half the store's
//! limits so that it fits a Txn beside others. Etcd checks each nested Txn
//! against the operations its parents left; [`Shape::ops`] of a group is its
//! own operations plus its widest member's, which [`super::batch::pick`]
//! adds to the outer Txn's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::oneshot;

use super::batch::{self, Member, Outcome, Reply, Shape};
use super::hoist;
use super::{Inner, KeyRange, MARKER_COMMITTED, bump, header_revision};
use crate::etcd_rpc::{
    Compare, Request, ResponseHeader, TargetUnion, TxnRequest, TxnResponse, compare_result,
    compare_target,
};
use crate::relay::{CommitRelay, FillAnswer, FilledFuture, GroupFill, MAX_GROUP_FILLS, RelayError};
use crate::store::{StoreError, key_after};

/// How long a client commits on its own after its relay failed.
pub const RELAY_PAUSE: Duration = Duration::from_secs(2);
/// How long a client's groups go without shared compares gathered after a
/// relay refused one that had them (a cluster being upgraded: a relay from
/// before gathering takes only puts and deletes in a group's members).
pub const FLAT_GROUPS_AFTER_REFUSAL: Duration = Duration::from_secs(60);
/// Longest wait for a relay's answer (a busy relay answers within tens of
/// milliseconds): a relay killed mid-call answers nothing, and the sender
/// resolves the group by its marker after this.
pub const RELAY_WAIT: Duration = Duration::from_secs(1);

/// The relay `batch` goes through, if any: one is set, the client's last
/// relayed group did not fail within [`RELAY_PAUSE`], the batch met other
/// commits (`busy`: a lone commit on an idle client goes to etcd at once,
/// a hop sooner) unless the relay is eager, it holds no group relayed to
/// this client (a group is relayed once), and it fits half the limits.
pub(super) fn route(inner: &Inner, batch: &[Member], busy: bool) -> Option<Arc<dyn CommitRelay>> {
    let relay = inner.relay.read().ok()?.clone()?;
    if !(busy || relay.eager()) || inner.relay_paused() {
        return None;
    }
    if batch.iter().any(|m| matches!(m.reply, Reply::Relayed(_))) {
        return None;
    }
    let widest = batch.iter().map(|m| m.shape.ops).max().unwrap_or(0);
    let size: usize = batch.iter().map(|m| m.shape.size).sum();
    if batch.len() + 1 + widest > inner.max_txn_ops / 2 || size > inner.config.max_request_bytes / 2
    {
        return None;
    }
    Some(relay)
}

/// Counts a group among the client's relayed groups in flight while it
/// lives, and notes when the last one was answered.
struct Relaying<'a>(&'a Inner);

impl<'a> Relaying<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner
            .relaying
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Relaying(inner)
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        let ms = self.0.started.elapsed().as_millis() as u64 + 1;
        self.0
            .relayed_at_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        self.0
            .relaying
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A time until which something holds (a pause after a relay failed),
/// set and read from any task.
#[derive(Default)]
pub(super) struct Until(std::sync::Mutex<Option<Instant>>);

impl Until {
    /// Whether that time is still ahead.
    pub(super) fn active(&self) -> bool {
        self.0
            .lock()
            .is_ok_and(|u| u.is_some_and(|u| Instant::now() < u))
    }

    /// Holds for `d` from now.
    pub(super) fn hold_for(&self, d: Duration) {
        if let Ok(mut u) = self.0.lock() {
            *u = Some(Instant::now() + d);
        }
    }
}

/// Sends `batch` through `relay` as one group and answers each member
/// (module docs for what an unanswered or refused group becomes).
pub(super) async fn relay_batch(inner: &Inner, batch: Vec<Member>, relay: Arc<dyn CommitRelay>) {
    let Ok(lease) = inner.lease(false).await else {
        return batch::send_direct_unfilled(inner, batch).await;
    };
    let marker = inner.new_marker();
    // its members' shared compares gathered within half of etcd's
    // operations (what a relay takes), unless a relay refused that lately
    let budget = (!inner.flat_groups()).then_some(inner.max_txn_ops / 2);
    let (group, layout) = batch::members_txn(&batch, &marker, lease, None, budget);
    let group = group.encode_to_vec();
    // (the relay call carries the traces its members work for)
    let timer = crate::trace::Timer::start_for(
        batch
            .iter()
            .filter_map(|m| m.traced.as_ref())
            .flat_map(|t| t.0.iter().copied())
            .collect(),
    );
    let fills = group_fills(&batch);
    let call = crate::trace::sync_scope(timer.traces(), || -> Option<FilledFuture> {
        if fills.is_empty() {
            let call = relay.relay(group)?;
            Some(Box::pin(async move { call.await.map(|a| (a, Vec::new())) }))
        } else {
            relay.relay_filled(group, fills.clone())
        }
    });
    let Some(call) = call else {
        return batch::send_direct_unfilled(inner, batch).await;
    };
    bump(&inner.counters.relayed_out, 1);
    let _relaying = Relaying::new(inner);
    let sent = Instant::now();
    let size: usize = batch.iter().map(|m| m.shape.size).sum();
    let limit = batch::time_limit(size).min(RELAY_WAIT);
    let answer = tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| {
            Err(RelayError::Unknown(format!(
                "no answer within {} ms",
                limit.as_millis()
            )))
        })
        .and_then(|(a, filled)| {
            let outcomes = read_answer(&a, &layout)?;
            if filled.len() != fills.len() {
                return Err(RelayError::Unknown(format!(
                    "the relay filled {} of {} sequences",
                    filled.len(),
                    fills.len()
                )));
            }
            Ok((outcomes, filled))
        });
    bump(&inner.counters.relay_us, sent.elapsed().as_micros() as u64);
    let n = batch.len();
    timer.done("relayed group's round trip", || {
        let how = match &answer {
            Ok(_) => "answered".to_string(),
            Err(e) => e.to_string(),
        };
        format!(
            "{} of this node in one group to the relay: {how}",
            crate::trace::count(n as u64, "commit")
        )
    });
    // (a group the relay did not apply is committed again by this node,
    // which counts what that Txn shares)
    if !matches!(answer, Err(RelayError::NotApplied(_))) {
        bump(&inner.counters.compares_shared, layout.saved() as u64);
    }
    let outcomes = match answer {
        Ok((o, filled)) => {
            let n = note_filled(&batch, &o, &fills, &filled);
            bump(&inner.counters.commits_filled, n);
            o
        }
        Err(RelayError::NotApplied(e)) => {
            if layout.saved() > 0 {
                inner.flatten_groups(&e);
            }
            inner.pause_relay(&e);
            return batch::send_direct_unfilled(inner, batch).await;
        }
        // (the relay is fine: it only fills no numbers in)
        Err(RelayError::NoFill(e)) => {
            tracing::debug!(error = %e, "the relay filled no numbers in");
            return batch::send_direct_unfilled(inner, batch).await;
        }
        Err(RelayError::Unknown(e)) => {
            inner.pause_relay(&e);
            tracing::info!(error = %e, "relayed commits unanswered; resolving by their marker");
            // (the batch holds no relayed group: every member is resolved)
            batch::resolve_batch(inner, &batch, &marker, sent).await
        }
    };
    for (m, o) in batch.into_iter().zip(outcomes) {
        m.answer(o);
    }
}

/// The numbers the members of `batch` ask the relay to fill in, by
/// sequence (in the order of the members and of their fills).
fn group_fills(batch: &[Member]) -> Vec<GroupFill> {
    GroupFill::gather(batch.iter().flat_map(|m| &m.fills))
}

/// Tells each member of `batch` that applied the numbers the relay filled
/// in for it (`filled`: the first of each of `fills`, in order).
/// How many members it told.
fn note_filled(
    batch: &[Member],
    outcomes: &[Outcome],
    fills: &[GroupFill],
    filled: &[FillAnswer],
) -> u64 {
    let mut told = 0;
    for (m, o) in batch.iter().zip(outcomes) {
        if !matches!(o, Outcome::Answered(_, t) if t.succeeded) {
            continue;
        }
        for f in &m.fills {
            let got = fills.iter().zip(filled).find_map(|(g, a)| {
                let i = g.placeholders.iter().position(|p| *p == f.placeholder)?;
                Some(crate::store::FilledNumber {
                    number: a.first + i as u64,
                    notes: a.notes.clone(),
                })
            });
            if let Some(got) = got {
                let _ = f.filled.set(got);
                told += 1;
            }
        }
    }
    told
}

/// Each member's outcome from the relay's answer to a group laid out as
/// `layout`.
fn read_answer(answer: &[u8], layout: &hoist::Layout) -> Result<Vec<Outcome>, RelayError> {
    let unreadable = |why: &str| RelayError::Unknown(format!("the relay's answer {why}"));
    let resp = TxnResponse::decode(answer).map_err(|_| unreadable("is not an etcd Txn answer"))?;
    let version =
        header_revision(resp.header.as_ref()).map_err(|_| unreadable("has no revision"))?;
    if !resp.succeeded {
        // its marker was there already: no member applied
        return Ok((0..layout.members())
            .map(|_| Outcome::Settled(Err(StoreError::Conflict)))
            .collect());
    }
    hoist::answers(layout, resp.responses)
        .into_iter()
        .map(|t| match t {
            Some(t) => Ok(Outcome::Answered(version, t)),
            None => Err(unreadable("lacks a result per member")),
        })
        .collect()
}

impl Inner {
    pub(super) fn relay_paused(&self) -> bool {
        self.relay_paused_until.active()
    }

    /// Whether groups go without shared compares gathered, for now.
    fn flat_groups(&self) -> bool {
        self.flat_groups_until.active()
    }

    /// A relay refused a group with shared compares gathered (`why`): likely
    /// a member from before relays took them. Groups go as their members
    /// were, which every relay takes, for [`FLAT_GROUPS_AFTER_REFUSAL`].
    fn flatten_groups(&self, why: &str) {
        tracing::info!(error = %why, "the relay refused a group with shared compares (a member running an older Capstan?); relaying groups without them for a while");
        self.flat_groups_until.hold_for(FLAT_GROUPS_AFTER_REFUSAL);
    }

    fn pause_relay(&self, why: &str) {
        tracing::debug!(error = %why, "relay failed; committing alone for a while");
        bump(&self.counters.relay_failures, 1);
        self.relay_paused_until.hold_for(RELAY_PAUSE);
    }

    /// [`commit_relayed`](Self::commit_relayed) of a group whose numbers
    /// this member fills in first: each of `fills` gets that many numbers
    /// from the filler, written over its placeholders (every occurrence, in
    /// keys and values, the same length), then the group is committed. The
    /// numbers of a group that then does not apply are not handed out
    /// again (an inbox tolerates such gaps, as it does a reservation whose
    /// commit failed).
    pub(super) async fn commit_relayed_filled(
        &self,
        mut group: Vec<u8>,
        fills: Vec<GroupFill>,
    ) -> Result<(Vec<u8>, Vec<FillAnswer>), RelayError> {
        let filler = self
            .filler
            .read()
            .ok()
            .and_then(|f| f.clone())
            .ok_or_else(|| RelayError::NoFill("this member hands out no numbers".into()))?;
        let placeholders: usize = fills.iter().map(|f| f.placeholders.len()).sum();
        if fills.is_empty() || fills.len() > MAX_GROUP_FILLS || placeholders > MAX_GROUP_FILLS {
            return Err(RelayError::NotApplied(format!(
                "refused a relayed group: 1 to {MAX_GROUP_FILLS} numbers to fill in, not {placeholders}"
            )));
        }
        // every placeholder in the group, found in one pass (written over
        // with itself)
        let asked: rustc_hash::FxHashMap<u64, u64> = fills
            .iter()
            .flat_map(|f| &f.placeholders)
            .map(|p| (*p, *p))
            .collect();
        let found = crate::store::replace_placeholders(&mut group, &asked);
        if asked.len() != placeholders
            || found.len() != placeholders
            || asked.keys().any(|p| p >> 63 == 0)
        {
            return Err(RelayError::NotApplied(
                "refused a relayed group: a number to fill in has no placeholder in it, or one twice".into(),
            ));
        }
        let mut numbers = rustc_hash::FxHashMap::default();
        let mut answers = Vec::with_capacity(fills.len());
        for f in &fills {
            let timer = crate::trace::Timer::start();
            let a = filler.fill(&f.scope, f.placeholders.len() as u32).await;
            timer.done("numbers filled in at the relay", || {
                let of: String = f.scope.iter().take(4).map(|b| format!("{b:02x}")).collect();
                let n = crate::trace::count(f.placeholders.len() as u64, "number");
                match &a {
                    Ok(a) => format!("{n} from {} in {of}'s inbox", a.first),
                    Err(e) => format!("{n} in {of}'s inbox: {e}"),
                }
            });
            let a = a.map_err(RelayError::NoFill)?;
            bump(&self.counters.filled_in, f.placeholders.len() as u64);
            for (i, p) in f.placeholders.iter().enumerate() {
                numbers.insert(*p, a.first + i as u64);
            }
            answers.push(a);
        }
        crate::store::replace_placeholders(&mut group, &numbers);
        let answer = self.commit_relayed(group).await?;
        Ok((answer, answers))
    }

    /// Commits a group another member relayed, with this client's next
    /// batch: etcd's answer to it, encoded (module docs).
    pub(super) async fn commit_relayed(&self, group: Vec<u8>) -> Result<Vec<u8>, RelayError> {
        let arrived = Instant::now();
        let (txn, shape) = parse_group(self, &group)
            .map_err(|e| RelayError::NotApplied(format!("refused a relayed group: {e}")))?;
        // (parse_group checked that the one compare is the marker's)
        let marker = txn.compare[0].key.clone();
        let (tx, rx) = oneshot::channel();
        let m = Member {
            compares: txn.compare,
            writes: txn.success,
            marker,
            first_put: None,
            shape,
            reply: Reply::Relayed(tx),
            traced: super::batch::traced_now(),
            fills: Vec::new(),
        };
        self.committer
            .queue(m)
            .await
            .map_err(|e| RelayError::NotApplied(e.to_string()))?;
        bump(&self.counters.relayed_in, 1);
        let answer = rx.await;
        bump(
            &self.counters.relayed_in_us,
            arrived.elapsed().as_micros() as u64,
        );
        let (version, t) =
            answer.map_err(|_| RelayError::Unknown("the etcd committer stopped".into()))??;
        self.saw(version);
        Ok(TxnResponse {
            header: Some(ResponseHeader {
                revision: i64::try_from(version).unwrap_or(i64::MAX),
                ..Default::default()
            }),
            succeeded: t.succeeded,
            responses: t.responses,
        }
        .encode_to_vec())
    }
}

/// Whether `c` is `create_revision(key) == 0` of a single key.
fn is_absent_check(c: &Compare) -> bool {
    c.target == compare_target::CREATE
        && c.result == compare_result::EQUAL
        && c.target_union == Some(TargetUnion::CreateRevision(0))
        && c.range_end.is_empty()
}

/// The user key range of the etcd range `[key, end)` (`end` empty: the key
/// alone), if it lies in the data of the store `inner`.
fn data_range(inner: &Inner, key: &[u8], end: &[u8]) -> Option<KeyRange> {
    let k = key.strip_prefix(inner.data.as_slice())?;
    let e = if end.is_empty() {
        key_after(k)
    } else {
        end.strip_prefix(inner.data.as_slice())?.to_vec()
    };
    Some((k.to_vec(), e))
}

/// Adds what the member `t` of a group reads and writes to `shape`, having
/// checked it: compares of this store's keys, no failure branch, puts and
/// deletes of its data (markers: puts only); or a gathering of members
/// under their shared compares ([`hoist`]), `levels` deep at most.
fn member_shape(
    inner: &Inner,
    t: &TxnRequest,
    shape: &mut Shape,
    levels: usize,
) -> Result<(), String> {
    if !t.failure.is_empty() {
        return Err("a member has no failure branch".into());
    }
    for c in &t.compare {
        if let Some(r) = data_range(inner, &c.key, &c.range_end) {
            shape.reads.push(r);
        } else if !(c.range_end.is_empty()
            && (c.key.starts_with(&inner.markers) || c.key == inner.guard))
        {
            return Err("a member compares a key outside the store".into());
        }
    }
    for w in &t.success {
        match &w.request {
            Some(Request::Put(p)) => {
                if let Some(r) = data_range(inner, &p.key, &[]) {
                    shape.writes.push(r);
                } else if !p.key.starts_with(&inner.markers) {
                    return Err("a member puts a key outside the store's data".into());
                }
            }
            Some(Request::DeleteRange(d)) => {
                let r = data_range(inner, &d.key, &d.range_end)
                    .ok_or("a member deletes outside the store's data")?;
                shape.writes.push(r);
                shape.deletes = true;
            }
            Some(Request::Txn(m)) if levels > 0 => member_shape(inner, m, shape, levels - 1)?,
            _ => return Err("a member puts and deletes only".into()),
        }
    }
    Ok(())
}

/// `group` decoded and checked (module docs), with its shape for batching.
fn parse_group(inner: &Inner, group: &[u8]) -> Result<(TxnRequest, Shape), String> {
    if group.len() > inner.config.max_request_bytes / 2 {
        return Err(format!(
            "{} bytes, more than half of a request",
            group.len()
        ));
    }
    let txn = TxnRequest::decode(group).map_err(|e| format!("not an etcd Txn: {e}"))?;
    let [check] = txn.compare.as_slice() else {
        return Err("a group compares its marker alone".into());
    };
    if !is_absent_check(check) || !check.key.starts_with(&inner.markers) {
        return Err("a group checks that its commit marker is absent".into());
    }
    let Some((last, members)) = txn.success.split_last() else {
        return Err("a group has no operations".into());
    };
    match &last.request {
        Some(Request::Put(p)) if p.key == check.key && p.value == MARKER_COMMITTED => {}
        _ => return Err("a group ends by putting its commit marker".into()),
    }
    if !txn.failure.is_empty() || members.is_empty() {
        return Err("a group has members and no failure branch".into());
    }
    let mut shape = Shape {
        size: group.len(),
        ..Shape::default()
    };
    for op in members {
        let Some(Request::Txn(t)) = &op.request else {
            return Err("a group's members are Txns".into());
        };
        member_shape(inner, t, &mut shape, hoist::LEVELS)?;
    }
    shape.ops = hoist::need(&txn);
    if shape.ops > inner.max_txn_ops / 2 {
        return Err(format!(
            "{} operations, more than half of a Txn's",
            shape.ops
        ));
    }
    Ok((txn, shape))
}
