//! `kill -9` during a burst of sends: every acknowledged send survives,
//! exactly once; nothing is duplicated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use capstan_tests::{Node, texts};

const SENDS: usize = 200;
const THREADS: usize = 4;
/// Kill the daemon once this many sends were acknowledged.
const KILL_AFTER: usize = 60;

#[test]
fn burst_of_sends_with_kill_9() {
    let mut node = Node::started();
    node.ok(["mkguest", "alice"]);
    let node_ref = &node;

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let failed_codes = Arc::new(Mutex::new(BTreeMap::<Option<i32>, usize>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let pid = node.daemon_pid();

    thread::scope(|s| {
        for t in 0..THREADS {
            let acked = Arc::clone(&acked);
            let failed_codes = Arc::clone(&failed_codes);
            let done = Arc::clone(&done);
            s.spawn(move || {
                for i in (t..SENDS).step_by(THREADS) {
                    let text = format!("msg-{i}");
                    let r = node_ref.run(["send", "alice", &text]);
                    if r.success() {
                        acked.lock().unwrap().insert(text);
                        done.fetch_add(1, Ordering::SeqCst);
                    } else {
                        *failed_codes.lock().unwrap().entry(r.code).or_default() += 1;
                    }
                }
            });
        }
        // Kill the daemon in the middle of the burst.
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::SeqCst) < KILL_AFTER {
            assert!(Instant::now() < deadline, "sends too slow");
            thread::sleep(Duration::from_millis(2));
        }
        capstan_tests::kill(pid, libc::SIGKILL);
    });
    capstan_tests::wait_gone(pid, capstan_tests::EXIT_TIMEOUT);

    let acked = acked.lock().unwrap().clone();
    let failed = failed_codes.lock().unwrap().clone();
    assert!(acked.len() >= KILL_AFTER, "acked {}", acked.len());
    // A send that found no daemon exits 2; one cut off mid-way may exit 1, 2
    // or 4 (try again later)
    // (never 0, never a signal).
    for code in failed.keys() {
        assert!(
            matches!(code, Some(1) | Some(2) | Some(4)),
            "failed sends exited with {failed:?}"
        );
    }

    node.start();
    let inbox = node.inbox(&["--as", "alice"]);
    let seen = texts(&inbox);
    let mut counts = BTreeMap::<&str, usize>::new();
    for t in &seen {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "duplicated messages in alice's inbox: {dups:?}"
    );
    let lost: Vec<_> = acked
        .iter()
        .filter(|t| !counts.contains_key(t.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged sends lost after kill -9 (of {} acked): {lost:?}",
        lost.len(),
        acked.len()
    );
    for t in &seen {
        assert!(t.starts_with("msg-"), "unexpected message {t:?}");
    }
    // Message numbers are unique and dense-or-increasing.
    let numbers: Vec<u64> = inbox
        .iter()
        .map(|m| m["number"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<_> = numbers.iter().collect();
    assert_eq!(unique.len(), numbers.len(), "numbers repeat: {numbers:?}");

    // The host's own copies: likewise exactly once each.
    let host = texts(&node.inbox(&[]));
    let host_set: BTreeSet<_> = host.iter().cloned().collect();
    assert_eq!(host_set.len(), host.len(), "duplicates in the host's inbox");
    for t in &acked {
        assert!(host_set.contains(t), "the host's copy of {t:?} is lost");
    }

    // The daemon keeps working after recovery.
    node.ok(["send", "alice", "after"]);
    let after = texts(&node.inbox(&["--as", "alice"]));
    assert_eq!(after.iter().filter(|t| *t == "after").count(), 1);
}
