//! Placement: the owner of a formula (claimed by the next node that needs
//! it when it has none, or a dead or draining one), and the [`Fence`] that
//! refuses a writer that no longer owns it.

use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_cluster::{Db, Transaction};
use capstan_proto::FormulaId;

use super::Owner;
use super::membership::{MAX_TAKEOVERS, Membership};
use super::records::{
    MemberRec, PlacementRec, encode, get_member, get_placement, list_members, placement_key,
};
use crate::error::Error;
use crate::rules::placement as rules;

impl Membership {
    /// The live member that owns `id` according to the store, when it is
    /// another node; never claims anything (unlike [`Membership::owner`]).
    pub async fn peek_owner(&self, db: &Db, id: FormulaId) -> Result<Option<MemberRec>, Error> {
        if let Some(m) = self.fresh_owner(&id) {
            return Ok((m.name != self.cfg.name).then_some(m));
        }
        let me = self.cfg.name.clone();
        db.read(move |tx| {
            let me = me.clone();
            Box::pin(async move {
                let Some(p) = get_placement(tx, &id).await? else {
                    return Ok(None);
                };
                if p.node == me {
                    return Ok(None);
                }
                Ok(get_member(tx, &p.node)
                    .await?
                    .filter(|m| m.epoch == p.epoch && m.live(crate::clock::now_ms())))
            })
        })
        .await
    }

    /// The owner of `id`, claiming it for this node when it has none
    /// (or a dead or draining one). Draining nodes claim nothing: they
    /// point at a live member that is not draining.
    pub async fn owner(&self, db: &Db, id: FormulaId) -> Result<Owner, Error> {
        // A node that just lost its lease re-registers within a renewal
        // interval: wait for that rather than fail the call at once.
        let deadline = Instant::now() + self.cfg.lease;
        while !self.serving() {
            if Instant::now() >= deadline || self.leaving() {
                return Err(self.not_serving());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_release(&id).await;
        if let Some(m) = self.fresh_owner(&id) {
            return Ok(if m.name == self.cfg.name && m.epoch == self.epoch() {
                Owner::Me
            } else {
                Owner::Other(m)
            });
        }
        let me = self.cfg.name.clone();
        let epoch = self.epoch();
        let draining = self.draining();
        let spread = self.policy() == rules::Policy::Spread;
        let owner = db
            .transact(move |tx| {
                let me = me.clone();
                Box::pin(async move {
                    let now = crate::clock::now_ms();
                    let who = rules::Me {
                        name: &me,
                        epoch,
                        draining,
                    };
                    let before = get_placement(tx, &id).await?;
                    if let Some(p) = &before {
                        // the holder's record only when it is another node
                        let holder = match p.node == me {
                            true => None,
                            false => get_member(tx, &p.node).await?,
                        };
                        let view = holder.as_ref().map(MemberRec::view);
                        match rules::stands(&who, (&p.node, p.epoch), view.as_ref(), now) {
                            Some(rules::Stands::Mine) => return Ok((None, None)),
                            Some(rules::Stands::Theirs) => return Ok((holder, None)),
                            None => {}
                        }
                    }
                    if draining || spread {
                        // (spread: the member rendezvous hashing picks,
                        // which claims it when the work reaches it; a node
                        // that picks itself claims it below)
                        let members = list_members(tx).await?;
                        let views: Vec<_> = members.iter().map(MemberRec::view).collect();
                        let to = match spread {
                            true => rules::winner(id.as_bytes(), &views, now),
                            false => rules::hand_off(&me, &views, now),
                        };
                        match to.and_then(|i| members.into_iter().nth(i)) {
                            Some(m) if m.name != me => return Ok((Some(m), None)),
                            // (this node, or none live: its own lease is
                            // checked as it claims)
                            _ if !draining => {}
                            _ => {
                                return Err(Error::Unavailable(format!(
                                    "node {me} is draining and no other live node can take the work; start another node"
                                )));
                            }
                        }
                    }
                    // Claim it, but only while our own lease holds.
                    let mine = get_member(tx, &me).await?;
                    if !rules::may_claim(&who, mine.as_ref().map(MemberRec::view).as_ref(), now) {
                        return Err(Error::Unavailable(format!(
                            "node {me} lost its cluster lease; it re-registers by itself: retry"
                        )));
                    }
                    let rec = PlacementRec {
                        node: me.clone(),
                        epoch,
                        since_ms: now,
                    };
                    tx.set(&placement_key(&id), &encode(&rec))?;
                    Ok((None, before.map(|p| p.node)))
                })
            })
            .await?;
        let (owner, previous) = owner;
        if let Some(prev) = previous
            && let Ok(mut t) = self.took_over.lock()
        {
            if t.len() >= MAX_TAKEOVERS {
                t.clear();
            }
            tracing::info!(formula = %id.short(), from = %prev, "took over");
            t.insert(id, prev);
        }
        let m = match &owner {
            None => {
                let mut m = self
                    .members()
                    .into_iter()
                    .find(|m| m.name == self.cfg.name)
                    .unwrap_or_else(|| MemberRec {
                        name: self.cfg.name.clone(),
                        node_id: self.cfg.node_id.clone(),
                        addr: self.cfg.addr.clone(),
                        epoch,
                        pid: std::process::id(),
                        started_ms: 0,
                        renewed_ms: 0,
                        expires_ms: 0,
                        draining: false,
                        records: super::records::RECORDS_VERSION,
                        relays: true,
                    });
                m.epoch = epoch;
                m
            }
            Some(m) => m.clone(),
        };
        self.learn_owner(id, m);
        Ok(match owner {
            None => Owner::Me,
            Some(m) => Owner::Other(m),
        })
    }

    /// Gives up the placement of `id` if this node (this epoch) holds it.
    pub async fn release(&self, db: &Db, id: FormulaId) -> Result<(), Error> {
        self.forget_owner(&id);
        let me = self.cfg.name.clone();
        let epoch = self.epoch();
        db.transact(move |tx| {
            let me = me.clone();
            Box::pin(async move {
                if let Some(p) = get_placement(tx, &id).await?
                    && p.node == me
                    && p.epoch == epoch
                {
                    tx.clear(&placement_key(&id));
                }
                Ok::<_, Error>(())
            })
        })
        .await
    }

    /// The fence of writes made as the owner of `id` in this epoch.
    pub fn fence(&self, id: FormulaId) -> Fence {
        Fence {
            id,
            node: self.cfg.name.clone(),
            epoch: self.epoch(),
        }
    }
}

/// Checks, inside a transaction, that this node still owns a formula.
#[derive(Debug, Clone)]
pub struct Fence {
    pub id: FormulaId,
    pub node: String,
    pub epoch: u64,
}

impl Fence {
    /// Reads the placement record (so a concurrent claim conflicts with the
    /// transaction) and refuses unless it still names this node and epoch.
    pub async fn check(&self, tx: &mut Transaction) -> Result<(), Error> {
        match get_placement(tx, &self.id).await? {
            Some(p) if p.node == self.node && p.epoch == self.epoch => Ok(()),
            other => Err(Error::Fenced(format!(
                "node {} (epoch {}) no longer owns {}: {}; the write was refused and the incarnation steps down",
                self.node,
                self.epoch,
                self.id.short(),
                match other {
                    Some(p) => format!("node {} (epoch {}) owns it now", p.node, p.epoch),
                    None => "nobody owns it now".to_string(),
                }
            ))),
        }
    }
}
