//! Resuming guests with mail they have not handled yet: after a restart,
//! and in a cluster when their owner dies.

use std::sync::Arc;

use capstan_proto::FormulaId;

use super::{Body, keys};
use crate::error::Error;
use crate::model;
use crate::node::{Inner, Runtime};

/// Guests read per page when looking for unhandled mail.
pub(super) const RESUME_PAGE: usize = 1000;

/// Every guest agent (its body record), in id order.
async fn all_guests(rt: &Arc<Inner>) -> Result<Vec<FormulaId>, Error> {
    let rows = crate::model::scan_prefix(&rt.db, keys::bodies()).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Body>(&v).ok())
        .filter_map(|body| body.id.parse::<FormulaId>().ok())
        .collect())
}

/// Of `ids`, the guests with mail they have not handled yet (a handler cut
/// short by a crash, or mail that came while no node ran them): three reads
/// each, so callers pass only the guests that may need it.
async fn behind(rt: &Arc<Inner>, ids: Vec<FormulaId>) -> Result<Vec<FormulaId>, Error> {
    let mut out = Vec::new();
    for page in ids.chunks(RESUME_PAGE) {
        let page = Arc::new(page.to_vec());
        let found = rt
            .db
            .read(move |tx| {
                let page = page.clone();
                Box::pin(async move {
                    let mut behind = Vec::new();
                    for id in page.iter() {
                        let next = match tx.get(&keys::next(id)).await? {
                            Some(b) if b.len() == 8 => {
                                u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8]))
                            }
                            _ => 0,
                        };
                        if model::has_message_from(tx, id, next).await? {
                            behind.push(*id);
                        }
                    }
                    Ok::<_, Error>(behind)
                })
            })
            .await?;
        out.extend(found);
    }
    Ok(out)
}

/// Every guest with mail it has not handled yet.
pub(super) async fn guests_behind(rt: &Arc<Inner>) -> Result<Vec<FormulaId>, Error> {
    let all = all_guests(rt).await?;
    behind(rt, all).await
}

/// In a cluster: the guests with unhandled mail that no live member runs:
/// those without a placement, placed on a member that is gone (its lease
/// lapsed, or it came back under another epoch), or placed on this node but
/// not running here. A guest a live member owns is that member's to resume
/// (its runner is woken by every message), so the periodic scan reads the
/// guests' bodies and the placements (two listings) and looks at the inbox
/// of the few others only, rather than reading three keys of every guest
/// of the cluster on every node every two leases.
async fn orphans_behind(
    rt: &Arc<Inner>,
    c: &crate::cluster::Membership,
) -> Result<Vec<FormulaId>, Error> {
    let all = all_guests(rt).await?;
    if all.is_empty() {
        return Ok(all);
    }
    let placed = crate::cluster::all_placements(&rt.db).await?;
    let now = crate::clock::now_ms();
    let live = c.members();
    let (me, epoch) = (c.cfg.name.clone(), c.epoch());
    let orphans: Vec<FormulaId> = all
        .into_iter()
        .filter(|id| match placed.get(id) {
            None => true,
            Some(p) if p.node == me && p.epoch == epoch => rt.registry.agent(id).is_none(),
            Some(p) => !live
                .iter()
                .any(|m| m.name == p.node && m.epoch == p.epoch && m.live(now)),
        })
        .collect();
    behind(rt, orphans).await
}

/// Starts the runners of guests this node should run that have unhandled
/// mail: all of them on a lone node; in a cluster, those it owns or can
/// claim (unowned, or owned by a node whose lease lapsed). Returns how many
/// it started.
pub(crate) async fn resume_guests(rt: &Arc<Inner>) -> Result<usize, Error> {
    if rt.guests.get().is_none() {
        return Ok(0);
    }
    let mut started = 0;
    let candidates = match rt.cluster.get() {
        None => guests_behind(rt).await?,
        Some(c) => orphans_behind(rt, c).await?,
    };
    for id in candidates {
        let was = rt.registry.agent(&id).is_some();
        let r = match rt.cluster.get() {
            None => crate::incarnation::agent_actor(rt, id).await.map(Some),
            Some(c) => {
                let live = c.members();
                let mut owner = c.owner(&rt.db, id).await?;
                if let crate::cluster::Owner::Other(m) = &owner
                    && !live.iter().any(|l| l.name == m.name && l.epoch == m.epoch)
                {
                    // a cached owner that died since: ask the store again
                    c.forget_owner(&id);
                    owner = c.owner(&rt.db, id).await?;
                }
                match owner {
                    crate::cluster::Owner::Me => crate::incarnation::owned_agent_actor(rt, id)
                        .await
                        .map(Some),
                    crate::cluster::Owner::Other(_) => Ok(None),
                }
            }
        };
        match r {
            Ok(Some(_)) if !was => {
                started += 1;
                tracing::info!(guest = %id.short(), "resumed a guest with unhandled mail");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(guest = %id.short(), "cannot resume guest: {e}"),
        }
    }
    Ok(started)
}

/// Resumes guests with unhandled mail now, then (in a cluster, where their
/// owner may die) every two leases. Ends when the runtime is dropped.
pub(crate) async fn resume_loop(rt: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = rt.upgrade() else { return };
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Err(e) = resume_guests(&inner).await {
            tracing::warn!("looking for guests to resume: {e}");
        }
        let Some(c) = inner.cluster.get() else { return };
        let period = c.cfg.lease * 2;
        drop(inner);
        tokio::time::sleep(period).await;
    }
}

impl Runtime {
    /// Starts the guests that have mail they did not handle (their node
    /// died mid-handler, or mail came while no node ran them), now and, in a
    /// cluster, every two leases (owners die). Call once, inside tokio,
    /// after [`Runtime::enable_guests`] and [`Runtime::join_cluster`].
    pub fn start_guest_resumer(&self) {
        tokio::spawn(resume_loop(Arc::downgrade(self.inner())));
    }
}
