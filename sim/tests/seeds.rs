//! The simulation in `cargo test`: a few hundred seeds (each 150 steps of a
//! 3-node cluster), a replay, and a test that the checker finds a handler
//! that skips. A failure names its seed; replay it with
//! `cargo run -p capstan-sim --release -- --seed SEED --steps 150`.

use capstan_sim::{Config, SimError, run};

const STEPS: u64 = 150;

fn seeds(from: u64, count: u64) {
    for seed in from..from + count {
        let cfg = Config {
            steps: STEPS,
            ..Config::new(seed)
        };
        if let Err(e) = run(&cfg) {
            panic!(
                "{e}\nreplay: cargo run -p capstan-sim --release -- --seed {seed} --steps {STEPS}"
            );
        }
    }
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

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 42] {
        let cfg = Config {
            steps: STEPS,
            ..Config::new(seed)
        };
        let a = run(&cfg).expect("first run");
        let b = run(&cfg).expect("second run");
        assert_eq!(a.digest, b.digest, "seed {seed}: {a:?} vs {b:?}");
        assert_eq!(a.faults, b.faults, "seed {seed}");
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
