//! The simulation in `cargo test`: a few hundred seeds (each 150 steps of a
//! 3-node cluster, with kills, pauses, drains and changes of the placement
//! policy; one in four federated with a 2-node far cluster; every
//! node follows a guest's inbox, and most runs must check a follower at
//! the end; two in three with the store filling senders' numbers in), a
//! replay, tests that the checker finds a handler that skips and a far
//! side that does not dedup, the regression seed of a federation
//! defect it found (mail delivered and bounced), and calm runs in which a
//! refused fill must leave no hole. A failure names its seed;
//! replay it with `cargo run -p capstan-sim --release -- --seed SEED --steps 150`.

use capstan_sim::{Config, SimError, run};

const STEPS: u64 = 150;

fn seeds(from: u64, count: u64) {
    let mut followed = 0;
    for seed in from..from + count {
        let cfg = Config {
            steps: STEPS,
            ..Config::new(seed)
        };
        match run(&cfg) {
            Ok(r) => followed += u64::from(r.followers_checked > 0),
            Err(e) => panic!(
                "{e}\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS}"
            ),
        }
    }
    // A follower whose stream ended (its node lost its lease) follows
    // again, so nearly every run ends with followers to check (all 300
    // seeds did when this was written; 3 in 4 before they followed again).
    assert!(
        followed * 10 >= count * 9,
        "only {followed} of {count} runs had a follower running to the end"
    );
}

// Four groups, so that the test harness runs them side by side.
#[test]
fn seeds_0_to_74() {
    seeds(0, 75);
}
#[test]
fn seeds_75_to_149() {
    seeds(75, 75);
}
#[test]
fn seeds_150_to_224() {
    seeds(150, 75);
}
#[test]
fn seeds_225_to_299() {
    seeds(225, 75);
}

/// A run that drains a node replays exactly, however the process lays
/// out its maps: a node stops its incarnations in id order (it had stopped
/// them in a hash map's order, which changes with each process, and this
/// seed's runs gave one of two digests, the other in 4 of 12 processes),
/// and every timer of the runtime reads tokio's clock, never the system's.
#[test]
fn a_drain_replays_exactly() {
    let cfg = Config {
        steps: 250,
        ..Config::new(388)
    };
    let first = run(&cfg).expect("first run");
    assert!(first.drains > 0, "the seed drains: {first:?}");
    for _ in 0..4 {
        let again = run(&cfg).expect("run again");
        assert_eq!(first.digest, again.digest, "{first:?} vs {again:?}");
    }
}

/// The same seed, the same run: the same workload, faults, ids (the
/// runtime's, drawn from the seed) and final stores (the digest covers
/// them). Seed 5 federates (see `Config::new`).
#[test]
fn a_seed_replays_exactly() {
    let mut ids = Vec::new();
    for seed in [3, 5, 42] {
        let cfg = Config {
            steps: STEPS,
            ..Config::new(seed)
        };
        let a = run(&cfg).expect("first run");
        let b = run(&cfg).expect("second run");
        assert_eq!(a.digest, b.digest, "seed {seed}: {a:?} vs {b:?}");
        assert_eq!(a.faults, b.faults, "seed {seed}");
        assert_eq!(a.fed, b.fed, "seed {seed}");
        assert_eq!(a.guest_ids, b.guest_ids, "seed {seed}: the ids replay");
        ids.push(a.guest_ids);
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2],
        "other seeds, other ids"
    );
}

/// A far side that does not dedup redelivered mail (its receiving loop
/// drops the outbox item's id) is caught, within a few federated seeds.
#[test]
fn the_checker_finds_a_far_side_that_does_not_dedup() {
    for seed in 0..20 {
        let cfg = Config {
            steps: STEPS,
            far_nodes: 2,
            faulty_far_dedup: true,
            ..Config::new(seed)
        };
        match run(&cfg) {
            Err(SimError::Violation { what, .. })
                if what.contains("delivered") || what.contains("more than once") =>
            {
                eprintln!(
                    "seed {seed} found it: {what}\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS} --far-nodes 2 --faulty-far-dedup"
                );
                return;
            }
            Err(e) => panic!("seed {seed}: another failure: {e}"),
            Ok(_) => {}
        }
    }
    panic!("20 seeds did not find the double delivery");
}

/// A defect the simulation found, fixed: when the far side cancelled the
/// recipient while an item was in flight, the item could be both delivered
/// and bounced (a delivery that passed the locator check before the cancel
/// landed after it, and a redelivery was refused and bounced; or a try was
/// applied, its answer lost, and the retry refused). The far side now
/// refuses in the applying transaction once the recipient is cancelled,
/// and the sender asks `Gateway.applied` before a bounce. Seed 12 showed
/// it (11 of seeds 0 to 299); the default run cancels mid-run, and this
/// seed stays as its witness.
#[test]
fn a_recipient_cancelled_midrun_gets_mail_delivered_or_bounced_never_both() {
    let cfg = Config {
        steps: STEPS,
        far_nodes: 2,
        ..Config::new(12)
    };
    assert!(cfg.cancel_midrun, "the default run cancels mid-run");
    if let Err(e) = run(&cfg) {
        panic!("{e}");
    }
}

/// A defect the simulation found (seed 62429 of 300 steps, one of 10,000
/// seeds 60000–69999): a follower (`inbox --follow`) skips a number missing
/// for the grace as a hole, and a commit that lands later still (its
/// sender, n1, paused 4.4 s with the commit in flight; the guest's runner,
/// restarted on two owners meanwhile, had not yet fenced it) was never
/// shown when its push was dropped: looks start above skipped numbers.
/// Looks now read the skipped numbers again until the inbox mark fences
/// them.
#[test]
fn a_follower_shows_a_message_that_lands_after_it_skipped_its_number() {
    witness(Config::new(62429));
}

/// A defect the simulation found (seed 66417 of 300 steps, federated): a
/// courier that delivered or bounced items and then met a dropped call
/// doubled its queue's backoff as if nothing had moved, so on a link that
/// drops one call in a few the queue drained one 30-s wait at a time, and
/// the outbox was not empty ten minutes after the workload. A turn that
/// moved now starts the backoff again from the first
/// (`rules::outbox::Schedule::finished`; the simulation's courier the same).
#[test]
fn a_queue_that_moves_on_a_lossy_link_drains() {
    let cfg = Config::new(66417);
    assert_eq!(cfg.far_nodes, 2, "a federated seed");
    witness(cfg);
}

/// A defect of the simulation itself (seed 102449 of 300 steps,
/// federated): its `Gateway.applied` (asked before a bounce) awaited the
/// far node's answer with no time limit, and the node asked was killed as
/// it answered; a killed node's store calls never return, so the near
/// cluster's courier waited forever and its outbox never drained. The
/// nodes' call gives up after `CALL_TIMEOUT` (`net/peers.rs`), and so does
/// the simulation's now.
#[test]
fn a_courier_asking_a_node_killed_as_it_answers_goes_on() {
    let cfg = Config::new(102449);
    assert_eq!(cfg.far_nodes, 2, "a federated seed");
    witness(cfg);
}

/// Runs the seed of `cfg` for 300 steps, the length of the sweep that
/// found the defect it witnesses.
fn witness(cfg: Config) {
    let seed = cfg.seed;
    if let Err(e) = run(&Config { steps: 300, ..cfg }) {
        panic!("{e}\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps 300");
    }
}

/// Handlers that handle a later number while an earlier one is still in
/// flight (the bug issue 14 names) are caught, within a few seeds.
#[test]
fn the_checker_finds_a_handler_that_skips() {
    for seed in 0..50 {
        let cfg = Config {
            steps: STEPS,
            faulty_handlers: true,
            ..Config::new(seed)
        };
        match run(&cfg) {
            Err(SimError::Violation { what, .. }) if what.contains("skipped") => {
                eprintln!("seed {seed} found it: {what}");
                return;
            }
            Err(e) => panic!("seed {seed}: another failure: {e}"),
            Ok(_) => {}
        }
    }
    panic!("50 seeds did not find the skip");
}

/// A send whose own number the store refused to fill in (no relay to fill
/// it now) reserves it and commits again, keeping the number it already
/// holds in the recipient's inbox: reserving a fresh one left the first
/// unwritten, a hole the guest's handler waited at for the whole grace
/// (4 s) before closing it. That collapsed the guests' cluster bench with
/// filling on (149 messages handled/s against 1,257 without; stop 37).
/// In calm runs nothing else leaves a number unwritten, so no handler
/// may close a hole; the runs must both fill numbers in and refuse to.
#[test]
fn a_refused_fill_leaves_no_hole_in_the_recipients_inbox() {
    let (mut filled, mut refused) = (0, 0);
    for seed in 0..8 {
        let cfg = Config {
            steps: STEPS,
            far_nodes: 0,
            fill_numbers: true,
            fill_refuse_pct: 30,
            calm: true,
            ..Config::new(seed)
        };
        let r = run(&cfg).unwrap_or_else(|e| {
            panic!("{e}\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS} --far-nodes 0 --fill on --fill-refuse-pct 30 --calm")
        });
        assert_eq!(
            r.holes_closed, 0,
            "seed {seed}: handlers closed {} holes in a calm run ({:?})\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS} --far-nodes 0 --fill on --fill-refuse-pct 30 --calm",
            r.holes_closed, r.fills
        );
        assert_eq!(
            r.acked, r.sends,
            "seed {seed}: a calm run acknowledges every send"
        );
        filled += r.fills.filled;
        refused += r.fills.refused;
    }
    assert!(
        filled > 50 && refused > 10,
        "the runs filled {filled} commits and refused {refused}: too few to show anything"
    );
}

/// A message dismissed before its guest's handler got to it leaves its
/// number empty, below the inbox mark the dismissal raised. The handler
/// passes over such a number at once: nothing can be written below the
/// mark, so there is nothing to wait for. Until stop 38 it waited out the
/// whole grace (4 s) there, as at a hole whose commit might still land:
/// with dismissals in calm runs, the first such seed closed a hole after
/// the grace. The runs must dismiss, and pass over dismissed numbers.
#[test]
fn a_message_dismissed_before_it_was_handled_holds_up_nothing() {
    let (mut dismissed, mut passed) = (0, 0);
    for seed in 0..12 {
        let cfg = Config {
            steps: STEPS,
            far_nodes: 0,
            calm: true,
            ..Config::new(seed)
        };
        let replay = format!(
            "replay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS} --far-nodes 0 --calm"
        );
        let r = run(&cfg).unwrap_or_else(|e| panic!("{e}\n{replay}"));
        assert_eq!(
            r.holes_closed, 0,
            "seed {seed}: handlers waited out the grace at {} numbers in a calm run ({} dismissed)\n{replay}",
            r.holes_closed, r.dismissed
        );
        dismissed += r.dismissed;
        passed += r.settled_passed;
    }
    assert!(
        dismissed > 20 && passed > 0,
        "the runs dismissed {dismissed} messages and passed over {passed} numbers: too few to show anything"
    );
}
