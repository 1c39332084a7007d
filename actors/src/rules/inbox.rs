//! Handling an inbox in number order when numbers commit out of order.
//!
//! Inbox numbers are handed out by the inbox's owner in order, but the
//! transactions that write the messages commit in any order: number `N + 1`
//! can land before `N`. A handler that took whatever it found would handle
//! `N + 1`, remember "handled up to `N + 1`", and never see `N` when it
//! lands. So a runner handles only the run of numbers that follows what it
//! handled last, without a gap, and waits at a gap.
//!
//! A gap can also be permanent: the writer of `N` died after reserving it,
//! or its transaction failed. After [`HOLE_GRACE`] the runner *closes* the
//! hole: in one transaction it checks that slot `N` is still empty and raises
//! the inbox mark above `N`. Writers check the mark, so a writer of `N` that
//! was only slow finds its number taken and retries with a fresh one (its
//! message lands later, under a higher number): closing a hole early costs
//! order, never a message.
//!
//! The same check makes some gaps known to be permanent at once: a number
//! below the inbox mark that is missing stays missing (a writer of it finds
//! its slot taken). Dismissing a message raises the mark above it, so a
//! message dismissed before the runner got to it is such a gap; the runner
//! reads the mark when a listing starts with a gap and closes what lies
//! below it without waiting (before stop 38 it waited out the grace).

use std::time::{Duration, Instant};

/// How long a runner waits for a missing number before closing the hole.
/// Longer than a commit normally takes, also after an etcd leader change
/// (~3 s): a message that is only late rarely loses its place.
pub const HOLE_GRACE: Duration = Duration::from_secs(4);
/// How often a runner looks again while it waits at a hole.
pub const HOLE_POLL: Duration = Duration::from_millis(10);

/// What a runner does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Handle the first `n` listed messages (they follow on without a gap).
    Handle(usize),
    /// Nothing listed: wait for new mail.
    Idle,
    /// The next number is missing but later ones are there: look again
    /// after the given time.
    Wait(Duration),
    /// The numbers `from..to` have been missing for [`HOLE_GRACE`], or are
    /// known lost: close them.
    Close { from: u64, to: u64 },
}

/// A runner's memory of the hole it waits at.
#[derive(Debug, Default, Clone)]
pub struct Holes {
    waiting: Option<(u64, Instant)>,
    /// Numbers this runner itself took and will never write (its batch was
    /// given up): closed without waiting.
    lost: std::collections::BTreeSet<u64>,
    /// The inbox mark as last read: a number below it that is missing
    /// stays missing (module docs).
    settled: u64,
}

impl Holes {
    /// Notes numbers that will never be written (closed without a grace).
    pub fn lost(&mut self, numbers: impl IntoIterator<Item = u64>) {
        self.lost.extend(numbers);
    }

    /// Notes the inbox mark read with a listing: numbers below it that are
    /// missing are closed without waiting (module docs).
    pub fn settle(&mut self, mark: u64) {
        self.settled = self.settled.max(mark);
    }

    /// Whether closing `from..to` needs no grace because every number in it
    /// lies below the inbox mark, so none can be written.
    pub fn settled(&self, to: u64) -> bool {
        to <= self.settled
    }

    /// The next step, given the first number not handled yet (`next`), the
    /// numbers listed from it (ascending) and the time.
    ///
    /// A gap is closed whole after the grace: every number in it was handed
    /// out before the number listed after it, which has been there for the
    /// whole grace.
    pub fn step(&mut self, next: u64, listed: &[u64], now: Instant) -> Step {
        self.lost = self.lost.split_off(&next);
        let run = listed
            .iter()
            .zip(next..)
            .take_while(|(n, want)| **n == *want)
            .count();
        if run > 0 {
            self.waiting = None;
            return Step::Handle(run);
        }
        if self.lost.contains(&next) {
            let mut to = next;
            while self.lost.contains(&to) && listed.first() != Some(&to) {
                to += 1;
            }
            self.waiting = None;
            return Step::Close { from: next, to };
        }
        if listed.is_empty() {
            self.waiting = None;
            return Step::Idle;
        }
        if next < self.settled {
            self.waiting = None;
            return Step::Close {
                from: next,
                to: listed[0].min(self.settled),
            };
        }
        let since = match self.waiting {
            Some((n, since)) if n == next => since,
            _ => {
                self.waiting = Some((next, now));
                now
            }
        };
        let waited = now.saturating_duration_since(since);
        if waited >= HOLE_GRACE {
            self.waiting = None;
            Step::Close {
                from: next,
                to: listed[0],
            }
        } else {
            Step::Wait(HOLE_POLL.min(HOLE_GRACE - waited))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_only_the_run_without_gaps() {
        let t = Instant::now();
        let mut h = Holes::default();
        assert_eq!(h.step(5, &[5, 6, 7], t), Step::Handle(3));
        assert_eq!(h.step(5, &[5, 6, 8, 9], t), Step::Handle(2));
        assert_eq!(h.step(5, &[], t), Step::Idle);
    }

    #[test]
    fn a_later_number_waits_for_the_missing_one() {
        let t = Instant::now();
        let mut h = Holes::default();
        // N + 1 committed before N: nothing is handled yet.
        assert_eq!(h.step(5, &[6], t), Step::Wait(HOLE_POLL));
        assert_eq!(
            h.step(5, &[6], t + Duration::from_millis(3)),
            Step::Wait(HOLE_POLL)
        );
        // N lands: both, in order.
        assert_eq!(
            h.step(5, &[5, 6], t + Duration::from_millis(4)),
            Step::Handle(2)
        );
        // A new hole starts its own wait.
        assert_eq!(
            h.step(7, &[9], t + Duration::from_secs(60)),
            Step::Wait(HOLE_POLL)
        );
    }

    #[test]
    fn a_hole_is_closed_after_the_grace() {
        let t = Instant::now();
        let mut h = Holes::default();
        assert_eq!(h.step(5, &[6, 7], t), Step::Wait(HOLE_POLL));
        let almost = t + HOLE_GRACE - Duration::from_millis(4);
        assert_eq!(
            h.step(5, &[6, 7], almost),
            Step::Wait(Duration::from_millis(4))
        );
        assert_eq!(
            h.step(5, &[6, 7], t + HOLE_GRACE),
            Step::Close { from: 5, to: 6 }
        );
        // Then 6 and 7 follow on from 6.
        assert_eq!(h.step(6, &[6, 7], t + HOLE_GRACE), Step::Handle(2));
        // A hole at another number does not inherit the old wait, and a
        // gap of several numbers is closed whole.
        assert_eq!(h.step(8, &[11], t + HOLE_GRACE * 2), Step::Wait(HOLE_POLL));
        assert_eq!(
            h.step(8, &[11], t + HOLE_GRACE * 3),
            Step::Close { from: 8, to: 11 }
        );
    }

    #[test]
    fn a_gap_below_the_inbox_mark_is_closed_at_once() {
        let t = Instant::now();
        let mut h = Holes::default();
        assert_eq!(h.step(5, &[7, 8], t), Step::Wait(HOLE_POLL));
        // 5 and 6 were dismissed (the mark is 7): no grace for them.
        h.settle(7);
        assert_eq!(h.step(5, &[7, 8], t), Step::Close { from: 5, to: 7 });
        assert!(h.settled(7));
        assert_eq!(h.step(7, &[7, 8], t), Step::Handle(2));
        // A gap that reaches above the mark is closed up to the mark, and
        // the rest is waited for as any gap.
        assert_eq!(h.step(6, &[9], t), Step::Close { from: 6, to: 7 });
        assert!(!h.settled(9));
        assert_eq!(h.step(7, &[9], t), Step::Wait(HOLE_POLL));
        // A mark read earlier never lowers it; nothing listed stays idle.
        h.settle(3);
        assert_eq!(h.step(5, &[], t), Step::Idle);
        assert_eq!(h.step(5, &[9], t), Step::Close { from: 5, to: 7 });
    }

    #[test]
    fn numbers_known_lost_are_closed_at_once() {
        let t = Instant::now();
        let mut h = Holes::default();
        h.lost([3, 5, 6, 7]);
        // behind the mark: forgotten
        assert_eq!(h.step(5, &[8], t), Step::Close { from: 5, to: 8 });
        assert_eq!(h.step(8, &[8], t), Step::Handle(1));
        // a lost number with nothing after it is closed too (it would
        // otherwise stand in front of the next message)
        h.lost([9]);
        assert_eq!(h.step(9, &[], t), Step::Close { from: 9, to: 10 });
        assert_eq!(h.step(10, &[], t), Step::Idle);
        // one that was written after all (listed) is handled
        h.lost([10]);
        assert_eq!(h.step(10, &[10], t), Step::Handle(1));
    }
}
