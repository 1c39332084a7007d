//! Which messages of an inbox a follower (`inbox --follow`) has shown, and
//! where it should look in the store for the ones a push missed.
//!
//! Messages reach a follower pushed, in any order (numbers commit out of
//! order across nodes), and a push can be missed: it went only to the
//! members the inbox's owner knew to follow it, or a full queue dropped it.
//! So the follower looks in the store now and then, from the lowest number
//! it has not shown. A number still missing at two looks in a row was handed
//! out but never written (its sender died), or is gone: it is skipped, so
//! that one hole does not make every look read the same page again.

use std::collections::BTreeSet;

/// A follower's position (see the module docs).
#[derive(Debug, Clone)]
pub struct FollowCursor {
    /// Every number below it was shown or skipped.
    contiguous: u64,
    /// Numbers shown at or above `contiguous`.
    shown: BTreeSet<u64>,
    /// Numbers missing at the last look.
    missing: BTreeSet<u64>,
}

impl FollowCursor {
    /// A follower of the messages numbered `after` and up.
    pub fn new(after: u64) -> Self {
        FollowCursor {
            contiguous: after,
            shown: BTreeSet::new(),
            missing: BTreeSet::new(),
        }
    }

    /// Whether message `n` is new: true once per number (then it is shown).
    pub fn accept(&mut self, n: u64) -> bool {
        if n < self.contiguous || !self.shown.insert(n) {
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

    /// After a look in the store (its messages given to [`accept`](Self::accept)
    /// first): numbers below the highest known one that were missing at
    /// the previous look too are skipped.
    pub fn looked(&mut self) {
        let Some(&top) = self.shown.iter().next_back() else {
            self.missing.clear();
            return;
        };
        let now_missing: BTreeSet<u64> = (self.contiguous..top)
            .filter(|n| !self.shown.contains(n))
            .take(4096)
            .collect();
        let skip: Vec<u64> = now_missing.intersection(&self.missing).copied().collect();
        for n in skip {
            self.shown.insert(n);
        }
        self.missing = now_missing;
        self.advance();
    }

    fn advance(&mut self) {
        while self.shown.remove(&self.contiguous) {
            self.contiguous += 1;
        }
        self.missing.retain(|n| *n >= self.contiguous);
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
        c.looked();
        assert_eq!(c.look_from(), 4);
    }

    #[test]
    fn a_hole_is_skipped_after_two_looks_and_not_before() {
        let mut c = FollowCursor::new(0);
        c.accept(0);
        c.accept(2);
        c.looked();
        assert_eq!(c.look_from(), 1, "one look: 1 may still commit");
        c.looked();
        assert_eq!(c.look_from(), 3, "two looks: 1 is a hole");
        assert!(!c.has_gap());
        // A late commit of a skipped number is not shown twice, nor at all.
        assert!(!c.accept(1));
    }
}
