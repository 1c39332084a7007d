//! Per-agent inbox quotas: how many messages and bytes an inbox may hold.
//!
//! The send path is the cluster's hottest, so the quota costs it no store
//! read: the count is kept by the inbox's *owner* (the incarnation that
//! hands out its numbers, [`crate::incarnation::AgentActor`]), next to its
//! number sequence. A sender asks the owner for a number and, with it, to
//! admit one message of about its size; the owner refuses at once when the
//! inbox is full, before any number is handed out or anything written.
//!
//! The owner's count is an account, not a transaction: it counts the inbox
//! once from the store when it first needs to (after each incarnation, so
//! also after a restart or a failover), then adds what it admits. Whatever
//! else changes the inbox (dismissals on any node, messages an agent sends
//! itself, a send that failed after its number was reserved) is found by a
//! recount, made only when the account says the inbox is full — at most
//! once per [`RECOUNT_EVERY`] (backing off to [`RECOUNT_MAX`] while the
//! inbox stays full), or at once after a dismissal on this node. So a
//! dismissal gives its room back (on another cluster node: within the
//! backoff). A recount keeps the room of sends admitted but not written
//! yet (the owner remembers the numbers it handed out with admissions,
//! [`Account::handed_out`], and counts those above the highest number
//! written or dismissed), so concurrent sends do not overfill an inbox;
//! a send that commits out of number order can let one more in early. A
//! node's concurrent sends into one inbox admit their messages in one
//! call to the owner, all or none (then each alone).
//!
//! Limits are per agent, set by a host (`capstan quota AGENT --messages N
//! --bytes B`); an agent without its own has [`Quota::default`]. The owner
//! reads them with the count, and again at each recount and each idle tick.

use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_cluster::Transaction;
use capstan_cluster::tuple::TupleKey;
use capstan_proto::FormulaId;

use crate::agent::{AgentHandle, checked_dedup};
use crate::clock::now_ms;
use crate::error::Error;
use crate::model;
use crate::records::DedupAnswer;
use crate::registry::AgentMsg;
use capstan_proto::RequestId;

/// Messages an inbox holds at most unless its host set otherwise.
pub const DEFAULT_MAX_MESSAGES: u64 = 100_000;
/// Bytes (of stored messages) an inbox holds at most unless its host set
/// otherwise: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Least time between two recounts of a full inbox (none sooner, unless a
/// dismissal on this node asks for one).
pub const RECOUNT_EVERY: Duration = Duration::from_millis(100);
/// Most time between two recounts of an inbox that stays full.
pub const RECOUNT_MAX: Duration = Duration::from_secs(5);
/// Messages read at a time by a count.
const COUNT_PAGE: usize = 2_000;
/// Numbers a count reads at a time ([`count`]).
const COUNT_WINDOW: u64 = COUNT_PAGE as u64;

/// The limits of one inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl Quota {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.max_messages.to_be_bytes());
        v.extend_from_slice(&self.max_bytes.to_be_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<Quota, Error> {
        if b.len() != 16 {
            return Err(Error::Corrupt("an inbox quota is not 16 bytes".into()));
        }
        let n = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Quota {
            max_messages: n(0),
            max_bytes: n(8),
        })
    }
}

/// The key of an agent's own limits (absent: the defaults).
pub fn key(agent: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("quota")
        .bytes(agent.as_bytes())
        .into_vec()
}

/// The limits of `agent`'s inbox, and whether they are its own.
pub async fn limits(tx: &mut Transaction, agent: &FormulaId) -> Result<(Quota, bool), Error> {
    Ok(match tx.get(&key(agent)).await? {
        Some(b) => (Quota::decode(&b)?, true),
        None => (Quota::default(), false),
    })
}

/// Sets `agent`'s limits; `None` (or zeros) go back to the defaults.
pub fn set_limits(tx: &mut Transaction, agent: &FormulaId, q: Option<Quota>) -> Result<(), Error> {
    match q {
        Some(q) => {
            let d = Quota::default();
            let q = Quota {
                max_messages: if q.max_messages == 0 {
                    d.max_messages
                } else {
                    q.max_messages
                },
                max_bytes: if q.max_bytes == 0 {
                    d.max_bytes
                } else {
                    q.max_bytes
                },
            };
            if q == d {
                tx.clear(&key(agent));
            } else {
                tx.set(&key(agent), &q.encode())?;
            }
        }
        None => tx.clear(&key(agent)),
    }
    Ok(())
}

/// Messages and bytes (as stored) in `agent`'s inbox, and the highest
/// number written: a scan (not for the send path).
///
/// The scan reads the inbox in windows of [`COUNT_WINDOW`] numbers
/// (`[m(n), m(n + W))`), not in pages of one range reaching to the end of
/// the inbox: etcd 3.4 walks a range request's whole `[begin, end)` in its
/// index whatever the limit, so pages of one open range cost N²/2P key
/// visits (a 40,000-message inbox took 3.0-3.7 s to count, 3.9 s of etcd
/// CPU, and its owner handed out no numbers meanwhile: senders timed out).
/// A window walks at most its own keys. Where a window is empty, a one-key
/// read from there finds the next message (a walk of what lies beyond,
/// once per gap), so a sparse inbox costs no run of empty windows.
pub async fn count(
    tx: &mut Transaction,
    agent: &FormulaId,
) -> Result<(u64, u64, Option<u64>), Error> {
    let prefix = crate::keys::inbox(agent);
    let end = capstan_cluster::tuple::prefix_end(&prefix);
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut last = None;
    let mut tally = |rows: &[(Vec<u8>, Vec<u8>)], last: &mut Option<u64>| {
        for (k, v) in rows {
            messages += 1;
            bytes += v.len() as u64;
            *last = crate::keys::message_number(k).or(*last);
        }
    };
    let mut from = 0u64;
    loop {
        // The next message at or above `from`, if any (from the prefix
        // itself at first: a damaged key before number 0 counts too).
        let probe = tx
            .snapshot_range(&capstan_cluster::RangeOption {
                begin: if from == 0 {
                    prefix.clone()
                } else {
                    crate::keys::message(agent, from)
                },
                end: end.clone(),
                limit: 1,
                reverse: false,
            })
            .await?;
        let Some((k, _)) = probe.first() else { break };
        let Some(mut lo) = crate::keys::message_number(k) else {
            // Not a message key (a damaged record): count the rest a page
            // at a time, as a plain listing would.
            let mut begin = k.clone();
            loop {
                let rows = tx
                    .snapshot_range(&capstan_cluster::RangeOption {
                        begin: begin.clone(),
                        end: end.clone(),
                        limit: COUNT_PAGE,
                        reverse: false,
                    })
                    .await?;
                tally(&rows, &mut last);
                match rows.last() {
                    Some((k, _)) if rows.len() == COUNT_PAGE => {
                        begin = capstan_cluster::store::key_after(k)
                    }
                    _ => return Ok((messages, bytes, last)),
                }
            }
        };
        // Windows from there while they find messages.
        loop {
            let hi = lo.checked_add(COUNT_WINDOW);
            let rows = tx
                .snapshot_range(&capstan_cluster::RangeOption {
                    begin: crate::keys::message(agent, lo),
                    end: hi.map_or_else(|| end.clone(), |h| crate::keys::message(agent, h)),
                    limit: COUNT_PAGE,
                    reverse: false,
                })
                .await?;
            tally(&rows, &mut last);
            let next = match rows.last() {
                // a full page: on from its last number (the window may hold more)
                // (or, the last key damaged, from the window's end)
                Some((k, _)) if rows.len() == COUNT_PAGE => crate::keys::message_number(k)
                    .and_then(|n| n.checked_add(1))
                    .or(hi),
                // the window read whole: on from its end
                Some(_) => hi,
                None => None,
            };
            match (next, hi) {
                (Some(n), _) => lo = n,
                // an empty window: look for the next message past it
                (None, Some(h)) if rows.is_empty() => {
                    from = h;
                    break;
                }
                // the window reached the top of the numbers
                _ => return Ok((messages, bytes, last)),
            }
        }
    }
    Ok((messages, bytes, last))
}

/// About the bytes a message takes in the store: its text and names, 32
/// per reference, and the record's fixed part.
pub fn message_size(text: usize, names: usize, refs: usize) -> u64 {
    (text + names + 32 * refs + 160) as u64
}

/// An inbox's use and limits, as `capstan quota` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaView {
    pub agent: FormulaId,
    pub messages: u64,
    pub bytes: u64,
    pub limits: Quota,
    /// Whether the limits are the defaults (the agent has none of its own).
    pub default: bool,
}

pub use crate::types::{Admit, Counted};

/// What an owner knows of its inbox's use ([`crate::incarnation`] keeps
/// one per owned inbox).
#[derive(Debug, Default)]
pub struct Account {
    counted: bool,
    messages: u64,
    bytes: u64,
    limits: Quota,
    recounted: Option<Instant>,
    /// Least time to the next recount of an inbox that stays full: from
    /// [`RECOUNT_EVERY`], doubled by each recount that found it still full
    /// (up to [`RECOUNT_MAX`]), so a flood of sends to a full inbox does
    /// not turn into a flood of scans.
    backoff: Duration,
    /// A dismissal (or a new limit) on this node: recount at the next
    /// refusal without waiting for [`RECOUNT_EVERY`].
    stale: bool,
    /// Room was given back since the running count began
    /// ([`Account::begin_count`]): that count may have read the inbox
    /// before the dismissal, so its result leaves the account stale.
    freed_while_counting: bool,
    /// Numbers handed out with admitted messages, oldest first, until a
    /// recount finds them below the highest number written or dismissed
    /// (or [`PENDING_TTL`] passes): a recount adds those above it, sends
    /// admitted but still in flight, so that they keep their room (a
    /// recount that forgot them let a busy inbox fill to twice its quota).
    /// At most [`MAX_PENDING`].
    pending: std::collections::VecDeque<Pending>,
}

/// Admitted messages whose numbers were handed out ([`Account::pending`]).
#[derive(Debug)]
struct Pending {
    first: u64,
    numbers: u64,
    admit: Admit,
    at: Instant,
}

/// How long an admitted message's number is taken as in flight when a
/// recount does not find it written (after that, its send failed).
pub const PENDING_TTL: Duration = Duration::from_secs(10);
/// Most admissions remembered as in flight (the oldest go first).
pub const MAX_PENDING: usize = 4096;

impl Account {
    fn fits(&self, a: Admit) -> bool {
        self.messages.saturating_add(a.messages) <= self.limits.max_messages
            && self.bytes.saturating_add(a.bytes) <= self.limits.max_bytes
    }

    /// Something on this node gave room back or changed the limits.
    pub fn note_freed(&mut self) {
        self.stale = true;
        self.freed_while_counting = true;
    }

    /// A count ([`Account::read_count`]) is starting: dismissals noted
    /// from now on may be missing from what it reads.
    pub fn begin_count(&mut self) {
        self.freed_while_counting = false;
    }

    /// Whether the limits should be read again (on an idle tick).
    pub fn counted(&self) -> bool {
        self.counted
    }

    /// Numbers `first..first + numbers` were handed out with admission `a`
    /// (see [`Account::pending`]).
    pub fn handed_out(&mut self, first: u64, numbers: u64, a: Admit) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Pending {
            first,
            numbers,
            admit: a,
            at: Instant::now(),
        });
    }

    /// New limits, read on a tick.
    pub fn set_limits(&mut self, q: Quota) {
        if q != self.limits {
            self.limits = q;
        }
    }

    /// Whether admitting `a` needs a count of the inbox first: the first
    /// admission, and a refusal when the last count is old enough (or room
    /// was given back since).
    pub fn needs_count(&self, a: Admit) -> bool {
        let recount_due = self.stale
            || self
                .recounted
                .is_none_or(|t| t.elapsed() >= self.backoff.max(RECOUNT_EVERY));
        !self.counted || (!self.fits(a) && recount_due)
    }

    /// Reads what a count needs: the inbox's limits, its messages and
    /// bytes, and its mark. Reads only; [`Account::install`] applies it.
    pub async fn read_count(db: &capstan_cluster::Db, agent: FormulaId) -> Result<Counted, Error> {
        db.read(move |tx| {
            Box::pin(async move {
                let (limits, _) = limits(tx, &agent).await?;
                let (messages, bytes, last) = count(tx, &agent).await?;
                let mark = tx
                    .snapshot_get(&crate::keys::inbox_mark(&agent))
                    .await?
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                    .map(u64::from_be_bytes);
                Ok::<_, Error>(Counted {
                    limits: (limits.max_messages, limits.max_bytes),
                    messages,
                    bytes,
                    last,
                    mark,
                })
            })
        })
        .await
    }

    /// Takes a count read by [`Account::read_count`] as what the inbox
    /// holds, plus the admitted messages still in flight; `a`, the
    /// admission that asked for it, decides whether recounts back off.
    pub fn install(&mut self, c: Counted, a: Admit) {
        let backoff = if self.counted && !self.stale {
            (self.backoff.max(RECOUNT_EVERY) * 2).min(RECOUNT_MAX)
        } else {
            RECOUNT_EVERY
        };
        self.pending.retain(|p| p.at.elapsed() < PENDING_TTL);
        // Admitted numbers above every number written or dismissed
        // (the inbox's mark is the number after the highest dismissed)
        // are still in flight; below, they were written (and maybe
        // dismissed since), or their send failed (or a send with a
        // higher number committed first: room a little early).
        let floor = c.last.max(c.mark.and_then(|m| m.checked_sub(1)));
        let (mut flying, mut flying_bytes) = (0u64, 0u64);
        self.pending.retain(|p| {
            let end = p.first.saturating_add(p.numbers);
            let above = match floor {
                Some(f) => end.saturating_sub(p.first.max(f.saturating_add(1))),
                None => p.numbers,
            };
            let m = above.min(p.admit.messages);
            flying += m;
            flying_bytes += p.admit.bytes.saturating_mul(m) / p.admit.messages.max(1);
            m > 0
        });
        let pending = std::mem::take(&mut self.pending);
        *self = Account {
            counted: true,
            messages: c.messages + flying,
            bytes: c.bytes + flying_bytes,
            limits: Quota {
                max_messages: c.limits.0,
                max_bytes: c.limits.1,
            },
            recounted: Some(Instant::now()),
            backoff,
            // A dismissal noted while the count ran may be missing from
            // it: the next refusal recounts at once rather than after the
            // backoff.
            stale: self.freed_while_counting,
            freed_while_counting: false,
            pending,
        };
        if self.fits(a) {
            self.backoff = RECOUNT_EVERY;
        }
    }

    /// Admits `a` on what the account knows (no store read), all or none,
    /// or refuses with [`Error::InboxFull`].
    pub fn take(&mut self, agent: &FormulaId, a: Admit) -> Result<(), Error> {
        if !self.fits(a) {
            return Err(Error::InboxFull {
                agent: agent.short(),
                messages: self.messages,
                bytes: self.bytes,
                max_messages: self.limits.max_messages,
                max_bytes: self.limits.max_bytes,
            });
        }
        self.messages += a.messages;
        self.bytes += a.bytes;
        Ok(())
    }
}

/// Reads back an [`Error::InboxFull`] from its text (as another cluster
/// member's refusal arrives), so that callers tell it from a failure to
/// retry.
pub fn parse_full(text: &str) -> Option<Error> {
    let at = text.find("inbox of ")?;
    let rest = &text[at + "inbox of ".len()..];
    let (agent, rest) = rest.split_once(" is full (")?;
    let nums: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(4)
        .filter_map(|s| s.parse().ok())
        .collect();
    let [messages, bytes, max_messages, max_bytes] = nums.as_slice() else {
        return None;
    };
    Some(Error::InboxFull {
        agent: agent.to_string(),
        messages: *messages,
        bytes: *bytes,
        max_messages: *max_messages,
        max_bytes: *max_bytes,
    })
}

/// Names the full inbox as the sender named its recipient.
pub fn named(e: Error, name: &str) -> Error {
    match e {
        Error::InboxFull {
            messages,
            bytes,
            max_messages,
            max_bytes,
            ..
        } if !name.is_empty() => Error::InboxFull {
            agent: name.to_string(),
            messages,
            bytes,
            max_messages,
            max_bytes,
        },
        e => e,
    }
}

impl AgentHandle {
    /// The inbox quota of the agent under `path` (a host's own agents, or
    /// itself), setting it first when `set` is given (`Some(None)`: back to
    /// the defaults). Hosts only. See [`crate::quota`].
    pub async fn quota(
        &self,
        req: RequestId,
        path: &str,
        set: Option<Option<Quota>>,
    ) -> Result<QuotaView, Error> {
        if !self.ctx.is_host {
            return Err(Error::Invalid(
                "only a host can see or set inbox quotas; ask your host".into(),
            ));
        }
        let id = self.agent(path).await?.id();
        if let Some(q) = set {
            let me = self.ctx.id;
            self.transact(move |tx| {
                Box::pin(async move {
                    if checked_dedup(tx, &me, &req).await?.is_some() {
                        return Ok(());
                    }
                    set_limits(tx, &id, q)?;
                    model::dedup_put(tx, &me, &req, DedupAnswer::None, now_ms())?;
                    Ok(())
                })
            })
            .await?;
            if let Some(a) = self.rt.registry.agent(&id) {
                let _ = a.cast(AgentMsg::Freed);
            }
        }
        self.rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let (q, own) = limits(tx, &id).await?;
                    let (messages, bytes, _) = count(tx, &id).await?;
                    Ok::<_, Error>(QuotaView {
                        agent: id,
                        messages,
                        bytes,
                        limits: q,
                        default: !own,
                    })
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_back_from_its_text() {
        let e = Error::InboxFull {
            agent: "alice".into(),
            messages: 3,
            bytes: 4567,
            max_messages: 3,
            max_bytes: 1 << 20,
        };
        let wire = format!("remote exception: Failed: {e}");
        assert_eq!(parse_full(&wire), Some(e));
        assert_eq!(parse_full("not the owner"), None);
    }

    /// The windowed count finds every message of an inbox whatever its
    /// numbers: a dense run longer than a page (a window read in several
    /// pages), a window read whole, gaps wider than a window, the top of
    /// the numbers, and nothing of the inboxes beside it.
    #[tokio::test]
    async fn a_count_finds_every_message_across_gaps_and_windows() {
        let db = capstan_cluster::open("mem:").await.unwrap();
        let agent = FormulaId::random();
        let (before, after) = (FormulaId([0; 32]), FormulaId([0xff; 32]));
        let mut numbers: Vec<u64> = (0..4_500).collect();
        numbers.extend([4_600, 9_999, 100_000, 100_001, 1 << 40]);
        numbers.extend([u64::MAX - 1, u64::MAX]);
        // and a damaged key under the inbox that sorts before number 0
        let damaged = TupleKey::new()
            .str("m")
            .bytes(agent.as_bytes())
            .str("x")
            .into_vec();
        let expect_bytes: u64 = numbers.iter().map(|n| 10 + n % 7).sum::<u64>() + 3;
        for chunk in numbers.chunks(500) {
            let (chunk, damaged) = (chunk.to_vec(), damaged.clone());
            db.transact(move |tx| {
                let (chunk, damaged) = (chunk.clone(), damaged.clone());
                Box::pin(async move {
                    for n in chunk {
                        tx.set(
                            &crate::keys::message(&agent, n),
                            &vec![1; 10 + (n % 7) as usize],
                        )?;
                    }
                    tx.set(&damaged, b"bad")?;
                    for other in [before, after] {
                        tx.set(&crate::keys::message(&other, 5), b"not hers")?;
                    }
                    Ok::<_, Error>(())
                })
            })
            .await
            .unwrap();
        }
        let counted = db
            .read(move |tx| Box::pin(async move { count(tx, &agent).await }))
            .await
            .unwrap();
        assert_eq!(
            counted,
            (numbers.len() as u64 + 1, expect_bytes, Some(u64::MAX))
        );
        // An empty inbox, and one with a single message at number 0.
        let (empty, one) = (FormulaId::random(), FormulaId::random());
        db.transact(move |tx| {
            Box::pin(async move {
                tx.set(&crate::keys::message(&one, 0), b"x")?;
                Ok::<_, Error>(())
            })
        })
        .await
        .unwrap();
        let got = db
            .read(move |tx| {
                Box::pin(async move {
                    Ok::<_, Error>((count(tx, &empty).await?, count(tx, &one).await?))
                })
            })
            .await
            .unwrap();
        assert_eq!(got, ((0, 0, None), (1, 1, Some(0))));
    }

    #[test]
    fn a_dismissal_during_a_count_leaves_the_account_stale() {
        let alice = FormulaId::random();
        let one = Admit {
            messages: 1,
            bytes: 10,
        };
        let full = Counted {
            limits: (2, 1 << 20),
            messages: 2,
            bytes: 20,
            last: Some(1),
            mark: None,
        };
        // A count that ran undisturbed: a refusal waits out the backoff
        // (`stale` is what lets a refusal skip it).
        let mut a = Account::default();
        a.begin_count();
        a.install(full.clone(), one);
        assert!(a.take(&alice, one).is_err(), "the inbox is full");
        assert!(!a.stale);
        // A dismissal noted while the next count ran: its result may not
        // show the room given back, so the next refusal recounts at once.
        a.begin_count();
        a.note_freed();
        a.install(full.clone(), one);
        assert!(a.take(&alice, one).is_err(), "the count saw it full");
        assert!(
            a.stale && a.needs_count(one),
            "a count that may predate a dismissal must not hold refusals for its backoff"
        );
        // A dismissal noted before the count began is in what it read.
        a.note_freed();
        a.begin_count();
        a.install(full, one);
        assert!(!a.stale);
    }

    #[test]
    fn limits_round_trip() {
        let q = Quota {
            max_messages: 7,
            max_bytes: 99,
        };
        assert_eq!(Quota::decode(&q.encode()).unwrap(), q);
    }
}
