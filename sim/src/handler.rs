//! Guest-like handlers: a Rust closure standing in for a guest's component,
//! driven the way `capstan_actors::guest::runner` drives components.
//!
//! On every node, for every guest, a task asks who owns the guest (claiming
//! it when nobody live does, as the guest resumer does) and, while this node
//! owns it, drains its inbox: it lists the messages from the guest's
//! "handled up to" mark, asks [`Holes`] what to do (handle the run that
//! follows the mark without a gap, wait at a gap, close a hole after the
//! grace), handles each message and moves the mark past it in the same
//! transaction as the handler's effect, fenced by the placement it holds.
//! A request is answered first (a derived request id makes a re-run answer
//! once), as a guest calling `resolve` does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_actors::cluster::{Fence, Membership, Owner};
use capstan_actors::records::MessageRec;
use capstan_actors::rules::inbox::{Holes, Step};
use capstan_actors::{AgentHandle, Error};
use capstan_cluster::{Db, RangeOption};
use capstan_proto::{FormulaId, RequestId};

use crate::check::{Handled, Model, keys, workload_id};

/// How often an idle handler task looks at its guest again.
pub const POLL: Duration = Duration::from_millis(100);
/// Messages listed per look.
const BATCH: usize = 16;

/// One guest, as a node's handler task sees it.
#[derive(Clone)]
pub struct GuestSlot {
    pub index: usize,
    /// Handle past gaps (see [`crate::Config::faulty_handlers`]).
    pub faulty: bool,
    pub id: FormulaId,
    /// The guest acting as itself on this node (it answers requests).
    pub handle: AgentHandle,
}

/// Serves guest `g` on a node for as long as the node lives.
pub async fn serve_guest(db: Db, m: Arc<Membership>, g: GuestSlot, model: Arc<Mutex<Model>>) {
    loop {
        tokio::time::sleep(POLL).await;
        if !m.serving() {
            continue;
        }
        // As the guest resumer: a cached owner that died since is asked
        // about again (then claimed if nobody live holds it).
        let live = m.members();
        let owner = match m.owner(&db, g.id).await {
            Ok(Owner::Other(o)) if !live.iter().any(|l| l.name == o.name && l.epoch == o.epoch) => {
                m.forget_owner(&g.id);
                m.owner(&db, g.id).await
            }
            other => other,
        };
        match owner {
            Ok(Owner::Me) => {}
            Ok(Owner::Other(_)) | Err(_) => continue,
        }
        let fence = m.fence(g.id);
        if let Err(e) = drain(&db, &fence, &g, &model).await {
            tracing::debug!(guest = g.index, node = %fence.node, "handler stopped: {e}");
            if matches!(e, Error::Fenced(_)) {
                m.forget_owner(&g.id);
            }
        }
    }
}

/// Handles every message of the guest not handled yet (see the module docs).
async fn drain(
    db: &Db,
    fence: &Fence,
    g: &GuestSlot,
    model: &Arc<Mutex<Model>>,
) -> Result<(), Error> {
    let mut holes = Holes::default();
    loop {
        let (next, listed, mark) = list(db, g.id).await?;
        if let Some(mark) = mark {
            holes.settle(mark);
        }
        let numbers: Vec<u64> = listed.iter().map(|r| r.number).collect();
        let now = tokio::time::Instant::now().into_std();
        let step = match holes.step(next, &numbers, now) {
            Step::Wait(_) if g.faulty => Step::Handle(numbers.len()),
            s => s,
        };
        match step {
            Step::Idle => return Ok(()),
            Step::Wait(d) => tokio::time::sleep(d).await,
            Step::Close { from, to } => {
                let closed = close_holes(db, fence, g.id, from, to).await?;
                if holes.settled(to) {
                    lock(model).settled_passed += closed;
                } else {
                    lock(model).holes_closed += closed;
                }
            }
            Step::Handle(n) => {
                for rec in listed.into_iter().take(n) {
                    handle(db, fence, g, rec, model).await?;
                }
            }
        }
    }
}

/// The mark and the messages from it (snapshot reads, as the runner's),
/// with the inbox mark when the first listed is not the next.
async fn list(db: &Db, g: FormulaId) -> Result<(u64, Vec<MessageRec>, Option<u64>), Error> {
    db.read(move |tx| {
        Box::pin(async move {
            let next = match tx.snapshot_get(&keys::mark(&g)).await? {
                Some(b) => b.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0),
                None => 0,
            };
            let rows = tx
                .snapshot_range(&RangeOption {
                    begin: capstan_actors::keys::message(&g, next),
                    end: capstan_cluster::tuple::prefix_end(&capstan_actors::keys::inbox(&g)),
                    limit: BATCH,
                    reverse: false,
                })
                .await?;
            let mut out = Vec::new();
            for (_, v) in rows {
                out.push(MessageRec::decode(&v)?);
            }
            let mark = match out.first() {
                Some(m) if m.number != next => {
                    Some(capstan_actors::model::inbox_mark_snapshot(tx, &g).await?)
                }
                _ => None,
            };
            Ok::<_, Error>((next, out, mark))
        })
    })
    .await
}

/// The request id a handler uses for its answer to message `n` (the same
/// on every re-run, on every node).
pub fn derived_request(g: &FormulaId, n: u64) -> [u8; 16] {
    let mut h = blake3::Hasher::new_derive_key("capstan sim handler v1");
    h.update(g.as_bytes());
    h.update(&n.to_be_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Handles one message: answers it if it is a request, then records its
/// effect and moves the mark past it, fenced.
async fn handle(
    db: &Db,
    fence: &Fence,
    g: &GuestSlot,
    rec: MessageRec,
    model: &Arc<Mutex<Model>>,
) -> Result<(), Error> {
    let n = rec.number;
    let Some((k, request)) = workload_id(&rec) else {
        return Err(Error::Corrupt(format!(
            "message {n} is not from the workload"
        )));
    };
    if request {
        let req = derived_request(&g.id, n);
        match g.handle.resolve(RequestId(req), n, "SELF").await {
            Ok(()) => lock(model).settled(g.index, n, req),
            Err(Error::AlreadySettled(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let (guest, fence2) = (g.index, fence.clone());
    let handled = Handled {
        node: fence.node.clone(),
        epoch: fence.epoch,
        guest,
        n,
        k,
    }
    .encode();
    let gid = g.id;
    db.transact(move |tx| {
        let (fence, handled) = (fence2.clone(), handled.clone());
        Box::pin(async move {
            fence.check(tx).await?;
            // As the runner: the mark moves to `n + 1` whatever it was; the
            // effect happens once per number (the runner's derived request
            // ids), so a retry after "maybe committed" repeats nothing.
            if tx.get(&keys::handled(&gid, n)).await?.is_none() {
                let count = match tx.get(&keys::effect(k)).await? {
                    Some(b) => b.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0),
                    None => 0,
                };
                tx.set(&keys::effect(k), &(count + 1).to_be_bytes())?;
                tx.set(&keys::handled(&gid, n), &handled)?;
            }
            tx.set(&keys::mark(&gid), &(n + 1).to_be_bytes())?;
            Ok::<_, Error>(())
        })
    })
    .await
}

/// Gives up on numbers `from..to` if their slots are still empty: raises
/// the inbox mark above them (a late writer takes a fresh number) and the
/// handled mark past them, fenced (the runner's `close_holes`).
async fn close_holes(
    db: &Db,
    fence: &Fence,
    g: FormulaId,
    from: u64,
    to: u64,
) -> Result<u64, Error> {
    let to = to.max(from + 1).min(from + 1024);
    let fence = fence.clone();
    db.transact(move |tx| {
        let fence = fence.clone();
        Box::pin(async move {
            fence.check(tx).await?;
            let mark = match tx.get(&keys::mark(&g)).await? {
                Some(b) => b.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0),
                None => 0,
            };
            if mark != from {
                return Ok::<_, Error>(0);
            }
            let mut end = from;
            while end < to
                && tx
                    .get(&capstan_actors::keys::message(&g, end))
                    .await?
                    .is_none()
            {
                end += 1;
            }
            if end == from {
                return Ok::<_, Error>(0);
            }
            capstan_actors::model::raise_inbox_mark(tx, &g, end - 1).await?;
            tx.set(&keys::mark(&g), &end.to_be_bytes())?;
            Ok(end - from)
        })
    })
    .await
}

/// Locks `m`, also after a panic elsewhere poisoned it (the simulation's
/// state is checked, not trusted).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
