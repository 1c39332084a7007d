//! When the outbox delivers mail to each peer cluster, and what becomes of
//! an item that cannot be delivered.
//!
//! Mail owed to other clusters waits in a queue per peer cluster. A
//! *courier* delivers one batch of a queue at a time; at most
//! [`Schedule::couriers`] run at once, and when more queues have mail than
//! that, each gets its turn (round robin from the last one started). A
//! queue whose delivery failed for a reason that may pass (the peer is
//! down, the link broke) is tried again after a backoff that doubles from
//! [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]; a delivery that went through
//! resets it. An item is retried that way until it is [`EXPIRY`] old
//! (settable), then bounced to its sender once, with the queue's last error;
//! a refusal for good bounces it at once ([`verdict`]).
//!
//! The async shell (`nodes`' network module) lists the queues, asks
//! [`Schedule::plan`] which couriers to start and when to look again, runs
//! them, and reports each outcome with [`Schedule::finished`]. Time comes in
//! as an argument: the tests below drive the schedule alone, without
//! sockets, store or sleeps.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// First wait before a peer cluster's queue is tried again after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between tries of a queue (also how often an idle outbox
/// looks again at worst).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most couriers delivering at the same time.
pub const COURIERS: usize = 64;
/// How long an item that keeps failing for a reason that may pass is
/// retried before its sender gets it back as undeliverable.
pub const EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// The wait before a queue is tried again after a turn that failed, having
/// settled `settled` items: the last wait `prev` doubled (up to
/// [`MAX_BACKOFF`]) when nothing moved, else [`FIRST_BACKOFF`] (see
/// [`Schedule::finished`]).
pub fn next_backoff(prev: Option<Duration>, settled: usize) -> Duration {
    match prev {
        Some(d) if settled == 0 => (d * 2).min(MAX_BACKOFF),
        _ => FIRST_BACKOFF,
    }
}

/// A queue's identity: the peer cluster's id.
pub type Peer = [u8; 32];

/// A queue that failed, and when it may be tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backoff {
    next: Instant,
    delay: Duration,
    /// Why the last try failed (for the bounce at the expiry).
    last_error: String,
}

/// What [`Schedule::plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Start a courier for each of these queues now, in this order.
    pub start: Vec<Peer>,
    /// Look again at this time at the latest (sooner when mail arrives or
    /// a courier finishes).
    pub wake: Instant,
}

/// The outbox's couriers: which queues have one now, and which wait out a
/// backoff.
#[derive(Debug, Clone)]
pub struct Schedule {
    couriers: usize,
    busy: HashSet<Peer>,
    backoff: HashMap<Peer, Backoff>,
    /// The last queue given a courier: the next turn starts after it.
    last: Option<Peer>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new(COURIERS)
    }
}

impl Schedule {
    /// A schedule running at most `couriers` (at least one) at once.
    pub fn new(couriers: usize) -> Self {
        Schedule {
            couriers: couriers.max(1),
            busy: HashSet::new(),
            backoff: HashMap::new(),
            last: None,
        }
    }

    /// The most couriers at once.
    pub fn couriers(&self) -> usize {
        self.couriers
    }

    /// Given the queues that have mail (ascending; `complete` when that is
    /// all of them, not one page), which couriers to start at `now`: every
    /// queue without a courier whose backoff is over, round robin from the
    /// one after the last started, as long as couriers are free. The
    /// backoff of queues that emptied is forgotten (a complete listing
    /// only).
    pub fn plan(&mut self, peers: &[Peer], complete: bool, now: Instant) -> Plan {
        if complete {
            self.backoff.retain(|c, _| peers.contains(c));
        }
        let mut order: Vec<Peer> = peers.to_vec();
        if let Some(l) = self.last
            && let Some(i) = order.iter().position(|c| *c > l)
        {
            order.rotate_left(i);
        }
        let mut wake = now + MAX_BACKOFF;
        let mut start = Vec::new();
        for c in order {
            if self.busy.contains(&c) {
                continue;
            }
            if let Some(b) = self.backoff.get(&c)
                && b.next > now
            {
                wake = wake.min(b.next);
                continue;
            }
            if self.busy.len() >= self.couriers {
                break;
            }
            self.busy.insert(c);
            self.last = Some(c);
            start.push(c);
        }
        Plan { start, wake }
    }

    /// The last error of `peer`'s queue, if its last try failed.
    pub fn last_error(&self, peer: &Peer) -> Option<&str> {
        self.backoff.get(peer).map(|b| b.last_error.as_str())
    }

    /// `peer`'s courier finished at `now`, having delivered or bounced
    /// `settled` items: all its batch (its backoff is reset), or stopped at
    /// one that failed for a reason that may pass: its backoff doubles,
    /// unless items went through before it (then it starts again from
    /// [`FIRST_BACKOFF`]: on a link that drops one call in a few, a queue
    /// that moves is not held back as one that does not; doubling there
    /// drained a queue one 30-s wait per dropped call).
    pub fn finished(
        &mut self,
        peer: Peer,
        outcome: Result<(), String>,
        settled: usize,
        now: Instant,
    ) {
        self.busy.remove(&peer);
        match outcome {
            Ok(()) => {
                self.backoff.remove(&peer);
            }
            Err(why) => {
                let delay = next_backoff(self.backoff.get(&peer).map(|b| b.delay), settled);
                self.backoff.insert(
                    peer,
                    Backoff {
                        next: now + delay,
                        delay,
                        last_error: why,
                    },
                );
            }
        }
    }

    /// Whether `peer`'s queue has a courier now.
    pub fn is_busy(&self, peer: &Peer) -> bool {
        self.busy.contains(peer)
    }
}

/// What to do with an outbox item before trying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Try to deliver it.
    Deliver,
    /// It is past the expiry: bounce it to its sender with this reason.
    Expired(String),
}

/// The verdict on an item `age` old, with `expiry` the longest an item is
/// retried and `last_error` its queue's last failure.
pub fn verdict(age: Duration, expiry: Duration, last_error: Option<&str>) -> Verdict {
    if age < expiry {
        return Verdict::Deliver;
    }
    Verdict::Expired(format!(
        "not within {}, the most the outbox keeps trying; last error: {}",
        human_duration(expiry),
        last_error.unwrap_or("none recorded (this node restarted since its last attempt)")
    ))
}

/// What becomes of an item whose delivery failed: retried later when the
/// failure may pass (the peer or the link), bounced at once when the far
/// side refused it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Keep it; try the queue again after its backoff.
    Retry,
    /// Bounce it to its sender now.
    Bounce,
}

/// The failure of an item the far side answered with an error of `kind`
/// (see [`crate::ErrorKind`]): what may pass is retried (a damaged record
/// there too: it may be restored), the rest bounced. The same rule as
/// [`crate::Error::is_transient`], which picks the exception type the far
/// side answers with.
pub fn on_refusal(kind: crate::ErrorKind) -> Failure {
    use crate::ErrorKind as K;
    match kind {
        K::Retry | K::Unreachable | K::Damaged => Failure::Retry,
        K::Invalid | K::NotFound | K::Refused | K::Failed => Failure::Bounce,
    }
}

/// `24 h`, `5 min`, `3 s`, `1500 ms`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 || d.subsec_nanos() != 0 {
        format!("{} ms", d.as_millis())
    } else if s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> Peer {
        [n; 32]
    }

    #[test]
    fn a_failing_queue_backs_off_doubling_to_the_cap_and_a_success_resets_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(4);
        let p = peer(1);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..10 {
            let plan = s.plan(&[p], true, now);
            assert_eq!(plan.start, vec![p], "its backoff is over: it goes");
            s.finished(p, Err("peer down".into()), 0, now);
            let plan = s.plan(&[p], true, now);
            assert!(plan.start.is_empty(), "waits out its backoff");
            delays.push(plan.wake - now);
            now = plan.wake;
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(s.last_error(&p), Some("peer down"));
        // Delivered: the next failure starts again from the first backoff.
        s.plan(&[p], true, now);
        s.finished(p, Ok(()), 0, now);
        assert_eq!(s.last_error(&p), None);
        s.plan(&[p], true, now);
        s.finished(p, Err("again".into()), 0, now);
        assert_eq!(s.plan(&[p], true, now).wake - now, FIRST_BACKOFF);
    }

    #[test]
    fn a_queue_that_moved_before_it_failed_is_tried_again_soon() {
        let t0 = Instant::now();
        let mut s = Schedule::new(4);
        let p = peer(1);
        let mut now = t0;
        // nothing goes through: 200, 400, 800 ms, ...
        for want in [200, 400, 800] {
            s.plan(&[p], true, now);
            s.finished(p, Err("dropped".into()), 0, now);
            let wake = s.plan(&[p], true, now).wake;
            assert_eq!((wake - now).as_millis(), want);
            now = wake;
        }
        // five items went through, then a call was dropped: soon again
        s.plan(&[p], true, now);
        s.finished(p, Err("dropped".into()), 5, now);
        let wake = s.plan(&[p], true, now).wake;
        assert_eq!(wake - now, FIRST_BACKOFF);
        now = wake;
        // and stuck at that item again: doubling from there
        s.plan(&[p], true, now);
        s.finished(p, Err("dropped".into()), 0, now);
        assert_eq!((s.plan(&[p], true, now).wake - now).as_millis(), 400);
        assert_eq!(s.last_error(&p), Some("dropped"));
    }

    #[test]
    fn a_dead_peer_delays_only_its_own_queue() {
        let now = Instant::now();
        let mut s = Schedule::new(8);
        let (dead, live) = (peer(1), peer(2));
        let plan = s.plan(&[dead, live], true, now);
        assert_eq!(plan.start, vec![dead, live]);
        s.finished(dead, Err("no answer".into()), 0, now);
        s.finished(live, Ok(()), 0, now);
        // New mail for both: the live queue goes at once, the dead one waits.
        let plan = s.plan(&[dead, live], true, now);
        assert_eq!(plan.start, vec![live]);
        assert_eq!(plan.wake, now + FIRST_BACKOFF);
    }

    #[test]
    fn one_courier_per_queue_and_no_more_than_the_limit() {
        let now = Instant::now();
        let mut s = Schedule::new(2);
        let peers = [peer(1), peer(2), peer(3)];
        let plan = s.plan(&peers, true, now);
        assert_eq!(plan.start, vec![peer(1), peer(2)]);
        // Still busy: nothing new, not even a second courier for peer 1.
        assert!(s.plan(&peers, true, now).start.is_empty());
        assert!(s.is_busy(&peer(1)));
        // One finishes: the queue after the last started gets its turn.
        s.finished(peer(1), Ok(()), 0, now);
        assert_eq!(s.plan(&peers, true, now).start, vec![peer(3)]);
        s.finished(peer(2), Ok(()), 0, now);
        s.finished(peer(3), Ok(()), 0, now);
        // Round robin: after peer 3 comes peer 1 again.
        assert_eq!(s.plan(&peers, true, now).start, vec![peer(1), peer(2)]);
    }

    #[test]
    fn the_backoff_of_an_emptied_queue_is_forgotten_on_a_complete_listing_only() {
        let now = Instant::now();
        let mut s = Schedule::new(4);
        let p = peer(7);
        s.plan(&[p], true, now);
        s.finished(p, Err("down".into()), 0, now);
        // A partial listing (a page) that does not show it keeps its backoff.
        s.plan(&[peer(1)], false, now);
        assert_eq!(s.last_error(&p), Some("down"));
        s.finished(peer(1), Ok(()), 0, now);
        // The complete listing without it: its queue emptied (bounced or
        // delivered elsewhere); new mail later starts without a wait.
        s.plan(&[], true, now);
        assert_eq!(s.last_error(&p), None);
        assert_eq!(s.plan(&[p], true, now).start, vec![p]);
    }

    #[test]
    fn an_item_is_tried_until_the_expiry_then_bounced_with_the_last_error() {
        let expiry = Duration::from_secs(3600);
        assert_eq!(
            verdict(expiry - Duration::from_millis(1), expiry, Some("x")),
            Verdict::Deliver
        );
        match verdict(expiry, expiry, Some("peer down")) {
            Verdict::Expired(why) => {
                assert!(why.contains("1 h") && why.contains("peer down"), "{why}")
            }
            v => panic!("{v:?}"),
        }
        match verdict(expiry * 2, expiry, None) {
            Verdict::Expired(why) => assert!(why.contains("restarted"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn what_may_pass_is_retried_and_a_refusal_bounces() {
        use crate::ErrorKind as K;
        for k in [K::Retry, K::Unreachable, K::Damaged] {
            assert_eq!(on_refusal(k), Failure::Retry, "{k}");
        }
        for k in [K::Invalid, K::NotFound, K::Refused, K::Failed] {
            assert_eq!(on_refusal(k), Failure::Bounce, "{k}");
        }
        // The far side picks its answer's exception type by is_transient:
        // both rules agree on every error.
        use crate::Error as E;
        use capstan_cluster::StoreError as S;
        let errors = [
            E::InvalidName("x".into()),
            E::UnknownName("x".into()),
            E::NameTaken("x".into()),
            E::UnknownMessage(1),
            E::AlreadySettled(1),
            E::Invalid("x".into()),
            E::Corrupt("x".into()),
            E::Store(S::Conflict),
            E::Store(S::ValueTooLarge { len: 2, max: 1 }),
            E::Fenced("x".into()),
            E::Unavailable("x".into()),
            E::Unreachable("x".into()),
            E::Cancelled("x".into()),
            E::Llm("x".into()),
            E::RecipientMoved,
        ];
        for e in errors {
            assert_eq!(
                on_refusal(e.kind()) == Failure::Retry,
                e.is_transient(),
                "{e:?}"
            );
        }
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human_duration(EXPIRY), "24 h");
        assert_eq!(human_duration(Duration::from_secs(300)), "5 min");
        assert_eq!(human_duration(Duration::from_millis(3000)), "3 s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500 ms");
    }
}
