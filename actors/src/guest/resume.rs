//! Resuming guests with mail they have not handled yet: after a restart,
//! and in a cluster when their owner dies.

use std::sync::Arc;

use capstan_proto::FormulaId;

use super::{Body, keys};
use crate::error::Error;
use crate::model;
use crate::node::Inner;

/// Guests read per page when looking for unhandled mail.
pub(super) const RESUME_PAGE: usize = 1000;

/// Guests with mail they have not handled yet (a handler cut short by a
/// crash, or mail that came while no node ran them).
pub(super) async fn guests_behind(rt: &Arc<Inner>) -> Result<Vec<FormulaId>, Error> {
    let mut out = Vec::new();
    let mut begin = keys::bodies();
    let end = capstan_cluster::tuple::prefix_end(&begin);
    loop {
        let (b, e) = (begin.clone(), end.clone());
        let (page, last) = rt
            .db
            .read(move |tx| {
                let (b, e) = (b.clone(), e.clone());
                Box::pin(async move {
                    let rows = tx
                        .get_range(capstan_cluster::RangeOption {
                            begin: b,
                            end: e,
                            limit: RESUME_PAGE,
                            reverse: false,
                        })
                        .await?;
                    let last = (rows.len() == RESUME_PAGE)
                        .then(|| rows.last().map(|(k, _)| k.clone()))
                        .flatten();
                    let mut behind = Vec::new();
                    for (_, v) in rows {
                        let Ok(body) = serde_json::from_slice::<Body>(&v) else {
                            continue;
                        };
                        let Ok(id) = body.id.parse::<FormulaId>() else {
                            continue;
                        };
                        let next = match tx.get(&keys::next(&id)).await? {
                            Some(b) if b.len() == 8 => {
                                u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8]))
                            }
                            _ => 0,
                        };
                        if model::next_message_number(tx, &id).await? > next {
                            behind.push(id);
                        }
                    }
                    Ok::<_, Error>((behind, last))
                })
            })
            .await?;
        out.extend(page);
        match last {
            Some(mut k) => {
                k.push(0);
                begin = k;
            }
            None => return Ok(out),
        }
    }
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
    for id in guests_behind(rt).await? {
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
