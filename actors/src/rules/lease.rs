//! A cluster node's lease as a state machine: when the node may serve, what
//! it does after each renewal, and what leaving means.
//!
//! A node registers in the store (a new epoch) and renews its member
//! record every sixth of the lease. It serves — answers calls, claims
//! formulas, writes as their owner — only while its lease certainly holds
//! on its own clock: until 9/10 of the lease after the *start* of the last
//! renewal that committed (a renewal that took long proves nothing about
//! the time it took; the 10 % is for clock drift between nodes). The
//! lifecycle is one [`Phase`], not a set of flags that could disagree:
//!
//! ```text
//!  Joining ──registered──▶ Serving ◀──renewed── SteppedDown
//!                            │  ▲                    ▲
//!                            │  └──registered────────┤
//!                            └──lost, or lapsed and ─┘
//!                               the store unreachable
//!  Joining | Serving | SteppedDown ──leave──▶ Leaving ──ended──▶ Ended
//! ```
//!
//! A lost lease (the store says the record expired or another epoch
//! replaced it) steps down and registers again under a new epoch. A
//! renewal that fails while the lease still holds changes nothing; once
//! the lease has lapsed on the node's clock it steps down too (its
//! incarnations stop, so nothing it owned is written twice while another
//! node takes over), and a later renewal that finds the record still its
//! own and live resumes serving under the same epoch: nobody could have
//! claimed its placements meanwhile. A leaving node renews nothing more and
//! claims nothing, and still answers until its membership has ended.
//!
//! Time comes in as an argument; the async shell (`cluster::lease`,
//! `node::lease_loop`) holds a [`Lease`] behind a lock and applies the
//! [`Action`]s. The tests below drive it alone.

use std::time::{Duration, Instant};

/// Where a node is in its membership of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not registered yet.
    Joining,
    /// Registered; serving while the lease holds on this node's clock.
    Serving,
    /// Lost or lapsed: its incarnations were stopped; renewing (same
    /// epoch) or registering again (a new one).
    SteppedDown,
    /// Leaving or stopping: renews nothing, claims nothing, still answers
    /// while the lease holds.
    Leaving,
    /// Its member record was removed or marked expired.
    Ended,
}

/// What a renewal of the lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Committed: the record is this node's and live. `started`: when the
    /// renewal began; `draining`: the record's drain mark.
    Renewed { started: Instant, draining: bool },
    /// The store says the lease is gone (expired, or another epoch).
    Lost,
    /// The store did not answer, or refused.
    Failed,
}

/// What the shell does after a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    Carry,
    /// Renewed while draining: release every placement this node holds.
    ReleaseAll,
    /// Stop every incarnation (`counted`: this is a step-down from
    /// serving, to be counted and logged), then, with `register`, register
    /// again under a new epoch.
    StepDown { counted: bool, register: bool },
}

/// A node's lease: see the module docs.
#[derive(Debug, Clone)]
pub struct Lease {
    lease: Duration,
    phase: Phase,
    epoch: u64,
    /// The member record's drain mark, as last seen.
    drain_mark: bool,
    /// Until when the lease certainly holds (None: never, or not since a
    /// step-down).
    live_until: Option<Instant>,
}

impl Lease {
    /// A node that has not registered yet, with leases of `lease`.
    pub fn new(lease: Duration) -> Lease {
        Lease {
            lease,
            phase: Phase::Joining,
            epoch: 0,
            drain_mark: false,
            live_until: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The epoch of the last registration (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How far past the start of a renewal the lease certainly holds.
    fn holds_for(&self) -> Duration {
        self.lease * 9 / 10
    }

    /// A registration started at `started` committed under `epoch`, its
    /// record marked `draining` or not.
    pub fn registered(&mut self, started: Instant, epoch: u64, draining: bool) {
        self.epoch = epoch;
        self.drain_mark = draining;
        self.live_until = Some(started + self.holds_for());
        if matches!(
            self.phase,
            Phase::Joining | Phase::Serving | Phase::SteppedDown
        ) {
            self.phase = Phase::Serving;
        }
    }

    /// Whether the node serves at `now`: registered, not stepped down or
    /// ended, and its lease holds on its own clock.
    pub fn serving(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::Serving | Phase::Leaving)
            && self.live_until.is_some_and(|t| now < t)
    }

    /// How long the lease certainly holds still, at `now`.
    pub fn left(&self, now: Instant) -> Duration {
        self.live_until
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Whether the node claims no new work: its record is marked draining,
    /// or it is leaving.
    pub fn draining(&self) -> bool {
        self.drain_mark || matches!(self.phase, Phase::Leaving | Phase::Ended)
    }

    /// Whether the node is leaving (or has left): no more renewals.
    pub fn leaving(&self) -> bool {
        matches!(self.phase, Phase::Leaving | Phase::Ended)
    }

    /// The node leaves or stops: renew nothing, claim nothing.
    pub fn leave(&mut self) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Leaving;
        }
    }

    /// The node's membership ended (record removed or expired): it serves
    /// no more.
    pub fn ended(&mut self) {
        self.phase = Phase::Ended;
        self.live_until = None;
    }

    /// Steps down: the incarnations stop. True when it was serving (a
    /// step-down to count).
    pub fn step_down(&mut self) -> bool {
        if self.phase == Phase::Serving {
            self.phase = Phase::SteppedDown;
            true
        } else {
            false
        }
    }

    /// Applies the outcome of a renewal at `now`; says what to do.
    pub fn on_renewal(&mut self, r: Renewal, now: Instant) -> Action {
        match r {
            Renewal::Renewed { started, draining } => {
                self.drain_mark = draining;
                // only extend: a renewal that started before the one that
                // set the deadline proves less
                let until = started + self.holds_for();
                if self.live_until.is_none_or(|t| until > t) {
                    self.live_until = Some(until);
                }
                if matches!(self.phase, Phase::Joining | Phase::SteppedDown) {
                    self.phase = Phase::Serving;
                }
                if self.draining() {
                    Action::ReleaseAll
                } else {
                    Action::Carry
                }
            }
            Renewal::Lost => {
                let counted = self.step_down();
                if self.phase == Phase::SteppedDown {
                    self.live_until = None;
                }
                Action::StepDown {
                    counted,
                    register: !self.leaving(),
                }
            }
            Renewal::Failed if !self.serving(now) && !self.leaving() => Action::StepDown {
                counted: self.step_down(),
                register: false,
            },
            Renewal::Failed => Action::Carry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(1200);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn serving_lease(t0: Instant) -> Lease {
        let mut l = Lease::new(LEASE);
        l.registered(t0, 1, false);
        l
    }

    #[test]
    fn a_node_serves_from_its_registration_until_nine_tenths_of_the_lease() {
        let t0 = Instant::now();
        let mut l = Lease::new(LEASE);
        assert_eq!(l.phase(), Phase::Joining);
        assert!(!l.serving(t0));
        l.registered(t0, 7, false);
        assert_eq!((l.phase(), l.epoch()), (Phase::Serving, 7));
        assert!(l.serving(t0 + ms(1079)));
        assert!(!l.serving(t0 + ms(1080)), "lapsed at 9/10 of the lease");
        assert_eq!(l.left(t0 + ms(80)), ms(1000));
        assert_eq!(l.left(t0 + ms(5000)), Duration::ZERO);
    }

    #[test]
    fn a_renewal_extends_from_its_start_and_never_shortens() {
        let t0 = Instant::now();
        let mut l = serving_lease(t0);
        let a = l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(200),
                draining: false,
            },
            t0 + ms(900),
        );
        assert_eq!(a, Action::Carry);
        assert!(l.serving(t0 + ms(1279)));
        assert!(!l.serving(t0 + ms(1280)));
        // a slow renewal that started earlier answers late: no shorter lease
        l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(100),
                draining: false,
            },
            t0 + ms(1000),
        );
        assert!(l.serving(t0 + ms(1279)));
    }

    #[test]
    fn a_failed_renewal_changes_nothing_while_the_lease_holds_then_steps_down_once() {
        let t0 = Instant::now();
        let mut l = serving_lease(t0);
        assert_eq!(l.on_renewal(Renewal::Failed, t0 + ms(500)), Action::Carry);
        assert!(l.serving(t0 + ms(500)));
        // lapsed: step down (counted), keep the epoch, do not register again
        assert_eq!(
            l.on_renewal(Renewal::Failed, t0 + ms(1100)),
            Action::StepDown {
                counted: true,
                register: false
            }
        );
        assert_eq!(l.phase(), Phase::SteppedDown);
        // still failing: stop again (nothing may run), but it is not a new step-down
        assert_eq!(
            l.on_renewal(Renewal::Failed, t0 + ms(1300)),
            Action::StepDown {
                counted: false,
                register: false
            }
        );
        // the store answers again and the record is still ours: serve, same epoch
        let a = l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(1400),
                draining: false,
            },
            t0 + ms(1450),
        );
        assert_eq!(a, Action::Carry);
        assert_eq!((l.phase(), l.epoch()), (Phase::Serving, 1));
        assert!(l.serving(t0 + ms(1450)));
    }

    #[test]
    fn a_lost_lease_steps_down_and_registers_under_a_new_epoch() {
        let t0 = Instant::now();
        let mut l = serving_lease(t0);
        assert_eq!(
            l.on_renewal(Renewal::Lost, t0 + ms(300)),
            Action::StepDown {
                counted: true,
                register: true
            }
        );
        assert!(
            !l.serving(t0 + ms(300)),
            "a lost lease serves nothing, though the clock says it holds"
        );
        l.registered(t0 + ms(400), 2, false);
        assert_eq!((l.phase(), l.epoch()), (Phase::Serving, 2));
        assert!(l.serving(t0 + ms(500)));
    }

    #[test]
    fn draining_releases_on_each_renewal_and_leaving_ends_renewals() {
        let t0 = Instant::now();
        let mut l = serving_lease(t0);
        assert!(!l.draining());
        let a = l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(200),
                draining: true,
            },
            t0 + ms(210),
        );
        assert_eq!(a, Action::ReleaseAll);
        assert!(l.draining() && !l.leaving() && l.serving(t0 + ms(210)));
        // the mark cleared in the store (drain undone)
        let a = l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(400),
                draining: false,
            },
            t0 + ms(410),
        );
        assert_eq!(a, Action::Carry);
        assert!(!l.draining());

        l.leave();
        assert!(l.leaving() && l.draining());
        assert!(l.serving(t0 + ms(500)), "a leaving node still answers");
        // a renewal in flight when it left does not bring it back
        l.on_renewal(
            Renewal::Renewed {
                started: t0 + ms(600),
                draining: false,
            },
            t0 + ms(610),
        );
        assert_eq!(l.phase(), Phase::Leaving);
        assert!(l.draining());
        // nor does a lapse make it register again
        assert_eq!(
            l.on_renewal(Renewal::Lost, t0 + ms(700)),
            Action::StepDown {
                counted: false,
                register: false
            }
        );
        l.ended();
        assert_eq!(l.phase(), Phase::Ended);
        assert!(!l.serving(t0 + ms(700)));
        l.leave();
        assert_eq!(l.phase(), Phase::Ended);
    }

    #[test]
    fn a_registration_keeps_a_drain_mark_it_reads() {
        let t0 = Instant::now();
        let mut l = Lease::new(LEASE);
        l.registered(t0, 3, true);
        assert!(l.serving(t0) && l.draining() && !l.leaving());
    }
}
