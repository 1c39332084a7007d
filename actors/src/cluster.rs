//! Membership and placement: several nodes sharing one replicated store.
//!
//! State lives in the store, so any node can run any operation as a store
//! transaction. Two things need a single live owner per formula: handing
//! out inbox numbers (an in-memory sequence, so that concurrent senders do
//! not conflict in the store) and running a guest's component. This module
//! keeps, in the store:
//!
//! | key | value |
//! |---|---|
//! | `("cl", "id")` | the cluster's CA key and certificate (see `capstan cluster init`) |
//! | `("cl", "m", name)` | [`MemberRec`]: a node, its address, epoch and lease expiry |
//! | `("cl", "p", formula)` | [`PlacementRec`]: the owner node and the epoch it claimed in |
//!
//! **Leases.** A node registers (bumping its epoch) and renews its record
//! every `lease / 6`. A record whose `expires_ms` is past is dead to the
//! cluster. The node itself stops serving when `lease` has passed on its
//! monotonic clock since the start of its last successful renewal (so a
//! paused process notices on wake-up, before doing anything else), drops
//! its incarnations and re-registers with a new epoch; placements of the
//! old epoch are then invalid everywhere.
//!
//! **Placement.** The owner of a formula is the node named by its placement
//! record, if that node's record is live with the same epoch and not
//! draining. Otherwise the next node that needs the owner claims it, in a
//! transaction that also checks its own lease. Writes made as the owner (a
//! guest's actions) read the placement record in the same transaction
//! ([`Fence::check`]): a claim by another node conflicts with them, so a
//! paused ex-owner's writes are refused. Inbox numbers are protected
//! independently: a message is written only to a free slot.
//!
//! Clocks: lease expiry compares wall clocks of different nodes, so the
//! cluster assumes their skew is well under the lease (1.2 s by default).
//! The records are JSON (they are operational state, not formulas).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_cluster::tuple::TupleKey;
use capstan_cluster::{Db, Transaction};
use capstan_proto::FormulaId;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;

/// Default lease of a node: how long after its last renewal a node that
/// died is taken for dead (its agents are then claimed by the next node that
/// needs them: failover takes about one lease). Renewed every sixth of it
/// (200 ms); a renewal slower than 90% of the lease (1.08 s) loses it, and
/// the node steps down and registers again. etcd commits take ~5 ms on an
/// idle machine, but can take over a second on one loaded to several times
/// its cores or during an etcd leader election: there, or with an etcd far
/// away, set a longer lease (`CAPSTAN_LEASE_MS`, e.g. 5000).
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1200);
/// A lease renewal lists the other members once in this many renewals.
const MEMBERS_EVERY: u64 = 5;
/// Most nodes a cluster lists (and broadcasts to).
pub const MAX_MEMBERS: usize = 256;
/// Queue of work for the node's links to other members.
pub const LINK_QUEUE: usize = 4096;
/// Largest message record carried in a wake-up (larger ones are read back
/// from the store by the member woken).
pub const MAX_CARRIED_RECORD: usize = 16 * 1024;

pub fn identity_key() -> Vec<u8> {
    TupleKey::new().str("cl").str("id").into_vec()
}
fn member_key(name: &str) -> Vec<u8> {
    TupleKey::new().str("cl").str("m").str(name).into_vec()
}
fn members_prefix() -> Vec<u8> {
    TupleKey::new().str("cl").str("m").into_vec()
}
fn placement_key(id: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("cl")
        .str("p")
        .bytes(id.as_bytes())
        .into_vec()
}
fn placements_prefix() -> Vec<u8> {
    TupleKey::new().str("cl").str("p").into_vec()
}

/// A node of the cluster, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRec {
    pub name: String,
    /// Random per home: a restarted node recognises its own record.
    pub node_id: String,
    /// Its QUIC address (HOST:PORT).
    pub addr: String,
    pub epoch: u64,
    pub pid: u32,
    pub started_ms: u64,
    pub renewed_ms: u64,
    pub expires_ms: u64,
    pub draining: bool,
}

impl MemberRec {
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms <= self.expires_ms
    }
}

/// The owner of a formula, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRec {
    pub node: String,
    pub epoch: u64,
    pub since_ms: u64,
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("{what} record: {e}")))
}
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("cluster records serialise")
}

pub async fn get_member(tx: &mut Transaction, name: &str) -> Result<Option<MemberRec>, Error> {
    match tx.get(&member_key(name)).await? {
        Some(b) => Ok(Some(decode("member", &b)?)),
        None => Ok(None),
    }
}

pub async fn get_placement(
    tx: &mut Transaction,
    id: &FormulaId,
) -> Result<Option<PlacementRec>, Error> {
    match tx.get(&placement_key(id)).await? {
        Some(b) => Ok(Some(decode("placement", &b)?)),
        None => Ok(None),
    }
}

/// Removes the placement record of `id` (inside the caller's transaction).
pub fn clear_placement(tx: &mut Transaction, id: &FormulaId) {
    tx.clear(&placement_key(id));
}

/// Every member record, live or not.
pub async fn list_members(tx: &mut Transaction) -> Result<Vec<MemberRec>, Error> {
    let p = members_prefix();
    let rows = tx.get_prefix(&p, MAX_MEMBERS, false).await?;
    rows.iter().map(|(_, v)| decode("member", v)).collect()
}

/// Every placement record.
pub async fn list_placements(
    tx: &mut Transaction,
    limit: usize,
) -> Result<Vec<(FormulaId, PlacementRec)>, Error> {
    let p = placements_prefix();
    let rows = tx.get_prefix(&p, limit, false).await?;
    rows.iter()
        .map(|(k, v)| Ok((placement_id(k)?, decode("placement", v)?)))
        .collect()
}

/// The formula a placement key is of.
fn placement_id(key: &[u8]) -> Result<FormulaId, Error> {
    let mut r = capstan_cluster::tuple::TupleReader::new(key);
    (|| {
        r.str().ok()?;
        r.str().ok()?;
        FormulaId::from_slice(&r.bytes().ok()?).ok()
    })()
    .ok_or_else(|| Error::Corrupt("placement key".into()))
}

/// Every placement (listed in pages, without read conflicts).
pub async fn all_placements(
    db: &Db,
) -> Result<std::collections::HashMap<FormulaId, PlacementRec>, Error> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in crate::model::scan_prefix(db, placements_prefix()).await? {
        out.insert(placement_id(&k)?, decode::<PlacementRec>("placement", &v)?);
    }
    Ok(out)
}

/// How a node joins: its name, id and address.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub node_id: String,
    pub addr: String,
    pub lease: Duration,
}

/// Work for the node's QUIC links to the other members (served by `nodes`).
pub enum LinkOp {
    /// Reserve numbers in `agent`'s inbox at its owner `node`.
    Reserve {
        node: MemberRec,
        agent: FormulaId,
        count: u32,
        at_least: u64,
        /// Admit one message of about this size under the quota first (0: none).
        quota_bytes: u64,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Tell `to` that a message was committed to `agent`'s inbox; `record`
    /// is the message as stored when it is small enough to carry
    /// ([`MAX_CARRIED_RECORD`]), else empty.
    Delivered {
        to: Vec<MemberRec>,
        agent: FormulaId,
        number: u64,
        record: Arc<Vec<u8>>,
    },
    /// Tell `to` that `promise` settled.
    Settled {
        to: Vec<MemberRec>,
        promise: FormulaId,
    },
    /// Tell `node`, the owner of `agent`, that this node has followers of
    /// `agent`'s inbox (see [`Membership::note_interest`]).
    Interest { node: MemberRec, agent: FormulaId },
}

/// How long an owner keeps sending an agent's deliveries to a member that
/// said it follows the agent's inbox; followers renew it every tick of
/// their agent (half its idle timeout, 30 s by default).
pub const INTEREST_TTL: Duration = Duration::from_secs(90);
/// Most (agent, member) interests an owner keeps, and most agents whose
/// interested members a node remembers from reservations.
pub const MAX_INTERESTS: usize = 100_000;

/// Who owns a formula, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Me,
    Other(MemberRec),
}

/// This node's membership: its lease, epoch and view of the others.
pub struct Membership {
    pub cfg: ClusterConfig,
    epoch: AtomicU64,
    /// Whether the lease is held (false while re-registering: calls refused).
    pub(crate) serving: AtomicBool,
    draining: AtomicBool,
    /// The monotonic instant until which the lease is certainly held.
    live_until: Mutex<Instant>,
    /// Members seen at the last renewal (live ones, this node included).
    members: Mutex<Vec<MemberRec>>,
    /// Owners of formulas this node asked about (not authoritative).
    owners: Mutex<HashMap<FormulaId, MemberRec>>,
    pub link: mpsc::Sender<LinkOp>,
    /// Writes refused because this node no longer owned the formula.
    pub fenced: AtomicU64,
    /// Times this node lost its lease and re-registered.
    pub stepdowns: AtomicU64,
    /// Lease renewals that succeeded, and those that failed (the store did
    /// not answer or refused; a lost lease is a step-down).
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    /// Wake-ups for committed messages this node sent to other members
    /// (one per member told), and those it received.
    pub deliveries_sent: AtomicU64,
    pub deliveries_received: AtomicU64,
    /// Set when the node leaves or stops: the lease is no longer renewed.
    pub leaving: AtomicBool,
    /// Formulas this node took over from another owner (dead, draining, or
    /// this node's own earlier run), with that owner's name: guests tell
    /// their host they resumed here (bounded; see [`MAX_TAKEOVERS`]).
    took_over: Mutex<HashMap<FormulaId, String>>,
    /// As an owner: the members following each agent's inbox, until when.
    interest: Mutex<HashMap<FormulaId, HashMap<String, Instant>>>,
    /// As a sender: the members following an agent's inbox, as its owner
    /// said when it last reserved numbers in it.
    learned: Mutex<HashMap<FormulaId, Vec<String>>>,
}

/// Most take-overs remembered for a notice not yet given.
const MAX_TAKEOVERS: usize = 10_000;

impl Membership {
    pub fn new(cfg: ClusterConfig, link: mpsc::Sender<LinkOp>) -> Membership {
        Membership {
            cfg,
            epoch: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            live_until: Mutex::new(Instant::now()),
            members: Mutex::new(Vec::new()),
            owners: Mutex::new(HashMap::new()),
            link,
            fenced: AtomicU64::new(0),
            stepdowns: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            deliveries_sent: AtomicU64::new(0),
            deliveries_received: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            took_over: Mutex::new(HashMap::new()),
            interest: Mutex::new(HashMap::new()),
            learned: Mutex::new(HashMap::new()),
        }
    }

    /// Member `node` follows `agent`'s inbox (which this node owns) for the
    /// next [`INTEREST_TTL`]. Past [`MAX_INTERESTS`] agents, lapsed entries
    /// are dropped first, then the new one is not kept (its follower still
    /// sees everything, by reading the store a little later).
    pub fn note_interest(&self, agent: FormulaId, node: String) {
        let Ok(mut all) = self.interest.lock() else {
            return;
        };
        let now = Instant::now();
        if all.len() >= MAX_INTERESTS && !all.contains_key(&agent) {
            all.retain(|_, nodes| {
                nodes.retain(|_, until| *until > now);
                !nodes.is_empty()
            });
            if all.len() >= MAX_INTERESTS {
                return;
            }
        }
        all.entry(agent)
            .or_default()
            .insert(node, now + INTEREST_TTL);
    }

    /// The live member that owns `id` according to the store, when it is
    /// another node; never claims anything (unlike [`Membership::owner`]).
    pub async fn peek_owner(&self, db: &Db, id: FormulaId) -> Result<Option<MemberRec>, Error> {
        if let Some(m) = self.owners.lock().ok().and_then(|o| o.get(&id).cloned()) {
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

    /// The members following `agent`'s inbox, as its owner knows them.
    pub fn interested(&self, agent: &FormulaId) -> Vec<String> {
        let Ok(mut all) = self.interest.lock() else {
            return Vec::new();
        };
        let now = Instant::now();
        let Some(nodes) = all.get_mut(agent) else {
            return Vec::new();
        };
        nodes.retain(|_, until| *until > now);
        let names: Vec<String> = nodes.keys().cloned().collect();
        if names.is_empty() {
            all.remove(agent);
        }
        names
    }

    /// What the owner of `agent` said of its followers when it reserved.
    pub fn learn_interest(&self, agent: FormulaId, nodes: Vec<String>) {
        if let Ok(mut l) = self.learned.lock() {
            if nodes.is_empty() {
                l.remove(&agent);
                return;
            }
            if l.len() >= MAX_INTERESTS && !l.contains_key(&agent) {
                l.clear();
            }
            l.insert(agent, nodes);
        }
    }

    /// The members to wake when a message was committed to `agent`'s inbox
    /// here: its owner, and the members following the inbox (as the owner
    /// told, or as this node knows as the owner). `None` when this node
    /// does not know the owner: then every member is told.
    pub fn delivery_targets(&self, agent: &FormulaId) -> Option<Vec<MemberRec>> {
        let owner = self.owners.lock().ok()?.get(agent).cloned()?;
        let mut names = if owner.name == self.cfg.name && owner.epoch == self.epoch() {
            self.interested(agent)
        } else {
            let mut n = self
                .learned
                .lock()
                .ok()
                .and_then(|l| l.get(agent).cloned())
                .unwrap_or_default();
            n.push(owner.name.clone());
            n
        };
        names.retain(|n| *n != self.cfg.name);
        names.sort();
        names.dedup();
        Some(
            self.members()
                .into_iter()
                .filter(|m| names.contains(&m.name))
                .collect(),
        )
    }

    /// The node `id` was taken over from, once (see `took_over`).
    pub fn take_over_notice(&self, id: &FormulaId) -> Option<String> {
        self.took_over.lock().ok()?.remove(id)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// True while the lease is held on this node's own clock.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
            && self
                .live_until
                .lock()
                .map(|t| Instant::now() < *t)
                .unwrap_or(false)
    }

    /// How long the lease is certainly held still, on this node's clock.
    pub(crate) fn lease_left(&self) -> Duration {
        self.live_until
            .lock()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Stops renewing the lease and claiming formulas (leave or stop).
    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The live members seen at the last renewal.
    pub fn members(&self) -> Vec<MemberRec> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The live members other than this node.
    pub fn others(&self) -> Vec<MemberRec> {
        self.members()
            .into_iter()
            .filter(|m| m.name != self.cfg.name)
            .collect()
    }

    pub fn forget_owner(&self, id: &FormulaId) {
        if let Ok(mut o) = self.owners.lock() {
            o.remove(id);
        }
    }

    pub(crate) fn forget_all(&self) {
        if let Ok(mut o) = self.owners.lock() {
            o.clear();
        }
    }

    pub fn not_serving(&self) -> Error {
        Error::Unavailable(format!(
            "node {} does not hold its cluster lease right now (store unreachable, or paused past its lease); it re-registers by itself: retry, or use another node",
            self.cfg.name
        ))
    }

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
                    };
                    tx.set(&member_key(&cfg.name), &encode(&rec))?;
                    Ok(rec)
                })
            })
            .await?;
        self.epoch.store(rec.epoch, Ordering::Release);
        self.draining.store(
            rec.draining || self.leaving.load(Ordering::Acquire),
            Ordering::Release,
        );
        if let Ok(mut t) = self.live_until.lock() {
            *t = started + self.cfg.lease * 9 / 10;
        }
        self.serving.store(true, Ordering::Release);
        self.refresh_members(db).await?;
        tracing::info!(node = %self.cfg.name, epoch = rec.epoch, addr = %rec.addr, "joined the cluster");
        Ok(rec.epoch)
    }

    /// Renews the lease. `Ok(false)` when the lease was lost (the record
    /// expired or another epoch replaced it): the caller steps down.
    pub(crate) async fn renew(&self, db: &Db) -> Result<bool, Error> {
        let name = self.cfg.name.clone();
        let epoch = self.epoch();
        let lease = self.cfg.lease;
        let started = Instant::now();
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
                    Ok(Some((rec, Some(all))))
                })
            })
            .await?;
        let Some((rec, all)) = rec else {
            return Ok(false);
        };
        self.serving.store(true, Ordering::Release);
        if let Ok(mut t) = self.live_until.lock() {
            // Only extend: a renewal that took longer than the lease is no proof.
            let until = started + self.cfg.lease * 9 / 10;
            if until > *t {
                *t = until;
            }
        }
        self.draining.store(
            rec.draining || self.leaving.load(Ordering::Acquire),
            Ordering::Release,
        );
        if let Some(all) = all {
            self.set_members(all);
        }
        Ok(true)
    }

    /// Reads the live members from the store now (they are otherwise
    /// refreshed at each renewal): a locator handed out right after nodes
    /// joined names them all.
    pub async fn refresh_members(&self, db: &Db) -> Result<(), Error> {
        let all = db
            .read(|tx| Box::pin(async move { list_members(tx).await }))
            .await?;
        self.set_members(all);
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

    /// The owner of `id`, claiming it for this node when it has none
    /// (or a dead or draining one). Draining nodes claim nothing: they
    /// point at a live member that is not draining.
    pub async fn owner(&self, db: &Db, id: FormulaId) -> Result<Owner, Error> {
        // A node that just lost its lease re-registers within a renewal
        // interval: wait for that rather than fail the call at once.
        let deadline = Instant::now() + self.cfg.lease;
        while !self.serving() {
            if Instant::now() >= deadline || self.leaving.load(Ordering::Acquire) {
                return Err(self.not_serving());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(m) = self.owners.lock().ok().and_then(|o| o.get(&id).cloned()) {
            return Ok(if m.name == self.cfg.name && m.epoch == self.epoch() {
                Owner::Me
            } else {
                Owner::Other(m)
            });
        }
        let me = self.cfg.name.clone();
        let epoch = self.epoch();
        let draining = self.draining();
        let owner = db
            .transact(move |tx| {
                let me = me.clone();
                Box::pin(async move {
                    let now = crate::clock::now_ms();
                    let before = get_placement(tx, &id).await?;
                    if let Some(p) = &before {
                        if p.node == me && p.epoch == epoch && !draining {
                            return Ok((None, None));
                        }
                        if p.node != me
                            && let Some(m) = get_member(tx, &p.node).await?
                            && m.epoch == p.epoch
                            && m.live(now)
                            && !m.draining
                        {
                            return Ok((Some(m), None));
                        }
                    }
                    if draining {
                        let others = list_members(tx).await?;
                        return others
                            .into_iter()
                            .find(|m| m.name != me && m.live(now) && !m.draining)
                            .map(Some)
                            .ok_or_else(|| {
                                Error::Unavailable(format!(
                                    "node {me} is draining and no other live node can take the work; start another node"
                                ))
                            })
                            .map(|m| (m, None));
                    }
                    // Claim it, but only while our own lease holds.
                    match get_member(tx, &me).await? {
                        Some(m) if m.epoch == epoch && m.live(now) => {}
                        _ => {
                            return Err(Error::Unavailable(format!(
                                "node {me} lost its cluster lease; it re-registers by itself: retry"
                            )));
                        }
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
                    });
                m.epoch = epoch;
                m
            }
            Some(m) => m.clone(),
        };
        if let Ok(mut o) = self.owners.lock() {
            o.insert(id, m);
        }
        Ok(match owner {
            None => Owner::Me,
            Some(m) => Owner::Other(m),
        })
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

/// Marks node `name` draining (its lease loop then gives up its
/// placements); `Ok(false)` if there is no such node.
pub async fn set_draining(db: &Db, name: &str) -> Result<bool, Error> {
    let name = name.to_string();
    db.transact(move |tx| {
        let name = name.clone();
        Box::pin(async move {
            let Some(mut m) = get_member(tx, &name).await? else {
                return Ok(false);
            };
            if !m.draining {
                m.draining = true;
                tx.set(&member_key(&name), &encode(&m))?;
            }
            Ok(true)
        })
    })
    .await
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
    c.serving.store(false, Ordering::Release);
    Ok(())
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
