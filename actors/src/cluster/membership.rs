//! [`Membership`]: this node's membership of the cluster, its epoch, its
//! view of the other members and owners, and the followers of inboxes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_proto::FormulaId;
use tokio::sync::mpsc;

use super::records::MemberRec;
use super::{ClusterConfig, INTEREST_TTL, LinkOp, MAX_INTERESTS};
use crate::error::Error;
use crate::rules::lease::{Action, Lease, Renewal};

/// This node's membership: its lease, epoch and view of the others.
pub struct Membership {
    pub cfg: ClusterConfig,
    /// The lease's lifecycle (epoch, phase, drain mark, until when it
    /// holds): a pure state machine, see [`crate::rules::lease`].
    lease: Mutex<Lease>,
    /// Members seen at the last renewal (live ones, this node included).
    pub(super) members: Mutex<Vec<MemberRec>>,
    /// Owners of formulas this node asked about (not authoritative), and
    /// when it learned each: see [`Membership::fresh_owner`].
    pub(super) owners: Mutex<HashMap<FormulaId, (MemberRec, Instant)>>,
    pub link: mpsc::Sender<LinkOp>,
    /// Writes refused because this node no longer owned the formula.
    pub fenced: AtomicU64,
    /// Times this node lost its lease and re-registered.
    pub stepdowns: AtomicU64,
    /// Lease renewals that succeeded, and those that failed (the store did
    /// not answer or refused; a lost lease is a step-down).
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    /// Why the last renewal (or registration after a lost lease) failed;
    /// `None` once one succeeded.
    pub renewal_error: Mutex<Option<String>>,
    /// Wake-ups for committed messages this node sent to other members
    /// (one per member told), and those it received.
    pub deliveries_sent: AtomicU64,
    pub deliveries_received: AtomicU64,
    /// Calls this node made to other members: reservations at a remote
    /// owner, and `wake` calls (each carrying any number of wake-ups).
    pub reserve_calls: AtomicU64,
    pub wake_calls: AtomicU64,
    /// Reservation calls the member asked answered with an error other
    /// than a full inbox (most often: it is not the owner, as this node
    /// remembered; the next attempt asks the store). Unanswered calls are
    /// not counted.
    pub reserve_refused: AtomicU64,
    /// The reservation calls' time until answered (or failed), µs summed.
    pub reserve_us: AtomicU64,
    /// Formulas this node took over from another owner (dead, draining, or
    /// this node's own earlier run), with that owner's name: guests tell
    /// their host they resumed here (bounded; see [`MAX_TAKEOVERS`]).
    pub(super) took_over: Mutex<HashMap<FormulaId, String>>,
    /// Placements this node is giving up (a passivated or stopped
    /// incarnation's), until the release committed: [`Membership::owner`]
    /// waits for it, so that a new incarnation started meanwhile claims
    /// the formula afresh rather than keeps a placement the release then
    /// clears (its writes would all be fenced).
    releasing: Mutex<HashMap<FormulaId, Arc<tokio::sync::Notify>>>,
    /// As an owner: what each member last said of its followers of each
    /// agent's inbox.
    interest: Mutex<HashMap<FormulaId, HashMap<String, Interest>>>,
    /// As a follower's node: the order of what it tells owners of its
    /// followers ([`Membership::next_interest_seq`]).
    interest_seq: AtomicU64,
    /// As a sender: the members following an agent's inbox, as its owner
    /// said when it last reserved numbers in it, and the owner this node
    /// knew then (name, epoch).
    learned: Mutex<HashMap<FormulaId, Learned>>,
    /// As an owner: the inboxes owned here whose incarnation needs no
    /// wake-up (no guest runs there, nobody follows them here): it says so
    /// with the numbers it hands out ([`NO_WAKE`]).
    no_wake: Mutex<std::collections::HashSet<FormulaId>>,
    /// The cluster's placement policy, as last read with the members
    /// (true: `spread`).
    spread: AtomicBool,
    /// Where the next look for placements to hand over starts (None: the
    /// first): see [`crate::node::rebalance`].
    pub(crate) rebalance_from: Mutex<Option<FormulaId>>,
    /// A look for placements to hand over is running.
    pub(crate) rebalancing: AtomicBool,
    /// Placements this node handed over to the members that win them.
    pub handed_over: AtomicU64,
}

/// What a sender learned of an inbox from its owner: the members it
/// named, and the owner this node knew then (name, epoch).
type Learned = (Vec<String>, Option<(String, u64)>);

/// The note an owner adds to the members it names with the numbers it
/// hands out when its own node needs no wake-up for that inbox (its
/// incarnation runs no guest and has no follower). Senders that learned
/// it from the owner they still know skip the owner's wake-up: in a
/// cluster whose busy inbox (the bench's host) is mailed from every node,
/// those wake-ups were a member call per 5-15 sends on each other node, for
/// nothing. Never a member's name (letters, digits, '-', '_', '.'), so a
/// member that predates it wakes the owner as before.
pub const NO_WAKE: &str = "!no-wake";

/// Most take-overs remembered for a notice not yet given.
pub(super) const MAX_TAKEOVERS: usize = 10_000;

/// What a member last said of its followers of one inbox.
#[derive(Debug, Clone, Copy)]
struct Interest {
    /// It follows the inbox until then; or, `gone`, its last follower ended
    /// (kept as long, so that an older renewal arriving late is known old).
    until: Instant,
    gone: bool,
    /// Its order among the member's interest calls (0: a member that
    /// predates it; its calls are taken in the order they arrive).
    seq: u64,
}

impl Interest {
    /// Whether a call numbered `seq` comes after this one (not an older
    /// call that arrived late).
    fn superseded_by(&self, seq: u64) -> bool {
        seq == 0 || self.seq == 0 || seq >= self.seq
    }
}

impl Membership {
    /// Notes the outcome of a renewal or a registration: the error that
    /// failed it, or `None`.
    pub(crate) fn note_renewal(&self, error: Option<String>) {
        if let Ok(mut e) = self.renewal_error.lock() {
            *e = error;
        }
    }

    /// Why the last renewal failed, if it did.
    pub fn renewal_error(&self) -> Option<String> {
        self.renewal_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn new(cfg: ClusterConfig, link: mpsc::Sender<LinkOp>) -> Membership {
        Membership {
            lease: Mutex::new(Lease::new(cfg.lease)),
            members: Mutex::new(Vec::new()),
            owners: Mutex::new(HashMap::new()),
            link,
            fenced: AtomicU64::new(0),
            stepdowns: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            renewal_error: Mutex::new(None),
            deliveries_sent: AtomicU64::new(0),
            deliveries_received: AtomicU64::new(0),
            reserve_calls: AtomicU64::new(0),
            reserve_refused: AtomicU64::new(0),
            wake_calls: AtomicU64::new(0),
            reserve_us: AtomicU64::new(0),
            took_over: Mutex::new(HashMap::new()),
            releasing: Mutex::new(HashMap::new()),
            interest: Mutex::new(HashMap::new()),
            // Above what this node said before a restart (its wall clock,
            // in microseconds), so that the owner takes the new calls.
            interest_seq: AtomicU64::new(crate::clock::now_ms().saturating_mul(1000)),
            learned: Mutex::new(HashMap::new()),
            no_wake: Mutex::new(std::collections::HashSet::new()),
            spread: AtomicBool::new(false),
            rebalance_from: Mutex::new(None),
            rebalancing: AtomicBool::new(false),
            handed_over: AtomicU64::new(0),
            cfg,
        }
    }

    /// This node begins to give up its placement of `id`: until the guard
    /// is dropped (the release committed, or failed), [`Membership::owner`]
    /// waits before deciding who owns `id`. Forgets the cached owner.
    pub(crate) fn begin_release(self: &Arc<Self>, id: FormulaId) -> ReleaseGuard {
        self.forget_owner(&id);
        let notify = Arc::new(tokio::sync::Notify::new());
        if let Ok(mut r) = self.releasing.lock() {
            r.insert(id, notify.clone());
        }
        ReleaseGuard {
            m: self.clone(),
            id,
            notify,
        }
    }

    /// Waits (at most a lease) while this node is giving up its placement
    /// of `id` ([`Membership::begin_release`]).
    pub(super) async fn wait_release(&self, id: &FormulaId) {
        let deadline = Instant::now() + self.cfg.lease;
        loop {
            let Some(n) = self.releasing.lock().ok().and_then(|r| r.get(id).cloned()) else {
                return;
            };
            // (created before the second look: a release that ends in
            // between wakes it)
            let woken = n.notified();
            if !self
                .releasing
                .lock()
                .is_ok_and(|r| r.get(id).is_some_and(|x| Arc::ptr_eq(x, &n)))
            {
                continue;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return;
            }
        }
    }

    /// The number of this node's next interest call: calls are made in the
    /// background and may arrive out of order (a withdrawal after the
    /// renewal of a follower that started since), so the owner keeps what
    /// the latest one said.
    pub fn next_interest_seq(&self) -> u64 {
        self.interest_seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// What member `node`'s interest call numbered `seq` says of `agent`'s
    /// inbox (which this node owns), unless a later call of it arrived
    /// first: it follows the inbox for the next [`INTEREST_TTL`], or,
    /// `gone`, no longer (senders stop waking it at their next reservation;
    /// before withdrawals, an ended follower's node was woken for every
    /// message until its interest lapsed). Past [`MAX_INTERESTS`] agents,
    /// lapsed entries are dropped first, then the new one is not kept (its
    /// follower still sees everything, by reading the store a little later).
    pub fn note_interest(&self, agent: FormulaId, node: String, gone: bool, seq: u64) {
        let Ok(mut all) = self.interest.lock() else {
            return;
        };
        let now = Instant::now();
        if all.len() >= MAX_INTERESTS && !all.contains_key(&agent) {
            all.retain(|_, nodes| {
                nodes.retain(|_, i| i.until > now);
                !nodes.is_empty()
            });
            if all.len() >= MAX_INTERESTS || gone {
                // (a withdrawal of what is not kept needs no keeping)
                return;
            }
        }
        let nodes = all.entry(agent).or_default();
        if nodes
            .get(&node)
            .is_some_and(|i| i.until > now && !i.superseded_by(seq))
        {
            return;
        }
        if gone && seq == 0 {
            // a member that predates the order: forget it at once
            nodes.remove(&node);
        } else {
            nodes.insert(
                node,
                Interest {
                    until: now + INTEREST_TTL,
                    gone,
                    seq,
                },
            );
        }
        if nodes.is_empty() {
            all.remove(&agent);
        }
    }

    /// The members following `agent`'s inbox, as its owner knows them
    /// (first [`NO_WAKE`] when its incarnation here needs no wake-up).
    pub fn interested(&self, agent: &FormulaId) -> Vec<String> {
        let mut names = Vec::new();
        if self.no_wake.lock().is_ok_and(|q| q.contains(agent)) {
            names.push(NO_WAKE.to_string());
        }
        let Ok(mut all) = self.interest.lock() else {
            return names;
        };
        let now = Instant::now();
        let Some(nodes) = all.get_mut(agent) else {
            return names;
        };
        nodes.retain(|_, i| i.until > now);
        if nodes.is_empty() {
            all.remove(agent);
            return names;
        }
        names.extend(
            nodes
                .iter()
                .filter(|(_, i)| !i.gone)
                .map(|(n, _)| n.clone()),
        );
        names
    }

    /// What the owner of `agent` said of its followers when it reserved.
    pub fn learn_interest(&self, agent: FormulaId, nodes: Vec<String>) {
        let owner = self.cached_owner(&agent).map(|o| (o.name, o.epoch));
        if let Ok(mut l) = self.learned.lock() {
            if nodes.is_empty() {
                l.remove(&agent);
                return;
            }
            if l.len() >= MAX_INTERESTS && !l.contains_key(&agent) {
                l.clear();
            }
            l.insert(agent, (nodes, owner));
        }
    }

    /// As the owner of `agent`'s inbox: whether its incarnation here needs
    /// wake-ups for the messages other members commit to it (it runs a
    /// guest, or has followers here). Told by the incarnation whenever
    /// that changes, and forgotten when it stops.
    pub fn set_needs_wakes(&self, agent: FormulaId, needs: bool) {
        if let Ok(mut q) = self.no_wake.lock() {
            if needs {
                q.remove(&agent);
            } else {
                q.insert(agent);
            }
        }
    }

    /// The members to wake when a message was committed to `agent`'s inbox
    /// here: its owner, and the members following the inbox (as the owner
    /// told, or as this node knows as the owner). `None` when this node
    /// does not know the owner: then every member is told.
    pub fn delivery_targets(&self, agent: &FormulaId) -> Option<Vec<MemberRec>> {
        let owner = self.cached_owner(agent)?;
        let mut names = if owner.name == self.cfg.name && owner.epoch == self.epoch() {
            self.interested(agent)
        } else {
            let (mut n, said_by) = self
                .learned
                .lock()
                .ok()
                .and_then(|l| l.get(agent).cloned())
                .unwrap_or_default();
            // (the owner's "no wake-up" holds only while it still owns it:
            // a new owner may run a guest)
            let quiet = n.iter().any(|x| x == NO_WAKE)
                && said_by.is_some_and(|(name, epoch)| name == owner.name && epoch == owner.epoch);
            if !quiet {
                n.push(owner.name.clone());
            }
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

    /// The lease's state machine, locked (never held across an await).
    pub(super) fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.lease().epoch()
    }

    /// True while the lease is held on this node's own clock.
    pub fn serving(&self) -> bool {
        self.lease().serving(Instant::now().into_std())
    }

    /// How long the lease is certainly held still, on this node's clock.
    pub(crate) fn lease_left(&self) -> Duration {
        self.lease().left(Instant::now().into_std())
    }

    /// Stops renewing the lease and claiming formulas (leave or stop).
    pub fn set_leaving(&self) {
        self.lease().leave();
    }

    /// Whether the node leaves or stops (its lease is no longer renewed).
    pub fn leaving(&self) -> bool {
        self.lease().leaving()
    }

    /// The cluster's placement policy, as this node last read it.
    pub fn policy(&self) -> crate::rules::placement::Policy {
        match self.spread.load(Ordering::Relaxed) {
            true => crate::rules::placement::Policy::Spread,
            false => crate::rules::placement::Policy::Local,
        }
    }

    pub(super) fn set_policy(&self, p: crate::rules::placement::Policy) {
        let spread = p == crate::rules::placement::Policy::Spread;
        if self.spread.swap(spread, Ordering::Relaxed) != spread {
            tracing::info!(node = %self.cfg.name, policy = p.name(), "placement policy");
        }
    }

    /// Whether this node claims no new work (drained, or leaving).
    pub fn draining(&self) -> bool {
        self.lease().draining()
    }

    /// Applies a renewal's outcome; says what the lease loop does.
    pub(crate) fn on_renewal(&self, r: Renewal) -> Action {
        self.lease().on_renewal(r, Instant::now().into_std())
    }

    /// The live members seen at the last renewal.
    pub fn members(&self) -> Vec<MemberRec> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Whether every live member reads record layout `version`
    /// ([`super::records::RECORDS_VERSION`]); false until this node has
    /// listed the members once.
    pub fn all_read(&self, version: u32) -> bool {
        // (asked by every stored value: no copy of the list)
        self.members
            .lock()
            .is_ok_and(|m| !m.is_empty() && m.iter().all(|m| m.records >= version))
    }

    /// The member this node relays its busy commits to, so that the
    /// cluster's commits share the store's requests (`capstan_cluster::relay`):
    /// the [merger](Self::commit_merger), unless that is this node (it
    /// merges what the others relay) or there is none.
    pub fn commit_relay(&self) -> Option<MemberRec> {
        self.commit_merger()
            .filter(|first| first.name != self.cfg.name)
    }

    /// The member that merges the cluster's relayed commits, as this node
    /// sees it (this node itself, perhaps): the first by name of the live
    /// members that take relayed commits and are not draining. Every node
    /// picks the same one from the same listing; two picks during a change
    /// of members only split the merging for a moment (any member commits
    /// what it is relayed).
    pub fn commit_merger(&self) -> Option<MemberRec> {
        let members = self.members.lock().ok()?;
        // (a member killed since the listing stops being picked once its
        // lease ran out on the wall clock, before the next listing)
        let now = crate::clock::now_ms();
        members
            .iter()
            .filter(|m| m.relays && !m.draining && (m.name == self.cfg.name || m.live(now)))
            .min_by(|a, b| a.name.cmp(&b.name))
            .cloned()
    }

    /// The live members other than this node.
    pub fn others(&self) -> Vec<MemberRec> {
        self.members()
            .into_iter()
            .filter(|m| m.name != self.cfg.name)
            .collect()
    }

    /// The members following `agent`'s inbox, as this node knows them: as
    /// its owner, or as its owner said with the last numbers it reserved.
    pub fn followers_of(&self, agent: &FormulaId) -> Vec<String> {
        match self.cached_owner(agent) {
            Some(o) if o.name == self.cfg.name && o.epoch == self.epoch() => self.interested(agent),
            _ => self
                .learned
                .lock()
                .ok()
                .and_then(|l| l.get(agent).map(|(n, _)| n.clone()))
                .unwrap_or_default(),
        }
    }

    /// The owner of `id` as this node last learned it (none: unknown).
    pub fn cached_owner(&self, id: &FormulaId) -> Option<MemberRec> {
        self.owners.lock().ok()?.get(id).map(|(m, _)| m.clone())
    }

    /// The owner of `id` as this node learned it, when it is this node or
    /// was learned less than two leases ago. An answer naming another
    /// member is asked again after that: the member may have given the
    /// formula up without this node hearing of it (handed over under
    /// spreading, or drained: a routine or a guest with unhandled mail,
    /// which nothing else makes a node ask about, would otherwise wait on
    /// a live member that no longer holds it).
    pub(super) fn fresh_owner(&self, id: &FormulaId) -> Option<MemberRec> {
        let o = self.owners.lock().ok()?;
        let (m, learned) = o.get(id)?;
        let mine = m.name == self.cfg.name && m.epoch == self.epoch();
        (mine || learned.elapsed() < self.cfg.lease * 2).then(|| m.clone())
    }

    /// Remembers that `m` owns `id`.
    pub(super) fn learn_owner(&self, id: FormulaId, m: MemberRec) {
        if let Ok(mut o) = self.owners.lock() {
            o.insert(id, (m, Instant::now()));
        }
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
}

/// A release of a placement in progress ([`Membership::begin_release`]).
pub(crate) struct ReleaseGuard {
    m: Arc<Membership>,
    id: FormulaId,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if let Ok(mut r) = self.m.releasing.lock()
            && r.get(&self.id)
                .is_some_and(|x| Arc::ptr_eq(x, &self.notify))
        {
            r.remove(&self.id);
        }
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        let (tx, _rx) = mpsc::channel(1);
        Membership::new(
            ClusterConfig {
                name: "n1".into(),
                node_id: "id".into(),
                addr: "127.0.0.1:1".into(),
                lease: std::time::Duration::from_secs(1),
            },
            tx,
        )
    }

    fn rec(name: &str, expires_ms: u64, relays: bool, draining: bool) -> MemberRec {
        MemberRec {
            name: name.into(),
            node_id: format!("id-{name}"),
            addr: format!("{name}:1"),
            epoch: 1,
            pid: 1,
            started_ms: 0,
            renewed_ms: 0,
            expires_ms,
            draining,
            records: super::super::records::RECORDS_VERSION,
            relays,
        }
    }

    #[test]
    fn the_commit_relay_is_the_first_live_member_that_takes_relays() {
        let far = crate::clock::now_ms() + 60_000;
        let names = |m: &Membership| m.commit_relay().map(|r| r.name);
        // this node (n1) first: it merges, relays nowhere
        let m = membership();
        *m.members.lock().unwrap() = vec![rec("n2", far, true, false), rec("n1", far, true, false)];
        assert_eq!(names(&m), None);
        // an older build first (no relays), or a draining member: skipped
        *m.members.lock().unwrap() = vec![
            rec("n0", far, false, false),
            rec("n1", far, true, true),
            rec("n3", far, true, false),
            rec("n2", far, true, false),
        ];
        assert_eq!(names(&m).as_deref(), Some("n2"));
        // a member whose lease ran out since the listing (killed): skipped
        *m.members.lock().unwrap() = vec![
            rec("n0", 1, true, false),
            rec("n1", far, true, true),
            rec("n2", far, true, false),
        ];
        assert_eq!(names(&m).as_deref(), Some("n2"));
        // nobody listed yet
        *m.members.lock().unwrap() = vec![];
        assert_eq!(names(&m), None);
    }

    #[test]
    fn a_member_whose_followers_ended_is_no_longer_woken() {
        let m = membership();
        let (a, b) = (FormulaId::random(), FormulaId::random());
        m.note_interest(a, "n2".into(), false, 1);
        m.note_interest(a, "n3".into(), false, 1);
        m.note_interest(b, "n2".into(), false, 2);
        let mut names = m.interested(&a);
        names.sort();
        assert_eq!(names, ["n2", "n3"]);
        m.note_interest(a, "n2".into(), true, 3);
        assert_eq!(m.interested(&a), ["n3"]);
        // only that inbox, only that member
        assert_eq!(m.interested(&b), ["n2"]);
        m.note_interest(a, "n3".into(), true, 2);
        assert!(m.interested(&a).is_empty());
        // a withdrawal of what was never noted changes nothing
        m.note_interest(b, "n9".into(), true, 1);
        assert_eq!(m.interested(&b), ["n2"]);
        // following again after a withdrawal counts again
        m.note_interest(a, "n2".into(), false, 4);
        assert_eq!(m.interested(&a), ["n2"]);
    }

    /// An owner whose incarnation needs no wake-up says so with what it
    /// names ([`NO_WAKE`], first); a sender that learned it from the owner
    /// it still knows wakes only the followers, and wakes the owner again
    /// once the inbox has another owner (or the same node under a new
    /// epoch) or the owner said nothing of the kind.
    #[test]
    fn an_owner_that_needs_no_wake_up_is_not_woken() {
        let far = crate::clock::now_ms() + 60_000;
        // as the owner
        let m = membership();
        let a = FormulaId::random();
        m.note_interest(a, "n2".into(), false, 1);
        assert_eq!(m.interested(&a), ["n2"]);
        m.set_needs_wakes(a, false);
        assert_eq!(m.interested(&a), [NO_WAKE, "n2"]);
        m.set_needs_wakes(a, true);
        assert_eq!(m.interested(&a), ["n2"]);
        // as a sender on n1; n2 owns the inbox, n3 follows it
        let m = membership();
        *m.members.lock().unwrap() = vec![
            rec("n1", far, true, false),
            rec("n2", far, true, false),
            rec("n3", far, true, false),
        ];
        let own = |m: &Membership, name: &str, epoch: u64| {
            let mut r = rec(name, far, true, false);
            r.epoch = epoch;
            m.learn_owner(a, r);
        };
        let woken = |m: &Membership| {
            let mut n: Vec<String> = m
                .delivery_targets(&a)
                .unwrap()
                .into_iter()
                .map(|r| r.name)
                .collect();
            n.sort();
            n
        };
        own(&m, "n2", 1);
        m.learn_interest(a, vec!["n3".into()]);
        assert_eq!(woken(&m), ["n2", "n3"]);
        m.learn_interest(a, vec![NO_WAKE.into(), "n3".into()]);
        assert_eq!(woken(&m), ["n3"], "the owner said it needs no wake-up");
        m.learn_interest(a, vec![NO_WAKE.into()]);
        assert!(woken(&m).is_empty());
        // n2 back under a new epoch, or n3 owning it now: they may run a
        // guest, and said nothing yet
        own(&m, "n2", 2);
        assert_eq!(woken(&m), ["n2"]);
        own(&m, "n3", 1);
        assert_eq!(woken(&m), ["n3"]);
        // and what the new owner says counts
        m.learn_interest(a, vec![NO_WAKE.into()]);
        assert!(woken(&m).is_empty());
        m.learn_interest(a, vec![]);
        assert_eq!(woken(&m), ["n3"]);
    }

    /// A member's interest calls go in the background and can arrive out of
    /// order: the owner keeps what the latest one said.
    #[test]
    fn a_late_interest_call_does_not_undo_a_later_one() {
        let m = membership();
        let a = FormulaId::random();
        // the last follower ended (5), then a new one started (6); the
        // withdrawal arrives second
        m.note_interest(a, "n2".into(), false, 6);
        m.note_interest(a, "n2".into(), true, 5);
        assert_eq!(
            m.interested(&a),
            ["n2"],
            "a late withdrawal dropped a follower"
        );
        // a follower started (7) and ended (8); the renewal arrives second
        m.note_interest(a, "n2".into(), true, 8);
        m.note_interest(a, "n2".into(), false, 7);
        assert!(
            m.interested(&a).is_empty(),
            "a late renewal outlived its withdrawal"
        );
        // and the next call counts
        m.note_interest(a, "n2".into(), false, 9);
        assert_eq!(m.interested(&a), ["n2"]);
        // a member that predates the order: calls taken as they arrive
        m.note_interest(a, "n2".into(), true, 0);
        assert!(m.interested(&a).is_empty());
        m.note_interest(a, "n2".into(), false, 0);
        assert_eq!(m.interested(&a), ["n2"]);
    }
}
