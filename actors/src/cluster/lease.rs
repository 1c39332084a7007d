//! This node's lease: registering (a new epoch), renewing, ending it, and
//! watching the leases of other members.

use std::sync::atomic::Ordering;
use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_cluster::Db;

use super::MAX_MEMBERS;
use super::membership::Membership;
use super::records::{
    MemberRec, decode, encode, get_member, get_settings, list_members, member_key, members_prefix,
};
use crate::error::Error;

/// A lease renewal lists the other members once in this many renewals.
const MEMBERS_EVERY: u64 = 5;

impl Membership {
    /// Registers this node (a new epoch). Fails if another live node uses
    /// the name. A re-registration (after a lost lease) keeps a drain mark;
    /// a fresh start clears it.
    pub async fn register(&self, db: &Db) -> Result<u64, Error> {
        self.register_as(db, false).await
    }

    pub(crate) async fn register_as(&self, db: &Db, again: bool) -> Result<u64, Error> {
        let cfg = self.cfg.clone();
        let lease = self.cfg.lease;
        let started = Instant::now();
        let rec = db
            .transact(move |tx| {
                let cfg = cfg.clone();
                Box::pin(async move {
                    let now = crate::clock::now_ms();
                    let old = get_member(tx, &cfg.name).await?;
                    if let Some(o) = &old
                        && o.node_id != cfg.node_id
                        && o.live(now)
                    {
                        return Err(Error::Invalid(format!(
                            "another live node is called {:?} (at {}, pid {}); pick another home name, or stop that node first",
                            cfg.name, o.addr, o.pid
                        )));
                    }
                    let rec = MemberRec {
                        name: cfg.name.clone(),
                        node_id: cfg.node_id.clone(),
                        addr: cfg.addr.clone(),
                        epoch: old.as_ref().map(|o| o.epoch + 1).unwrap_or(1),
                        pid: std::process::id(),
                        started_ms: now,
                        renewed_ms: now,
                        expires_ms: now + lease.as_millis() as u64,
                        draining: again
                            && old
                                .as_ref()
                                .is_some_and(|o| o.node_id == cfg.node_id && o.draining),
                        records: super::records::RECORDS_VERSION,
                        relays: true,
                    };
                    tx.set(&member_key(&cfg.name), &encode(&rec))?;
                    Ok(rec)
                })
            })
            .await?;
        self.lease()
            .registered(started.into_std(), rec.epoch, rec.draining);
        self.refresh_members(db).await?;
        tracing::info!(node = %self.cfg.name, epoch = rec.epoch, addr = %rec.addr, "joined the cluster");
        Ok(rec.epoch)
    }

    /// Renews the lease in the store: `Ok(Some(draining))` with the
    /// record's drain mark, `Ok(None)` when the lease was lost (the record
    /// expired or another epoch replaced it). The caller hands the outcome
    /// to [`Membership::on_renewal`].
    pub(crate) async fn renew(&self, db: &Db) -> Result<Option<bool>, Error> {
        let name = self.cfg.name.clone();
        let epoch = self.epoch();
        let lease = self.cfg.lease;
        // The other members' records every few renewals (about once a
        // second by default), not at each: each listing is a range read of
        // etcd, five a second per node otherwise, idle or not.
        let list = self
            .renewals
            .load(Ordering::Relaxed)
            .is_multiple_of(MEMBERS_EVERY);
        let rec = db
            .transact(move |tx| {
                let name = name.clone();
                Box::pin(async move {
                    let now = crate::clock::now_ms();
                    let Some(mut rec) = get_member(tx, &name).await? else {
                        return Ok::<_, Error>(None);
                    };
                    if rec.epoch != epoch || !rec.live(now) {
                        return Ok(None);
                    }
                    rec.renewed_ms = now;
                    rec.expires_ms = now + lease.as_millis() as u64;
                    tx.set(&member_key(&name), &encode(&rec))?;
                    if !list {
                        return Ok(Some((rec, None)));
                    }
                    // The other members' records on the same snapshot,
                    // without a read conflict (their renewals must not make
                    // this one retry): a separate read of the members after
                    // each renewal cost every node a revision read and a
                    // range read per renewal (5 a second), idle or not.
                    let p = members_prefix();
                    let rows = tx
                        .snapshot_range(&capstan_cluster::RangeOption {
                            begin: p.clone(),
                            end: capstan_cluster::tuple::prefix_end(&p),
                            limit: MAX_MEMBERS,
                            reverse: false,
                        })
                        .await?;
                    let all = rows
                        .iter()
                        .map(|(_, v)| decode("member", v))
                        .collect::<Result<Vec<MemberRec>, Error>>()?;
                    let settings = get_settings(tx).await?;
                    Ok(Some((rec, Some((all, settings)))))
                })
            })
            .await?;
        let Some((rec, all)) = rec else {
            return Ok(None);
        };
        if let Some((all, settings)) = all {
            self.set_members(all);
            self.set_policy(settings.placement);
        }
        Ok(Some(rec.draining))
    }

    /// Reads the live members from the store now (they are otherwise
    /// refreshed at each renewal): a locator handed out right after nodes
    /// joined names them all.
    pub async fn refresh_members(&self, db: &Db) -> Result<(), Error> {
        let (all, settings) = db
            .read(|tx| {
                Box::pin(async move {
                    Ok::<_, Error>((list_members(tx).await?, get_settings(tx).await?))
                })
            })
            .await?;
        self.set_members(all);
        self.set_policy(settings.placement);
        Ok(())
    }

    /// Remembers the live ones of `all` as the cluster's members.
    fn set_members(&self, all: Vec<MemberRec>) {
        let now = crate::clock::now_ms();
        let live: Vec<MemberRec> = all.into_iter().filter(|m| m.live(now)).collect();
        if let Ok(mut m) = self.members.lock() {
            *m = live;
        }
    }

    /// After `m` (the recorded owner of something) failed to answer: returns
    /// at once if its member record was renewed in the last two renewal
    /// intervals (it is alive, only slow: try it again), otherwise when its
    /// lease has lapsed
    /// (then this node can claim what it owned). Waits at most one lease, so
    /// a caller does not spend its retries on a node that is gone.
    pub async fn await_lapse(&self, db: &Db, m: &MemberRec) -> Result<(), Error> {
        let name = m.name.clone();
        let now_rec = db
            .read(move |tx| {
                let name = name.clone();
                Box::pin(async move { get_member(tx, &name).await })
            })
            .await?;
        let now = crate::clock::now_ms();
        // A live node renews every lease/6. One that renewed within the last
        // two intervals is alive and only slow: try it again. (Comparing with
        // `m`, which may have been cached long ago, took a node that died
        // since for a slow one, and cost a second call timeout.)
        let fresh = (self.cfg.lease / 3).as_millis() as u64;
        let expires_ms = match now_rec {
            Some(r) if r.epoch == m.epoch && r.renewed_ms + fresh >= now => return Ok(()),
            Some(r) if r.epoch == m.epoch => r.expires_ms,
            // gone or registered again under a new epoch: its old placements are void
            _ => return Ok(()),
        };
        if expires_ms >= now {
            let wait = Duration::from_millis(expires_ms - now + 10).min(self.cfg.lease);
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Returns once member `m` looks dead: its record gone, registered again
    /// under another epoch, or not renewed for a third of the lease (two
    /// renewals missed). Looks every sixth of the lease; never returns while
    /// `m` renews. Raced against a call to `m`, so that a caller does not
    /// wait out the call's whole timeout on a node that died.
    pub async fn until_dead(&self, db: &Db, m: &MemberRec) {
        let every = self.cfg.lease / 6;
        let fresh = (self.cfg.lease / 3).as_millis() as u64;
        loop {
            tokio::time::sleep(every).await;
            let name = m.name.clone();
            let rec = db
                .read(move |tx| {
                    let name = name.clone();
                    Box::pin(async move { get_member(tx, &name).await })
                })
                .await;
            let now = crate::clock::now_ms();
            match rec {
                Ok(Some(r)) if r.epoch == m.epoch && r.renewed_ms + fresh >= now => {}
                Ok(_) => return,
                // the store is unreachable: nothing to conclude
                Err(_) => {}
            }
        }
    }
}

/// Ends this node's membership: `remove` deletes its record (leave),
/// otherwise it is marked expired (a stopped node, shown as dead).
pub async fn end_membership(db: &Db, c: &Membership, remove: bool) -> Result<(), Error> {
    c.set_leaving();
    let name = c.cfg.name.clone();
    let epoch = c.epoch();
    db.transact(move |tx| {
        let name = name.clone();
        Box::pin(async move {
            if let Some(mut m) = get_member(tx, &name).await?
                && m.epoch == epoch
            {
                if remove {
                    tx.clear(&member_key(&name));
                } else {
                    m.expires_ms = crate::clock::now_ms().saturating_sub(1);
                    tx.set(&member_key(&name), &encode(&m))?;
                }
            }
            Ok::<_, Error>(())
        })
    })
    .await?;
    c.lease().ended();
    Ok(())
}
