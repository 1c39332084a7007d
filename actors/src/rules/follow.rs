//! Which messages of an inbox a follower (`inbox --follow`) has shown, and
//! where it should look in the store for the ones a push missed.
//!
//! Messages reach a follower pushed, in any order (numbers are handed out in
//! order but commit in any order, also on one node), and a push can be
//! missed: it went only to the members the inbox's owner knew to follow it,
//! or a full queue dropped it. So the follower looks in the store now and
//! then, from the lowest number it has not shown.
//!
//! A number below a shown one that is still missing may be a commit that is
//! only late, or a hole: handed out but never written (its sender died, its
//! transaction failed). A hole is skipped once it was missing at two looks
//! in a row *and* for [`SKIP_AFTER`], so that one hole does not make every
//! look read the same page again; a late commit lands well within that
//! (the guest runner gives a hole as long, [`super::inbox::HOLE_GRACE`]).
//! Should one land later still, its push is shown all the same: the
//! follower remembers the numbers it skipped (at most [`MAX_SKIPPED`]).
//! Skipping after two quick looks alone lost late commits: the first looks
//! come 25 and 50 ms apart, less than a commit under load can take.
//!
//! A push can be lost too, so a look also reads the latest skipped numbers
//! again ([`FollowCursor::rechecks`], at most [`MAX_RECHECKED`], each for
//! [`RECHECK_FOR`] after it was skipped) until the inbox mark fences them
//! (nothing can be written below it: [`FollowCursor::fenced`]). Without
//! that, a commit that landed after the grace with its push dropped was
//! never shown (the simulation found it: a sender paused 4.4 s with its
//! commit in flight, while the guest's runner, restarted on new owners,
//! had not fenced the number yet).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long a number must have been missing before a look skips it.
pub const SKIP_AFTER: Duration = super::inbox::HOLE_GRACE;
/// Most skipped numbers remembered (the oldest are forgotten first).
pub const MAX_SKIPPED: usize = 4096;
/// Most missing numbers tracked at one look.
const MAX_MISSING: usize = 4096;
/// Most skipped numbers a look reads again (the latest).
pub const MAX_RECHECKED: usize = 64;
/// How long after it was skipped a look reads a number again (unless the
/// inbox mark fences it sooner): far longer than a commit can stay in
/// flight and unresolved (an etcd request gives up within about 20 s).
pub const RECHECK_FOR: Duration = Duration::from_secs(60);

/// A follower's position (see the module docs).
#[derive(Debug, Clone)]
pub struct FollowCursor {
    /// Every number below it was shown or skipped.
    contiguous: u64,
    /// Numbers shown at or above `contiguous`.
    shown: BTreeSet<u64>,
    /// Numbers missing at the last look, with when they were first missed.
    missing: BTreeMap<u64, Instant>,
    /// Numbers skipped as holes and not shown since, with when.
    skipped: BTreeMap<u64, Instant>,
}

impl FollowCursor {
    /// A follower of the messages numbered `after` and up.
    pub fn new(after: u64) -> Self {
        FollowCursor {
            contiguous: after,
            shown: BTreeSet::new(),
            missing: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }

    /// Whether message `n` is new: true once per number (then it is shown),
    /// also for a number skipped as a hole that landed after all.
    pub fn accept(&mut self, n: u64) -> bool {
        if n < self.contiguous {
            return self.skipped.remove(&n).is_some();
        }
        if !self.shown.insert(n) {
            return false;
        }
        self.missing.remove(&n);
        self.advance();
        true
    }

    /// Whether a number below one already shown is missing.
    pub fn has_gap(&self) -> bool {
        !self.shown.is_empty()
    }

    /// Where the next look in the store starts.
    pub fn look_from(&self) -> u64 {
        self.contiguous
    }

    /// The skipped numbers a look at `now` reads again: the latest
    /// [`MAX_RECHECKED`] of those skipped less than [`RECHECK_FOR`] ago.
    pub fn rechecks(&self, now: Instant) -> Vec<u64> {
        self.skipped
            .iter()
            .rev()
            .filter(|(_, at)| now.saturating_duration_since(**at) < RECHECK_FOR)
            .take(MAX_RECHECKED)
            .map(|(n, _)| *n)
            .collect()
    }

    /// After a look read the skipped numbers `read` again (those it found
    /// given to [`accept`](Self::accept) first) and the inbox mark `mark`:
    /// the ones still empty below the mark can no longer be written, and
    /// are not looked for again.
    pub fn fenced(&mut self, read: &[u64], mark: u64) {
        for n in read.iter().filter(|n| **n < mark) {
            self.skipped.remove(n);
        }
    }

    /// After a look in the store at `now` (its messages given to
    /// [`accept`](Self::accept) first): numbers below the highest known one
    /// that were missing at the previous look too, and first missed at
    /// least [`SKIP_AFTER`] ago, are skipped.
    pub fn looked(&mut self, now: Instant) {
        let Some(&top) = self.shown.iter().next_back() else {
            self.missing.clear();
            return;
        };
        let mut now_missing = BTreeMap::new();
        let gaps: Vec<u64> = (self.contiguous..top)
            .filter(|n| !self.shown.contains(n))
            .take(MAX_MISSING)
            .collect();
        for n in gaps {
            let since = self.missing.get(&n).copied();
            match since {
                Some(t) if now.saturating_duration_since(t) >= SKIP_AFTER => {
                    self.shown.insert(n);
                    self.skipped.insert(n, now);
                }
                _ => {
                    now_missing.insert(n, since.unwrap_or(now));
                }
            }
        }
        while self.skipped.len() > MAX_SKIPPED {
            self.skipped.pop_first();
        }
        self.missing = now_missing;
        self.advance();
    }

    fn advance(&mut self) {
        while self.shown.remove(&self.contiguous) {
            self.contiguous += 1;
        }
        let c = self.contiguous;
        self.missing.retain(|n, _| *n >= c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_shown_once_in_any_order() {
        let mut c = FollowCursor::new(5);
        assert!(!c.accept(4), "before the start");
        assert!(c.accept(7));
        assert!(c.has_gap());
        assert_eq!(c.look_from(), 5);
        assert!(c.accept(5));
        assert!(!c.accept(5));
        assert!(c.accept(6));
        assert!(!c.accept(7));
        assert!(!c.has_gap());
        assert_eq!(c.look_from(), 8);
    }

    #[test]
    fn a_missed_push_is_found_by_looking_from_the_first_gap() {
        let mut c = FollowCursor::new(0);
        for n in [0, 2, 3] {
            assert!(c.accept(n));
        }
        // The look reads from 1, where the missed message is.
        assert_eq!(c.look_from(), 1);
        assert!(c.accept(1));
        c.looked(Instant::now());
        assert_eq!(c.look_from(), 4);
    }

    #[test]
    fn a_hole_is_skipped_after_two_looks_and_the_grace_and_not_before() {
        let t0 = Instant::now();
        let mut c = FollowCursor::new(0);
        c.accept(0);
        c.accept(2);
        c.looked(t0);
        assert_eq!(c.look_from(), 1, "one look: 1 may still commit");
        c.looked(t0 + Duration::from_millis(50));
        assert_eq!(c.look_from(), 1, "two quick looks: 1 may still commit");
        c.looked(t0 + SKIP_AFTER);
        assert_eq!(c.look_from(), 3, "missing for the grace: 1 is a hole");
        assert!(!c.has_gap());
    }

    #[test]
    fn a_late_commit_is_shown_before_and_after_its_number_was_skipped() {
        let t0 = Instant::now();
        let mut c = FollowCursor::new(0);
        c.accept(0);
        c.accept(3);
        c.looked(t0);
        c.looked(t0 + Duration::from_millis(75));
        assert!(c.accept(2), "late, within the grace");
        c.looked(t0 + SKIP_AFTER);
        assert_eq!(c.look_from(), 4, "1 skipped");
        assert!(c.accept(1), "later than the grace: shown all the same");
        assert!(!c.accept(1), "once");
        assert!(!c.accept(2), "once");
    }

    #[test]
    fn a_skipped_number_is_read_again_until_the_mark_fences_it_or_a_minute_passed() {
        let t0 = Instant::now();
        let mut c = FollowCursor::new(0);
        c.accept(0);
        c.accept(4);
        c.looked(t0);
        c.looked(t0 + SKIP_AFTER);
        assert_eq!(c.look_from(), 5, "1 to 3 skipped");
        let later = t0 + SKIP_AFTER + Duration::from_secs(1);
        assert_eq!(c.rechecks(later), vec![3, 2, 1], "the latest first");
        // 2 landed after the skip and its push was lost: a look finds it
        assert!(c.accept(2));
        // the mark is 2: 1 can no longer be written; 3 still can
        c.fenced(&[3, 1], 2);
        assert_eq!(c.rechecks(later), vec![3]);
        assert!(!c.accept(1), "fenced, never shown");
        assert_eq!(c.rechecks(t0 + SKIP_AFTER + RECHECK_FOR), Vec::<u64>::new());
        assert!(c.accept(3), "a push still shows it after the rechecks end");
    }

    #[test]
    fn skipped_numbers_remembered_are_bounded() {
        let t0 = Instant::now();
        let mut c = FollowCursor::new(0);
        let top = (MAX_SKIPPED + 10) as u64;
        c.accept(top);
        c.looked(t0);
        c.looked(t0 + SKIP_AFTER);
        assert_eq!(c.look_from(), MAX_MISSING as u64);
        c.accept(top + 1);
        c.looked(t0 + SKIP_AFTER);
        c.looked(t0 + SKIP_AFTER * 2);
        assert_eq!(c.look_from(), top + 2);
        assert!(c.skipped.len() <= MAX_SKIPPED);
        assert!(!c.accept(0), "the oldest skipped number is forgotten");
        assert!(c.accept(top - 1), "a recent one is not");
    }
}
