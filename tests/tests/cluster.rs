//! Clusters (issue 5): three `capstan` nodes sharing a real 3-member etcd
//! cluster on loopback (scripts/etcd-cluster), killed with `kill -9`,
//! paused with SIGSTOP, drained; a lone node federated with the cluster.
//!
//! Needs `CAPSTAN_ETCD_ENDPOINTS` (the test command starts etcd and sets
//! it); skipped without it unless `CAPSTAN_REQUIRE_ETCD=1`. Each test uses
//! its own key prefix in etcd. The tests run one at a time (they kill etcd
//! members and time leases).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capstan_tests::{Node, guest_wasm, kill, texts};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

/// The nodes' lease: longer than the default 3 s, so that a test machine
/// loaded far beyond its cores (slow etcd commits) does not lose leases.
const LEASE_MS: &str = "5000";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-cluster")
}

fn etcd(args: &[&str]) -> String {
    let out = std::process::Command::new(script())
        .args(args)
        .output()
        .expect("scripts/etcd-cluster");
    assert!(
        out.status.success(),
        "scripts/etcd-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restarts a killed etcd member (a few tries: a member restarted while
/// the others are busy sometimes exits once while rejoining).
fn restart_etcd_member(m: &str) {
    let mut last = String::new();
    for _ in 0..4 {
        let out = std::process::Command::new(script())
            .args(["restart", m])
            .output()
            .expect("scripts/etcd-cluster");
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("etcd member {m} did not come back: {last}");
}

/// Three nodes n1..n3 on one etcd prefix, started and joined.
struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(tag: &str) -> Option<Cluster> {
        Cluster::start_with(tag, "")
    }

    /// [`Cluster::start`] with the relay filling in the senders' own
    /// numbers (`CAPSTAN_FILL_NUMBERS=1`, see `actors/src/mail.rs`): the
    /// default, named for the tests that depend on it.
    fn start_filling(tag: &str) -> Option<Cluster> {
        Cluster::start_env(tag, "", &[("CAPSTAN_FILL_NUMBERS", "1")])
    }

    /// [`Cluster::start`] with options for the store spec (`?name=value…`).
    fn start_with(tag: &str, options: &str) -> Option<Cluster> {
        Cluster::start_env(tag, options, &[])
    }

    /// [`Cluster::start_with`], each node with the environment `env` too.
    fn start_env(tag: &str, options: &str, env: &[(&str, &str)]) -> Option<Cluster> {
        let spec = format!("{}{options}", capstan_tests::etcd_spec(tag)?);
        let mut nodes = Vec::new();
        let mut key = String::new();
        for i in 1..=3 {
            let mut n = Node::named(&format!("n{i}")).with_env("CAPSTAN_LEASE_MS", LEASE_MS);
            for (k, v) in env {
                n = n.with_env(k, v);
            }
            if i == 1 {
                let v = n.json(["cluster", "init", "--store", &spec]);
                key = v["secrets_key"].as_str().unwrap().to_string();
                assert_eq!(v["created"], true, "{v}");
                // A second init changes nothing.
                let again = n.json(["cluster", "init", "--store", &spec]);
                assert_eq!(again["created"], false, "{again}");
                assert_eq!(again["cluster_id"], v["cluster_id"]);
            }
            capstan_tests::start_member(&mut n, &spec, &key);
            nodes.push(n);
        }
        let c = Cluster { nodes };
        c.wait(
            "three live members",
            || c.n(0).json(["cluster", "members"]),
            |v| live(v).len() == 3,
        );
        Some(c)
    }

    fn n(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn wait(&self, what: &str, f: impl Fn() -> Value, pred: impl Fn(&Value) -> bool) -> Value {
        capstan_tests::wait_until(what, 30, f, pred)
    }

    fn placement(&self, via: usize, name: &str) -> Value {
        self.n(via).json(["cluster", "placement", name])
    }
}

fn live(members: &Value) -> BTreeSet<String> {
    members
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "live")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

/// Texts of an inbox, with how often each appears.
fn counts(inbox: &[Value]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for m in inbox {
        let t = if m["type"] == "request" {
            &m["description"]
        } else {
            &m["text"]
        };
        *c.entry(t.as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    c
}

fn numbers_unique(inbox: &[Value]) {
    let ns: Vec<u64> = inbox
        .iter()
        .map(|m| m["number"].as_u64().unwrap())
        .collect();
    let set: BTreeSet<u64> = ns.iter().copied().collect();
    assert_eq!(ns.len(), set.len(), "inbox numbers repeat: {ns:?}");
}

/// Every acknowledged send of `acked` is in `inbox` exactly once, no
/// message is there twice, and no number is used twice.
fn each_acked_once(inbox: &[Value], acked: &[String]) {
    numbers_unique(inbox);
    let got = counts(inbox);
    for t in acked {
        assert_eq!(
            got.get(t),
            Some(&1),
            "acknowledged send {t:?} is there exactly once"
        );
    }
    assert!(
        got.values().all(|&n| n == 1),
        "a send was delivered twice: {got:?}"
    );
}

#[test]
fn owner_killed_with_a_pending_request_resumes_on_a_survivor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = Cluster::start("failover") else {
        return;
    };
    c.n(0).ok(["mkguest", "alice"]);
    // Any node serves any agent: alice asks her host through n2.
    let n = c.n(1).json([
        "request",
        "HOST",
        "need a doc",
        "--name",
        "doc",
        "--as",
        "alice",
    ]);
    assert!(n["number"].is_u64(), "{n}");
    let p = c.placement(0, "alice");
    assert_eq!(p["node"], "n2", "the node that served alice owns her: {p}");
    assert_eq!(p["state"], "live");

    c.nodes[1].kill9();

    // The host's pending decision is in the store, seen from n3.
    let inbox = c.n(2).inbox(&[]);
    let req = inbox
        .iter()
        .find(|m| m["description"] == "need a doc")
        .unwrap_or_else(|| panic!("the request is gone: {inbox:?}"));
    assert_eq!(req["state"], "pending");
    assert_eq!(req["from"], "alice");
    let number = req["number"].as_u64().unwrap().to_string();

    // Mail for alice reaches her on a survivor (n3 claims her once n2's lease lapsed).
    c.n(2).ok(["send", "alice", "are you there?"]);
    let p = c.placement(0, "alice");
    assert_eq!(p["node"], "n3", "{p}");
    assert_eq!(p["state"], "live");

    // Resolving the request on n3 reaches alice, read through n1.
    c.n(2)
        .ok(["store", "--text", "the doc", "--name", "greeting"]);
    c.n(2).ok(["resolve", &number, "greeting"]);
    assert_eq!(c.n(0).ok(["cat", "doc", "--as", "alice"]), "the doc");
    let alice = c.n(0).inbox(&["--as", "alice"]);
    numbers_unique(&alice);
    assert_eq!(
        counts(&alice),
        BTreeMap::from([
            ("are you there?".to_string(), 1),
            ("need a doc".to_string(), 1)
        ]),
        "{alice:?}"
    );

    // The dead node shows as dead; the others live.
    let v = c.wait(
        "n2 dead",
        || c.n(0).json(["cluster", "members"]),
        |v| live(v) == BTreeSet::from(["n1".to_string(), "n3".to_string()]),
    );
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "n2" && m["state"] == "dead")
    );

    // n2 comes back: same name, new epoch, serves again.
    c.nodes[1].start();
    let s = c.n(1).json(["cluster", "status"]);
    assert_eq!(s["serving"], true, "{s}");
    assert!(s["epoch"].as_u64().unwrap() >= 2, "{s}");
    c.n(1).ok(["send", "alice", "back again"]);
    assert_eq!(counts(&c.n(0).inbox(&["--as", "alice"]))["back again"], 1);
}

#[test]
fn etcd_member_killed_during_a_burst_of_sends_loses_and_repeats_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start("burst") else {
        return;
    };
    c.n(0).ok(["mkguest", "alice"]);
    let acked = Mutex::new(Vec::<String>::new());
    let killed = std::sync::atomic::AtomicBool::new(false);
    // The raft leader: killing it forces an election mid-burst (a follower's
    // death would barely be noticed).
    let leader = etcd(&["leader"]).trim().to_string();
    let acked_after_kill = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (i, node) in c.nodes.iter().enumerate() {
            let (acked, killed, leader, acked_after_kill) =
                (&acked, &killed, &leader, &acked_after_kill);
            s.spawn(move || {
                let mut k = 0;
                // At least 12 s, and until 30 sends went through (a slow
                // machine), at most 60 s.
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(12)
                    || (acked.lock().unwrap().len() < 30
                        && start.elapsed() < Duration::from_secs(60))
                {
                    let text = format!("m{i}-{k}");
                    k += 1;
                    let was_killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                    if node.run(["send", "alice", &text]).success() {
                        acked.lock().unwrap().push(text);
                        if was_killed {
                            acked_after_kill.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    if i == 0 && k == 20 && !killed.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        etcd(&["kill", leader]);
                    }
                }
            });
        }
    });
    restart_etcd_member(&leader);
    assert!(
        killed.load(std::sync::atomic::Ordering::SeqCst),
        "the burst ended before the etcd leader was killed"
    );
    let after = acked_after_kill.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after > 0,
        "no send went through after the leader was killed"
    );
    let acked = acked.into_inner().unwrap();
    assert!(
        acked.len() >= 30,
        "too few sends went through: {}",
        acked.len()
    );
    each_acked_once(&c.n(2).inbox(&["--as", "alice"]), &acked);
}

/// The member that merges the cluster's busy commits (the first by name,
/// n1: see `capstan_cluster::relay`) dies with kill -9 in the middle of a
/// burst of concurrent sends through the other two nodes, whose batches it
/// was committing: every acknowledged send is in the inbox once, none is
/// there twice, and sends go on without it.
#[test]
fn the_commit_relay_killed_during_a_burst_loses_and_repeats_nothing() {
    relay_killed_during_a_burst("relaykill", false);
}

/// The same with the host's inbox (the senders') and alice's on the relay:
/// the relay fills the host's numbers in for the other nodes' sends
/// (`actors/src/mail.rs`) when it dies. Groups it took and applied but did
/// not answer are settled by their markers, and their senders learn their
/// numbers from the exactly-once records: in the host's inbox as in
/// alice's, every acknowledged send is there once, no number twice.
#[test]
fn the_relay_filling_the_senders_numbers_killed_during_a_burst_loses_nothing() {
    relay_killed_during_a_burst("fillkill", true);
}

fn relay_killed_during_a_burst(tag: &str, host_on_relay: bool) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = if host_on_relay {
        Cluster::start_filling(tag)
    } else {
        Cluster::start(tag)
    };
    let Some(mut c) = started else {
        return;
    };
    let first = if host_on_relay { 0 } else { 1 };
    c.n(first).ok(["mkguest", "alice"]);
    c.n(first).ok(["send", "alice", "first"]);
    let acked = Mutex::new(Vec::<String>::new());
    let killed = AtomicBool::new(false);
    let after = AtomicUsize::new(0);
    let (relay, others) = c.nodes.split_at_mut(1);
    let others = &*others;
    std::thread::scope(|s| {
        let (acked, killed, after) = (&acked, &killed, &after);
        for t in 0..12 {
            let node = &others[t % 2];
            s.spawn(move || {
                let start = Instant::now();
                let mut k = 0;
                // At least 15 s, and until 5 sends went through after the
                // kill (a slow machine), at most 60 s.
                while start.elapsed() < Duration::from_secs(15)
                    || (after.load(Ordering::SeqCst) < 5
                        && start.elapsed() < Duration::from_secs(60))
                {
                    let text = format!("r{t}-{k}");
                    k += 1;
                    let was_killed = killed.load(Ordering::SeqCst);
                    if node.run(["send", "alice", &text]).success() {
                        acked.lock().unwrap().push(text);
                        if was_killed {
                            after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        s.spawn(move || {
            std::thread::sleep(Duration::from_secs(4));
            relay[0].kill9();
            killed.store(true, Ordering::SeqCst);
        });
    });
    let relayed: u64 = [1, 2]
        .iter()
        .map(|&i| {
            c.n(i).json(["cluster", "status"])["store_stats"]["relayed_out"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        relayed > 0,
        "no commit was relayed: the test tested nothing"
    );
    if host_on_relay {
        let filled: u64 = [1, 2]
            .iter()
            .map(|&i| {
                c.n(i).json(["cluster", "status"])["store_stats"]["commits_filled"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        assert!(
            filled > 0,
            "the relay filled no number in: the test tested nothing"
        );
    }
    assert!(
        after.load(Ordering::SeqCst) > 0,
        "no send went through after the relay died"
    );
    let acked = acked.into_inner().unwrap();
    each_acked_once(&c.n(2).inbox(&["--as", "alice"]), &acked);
    // the senders' own copies, in the host's inbox
    let mine: Vec<Value> = c
        .n(2)
        .inbox(&[])
        .into_iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with('r')))
        .collect();
    each_acked_once(&mine, &acked);
}

#[test]
fn a_paused_owner_is_fenced_and_steps_down() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start("fence") else {
        return;
    };
    c.n(0).ok(["mkguest", "alice"]);
    c.n(0).ok(["send", "alice", "one"]);
    assert_eq!(c.placement(1, "alice")["node"], "n1");
    let before = c.n(0).json(["cluster", "status"]);
    let pid = c.n(0).daemon_pid();

    kill(pid, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(7000)); // past the 5 s lease
    // n2 takes alice over while n1 sleeps.
    let r = c.n(1).run(["send", "alice", "two"]);
    kill(pid, libc::SIGCONT);
    assert!(r.success(), "{r}");
    assert_eq!(c.placement(2, "alice")["node"], "n2");

    // n1 wakes up, notices its lease is gone, steps down, re-registers.
    let s = c.wait(
        "n1 to re-register",
        || c.n(0).json(["cluster", "status"]),
        |s| s["serving"] == true && s["epoch"].as_u64() > before["epoch"].as_u64(),
    );
    assert!(s["stepdowns"].as_u64().unwrap() >= 1, "{s}");
    // n1 still works, through alice's new owner.
    c.n(0).ok(["send", "alice", "three"]);
    assert_eq!(c.placement(0, "alice")["node"], "n2");
    let inbox = c.n(2).inbox(&["--as", "alice"]);
    numbers_unique(&inbox);
    assert_eq!(texts(&inbox), ["one", "two", "three"]);
}

/// An owner paused (SIGSTOP) in the middle of a guest's handler, past its
/// lease: a survivor takes the guest over and runs the handler again. When
/// the paused node wakes, its own clock shows its lease lapsed: it steps
/// down and its handler writes nothing more (a write that got past that
/// check would be refused by the placement fence and counted in
/// `fenced_writes`). The handler's effects happen once: one notice, one
/// answer, the count right.
#[test]
fn a_paused_owner_in_a_handler_steps_down_and_the_handler_counts_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wasm = guest_wasm("counter");
    let Some(c) = Cluster::start("fence-handler") else {
        return;
    };
    c.n(0).ok(["install", &wasm, "--name", "counter"]);
    c.n(0).ok([
        "mkguest",
        "bot",
        "--component",
        "counter",
        "--fuel",
        "100000000000",
        "--deadline-ms",
        "60000",
    ]);
    c.n(0).ok(["send", "bot", "increment slowly 3000000000"]);
    wait_mail(&c, 1, "bot", "stored count 1; working");
    assert_eq!(c.placement(1, "bot")["node"], "n1");
    let pid = c.n(0).daemon_pid();
    kill(pid, libc::SIGSTOP);
    let at_pause = texts(&c.n(1).inbox(&[]));
    assert!(
        !at_pause.iter().any(|t| t.starts_with("count = ")),
        "the handler finished before its node was paused: {at_pause:?}"
    );
    std::thread::sleep(Duration::from_millis(7000)); // past the 5 s lease
    // Mail through n2: n2 takes bot over, runs the cut handler again, then
    // this message.
    c.n(1).ok(["send", "bot", "get"]);
    wait_mail(&c, 1, "bot", "count = 1");
    assert_eq!(c.placement(1, "bot")["node"], "n2");
    kill(pid, libc::SIGCONT);
    // n1 wakes inside the handler, finishes its loop and tries to write.
    let s = c.wait(
        "n1 to step down",
        || c.n(0).json(["cluster", "status"]),
        |s| s["stepdowns"].as_u64() >= Some(1),
    );
    eprintln!(
        "n1 after waking: fenced_writes {}, stepdowns {}",
        s["fenced_writes"], s["stepdowns"]
    );
    // Give a stale write time to land, if it could; then a sentinel.
    std::thread::sleep(Duration::from_millis(1000));
    c.n(2).ok(["send", "bot", "increment"]);
    let inbox = wait_mail(&c, 2, "bot", "count = 2");
    let all = texts(&inbox);
    let notices = all.iter().filter(|t| t.starts_with("stored count")).count();
    let answers: Vec<&String> = all.iter().filter(|t| t.starts_with("count = ")).collect();
    assert_eq!(notices, 1, "{all:?}");
    assert_eq!(
        answers,
        ["count = 1", "count = 1", "count = 2"],
        "increment, get, sentinel: {all:?}"
    );
    assert_eq!(c.n(2).ok(["cat", "--as", "bot", "count"]).trim(), "2");
}

#[test]
fn drain_moves_incarnations_and_the_node_stops_unnoticed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = Cluster::start("drain") else {
        return;
    };
    for a in ["alice", "bob"] {
        c.n(0).ok(["mkguest", a]);
        c.n(1).ok(["send", a, "before"]);
        assert_eq!(c.placement(0, a)["node"], "n2");
    }
    let v = c.n(0).json(["cluster", "drain", "n2"]);
    assert_eq!(v["drained"], true, "{v}");
    assert!(v["moved"].as_u64().unwrap() >= 2, "{v}");
    for a in ["alice", "bob"] {
        let p = c.placement(2, a);
        assert_ne!(p["node"], "n2", "{a} still on the drained node: {p}");
    }
    let (draining, members) = capstan_tests::member_in_state(c.n(2), "n2", "draining");
    assert!(draining, "{members}");
    c.nodes[1].stop();
    // Nobody notices: sends right after the stop go through at once.
    let t = Instant::now();
    c.n(2).ok(["send", "alice", "after"]);
    c.n(0).ok(["send", "bob", "after"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "sends waited for a lease: {:?}",
        t.elapsed()
    );
    for a in ["alice", "bob"] {
        assert_eq!(texts(&c.n(2).inbox(&["--as", a])), ["before", "after"]);
    }
    // A node cannot drain itself; unknown nodes are refused.
    let (code, err) = c.n(0).fail(["cluster", "drain", "n1"]);
    assert_eq!(code, 1);
    assert!(err.contains("cluster leave"), "{err}");
    let (_, err) = c.n(0).fail(["cluster", "drain", "n9"]);
    assert!(err.contains("no node called"), "{err}");
    // leave: n3 hands its work over and stops.
    let v = c.n(2).json(["cluster", "leave"]);
    assert_eq!(v["left"], true);
    let members = c.n(0).json(["cluster", "members"]);
    assert!(
        !members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "n3"),
        "{members}"
    );
    c.n(0).ok(["send", "alice", "last"]);
    assert_eq!(
        texts(&c.n(0).inbox(&["--as", "alice"])),
        ["before", "after", "last"]
    );
}

#[test]
fn a_lone_peer_keeps_mailing_a_cluster_agent_across_a_node_failure() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut c) = Cluster::start("peer") else {
        return;
    };
    let mut lone = Node::new();
    lone.start_with(&["--listen", "127.0.0.1:0"]);
    // The cluster's host invites the lone node; the locator names every node.
    let v = c.n(0).json(["invite", "lone"]);
    let inv = v["invitation"].as_str().unwrap().to_string();
    lone.ok(["accept", &inv, "cluster"]);
    lone.ok(["send", "cluster", "hello 1"]);
    let wait_for = |node: &Node, text: &str| {
        // generous: after the kill, delivery waits for the dead node's
        // lease to end and the outbox's next retry
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let inbox = node.inbox(&[]);
            if texts(&inbox).iter().any(|t| t == text) {
                return inbox;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never arrived: {inbox:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(c.n(1), "hello 1");
    // The node the lone peer dialled dies; mail goes on through the others.
    c.nodes[0].kill9();
    lone.ok(["send", "cluster", "hello 2"]);
    let inbox = wait_for(c.n(2), "hello 2");
    assert_eq!(
        counts(&inbox),
        BTreeMap::from([("hello 1".to_string(), 1), ("hello 2".to_string(), 1)])
    );
    // And back: the cluster answers from a survivor.
    c.n(1).ok(["send", "lone", "hi from the cluster"]);
    wait_for(&lone, "hi from the cluster");
    drop(lone);
}

#[test]
fn members_record_and_locators_name_the_advertised_addresses() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(spec) = capstan_tests::etcd_spec("advertise") else {
        return;
    };
    // Two nodes on every interface, each telling the others 127.0.0.1 and
    // the port it was bound to (issue 17).
    let mut nodes = Vec::new();
    let mut key = String::new();
    for i in 1..=2 {
        let mut n = Node::named(&format!("n{i}")).with_env("CAPSTAN_LEASE_MS", LEASE_MS);
        if i == 1 {
            key = n.json(["cluster", "init", "--store", &spec])["secrets_key"]
                .as_str()
                .unwrap()
                .to_string();
        }
        // Without --advertise a wildcard is refused, cluster or not.
        let (code, err) = n.fail(["start", "--store", &spec, "--listen", "0.0.0.0:0"]);
        assert_eq!(code, 1);
        assert!(err.contains("--advertise"), "{err}");
        n.start_with(&[
            "--store",
            &spec,
            "--listen",
            "0.0.0.0:0",
            "--advertise",
            "127.0.0.1",
            "--secrets-key",
            &key,
        ]);
        nodes.push(n);
    }
    let c = Cluster { nodes };
    let members = c.wait(
        "two live members",
        || c.n(0).json(["cluster", "members"]),
        |v| live(v).len() == 2,
    );
    let mut addrs = BTreeSet::new();
    for m in members.as_array().unwrap() {
        let addr = m["addr"].as_str().unwrap();
        assert!(addr.starts_with("127.0.0.1:"), "member record: {m}");
        assert!(!addr.ends_with(":0"), "member record: {m}");
        // the record layouts its build reads (small values inline)
        assert_eq!(m["records"], 1, "member record: {m}");
        addrs.insert(addr.to_string());
    }
    // every live member reads small values inline, so they are kept so
    let status = c.n(0).json(["cluster", "status"]);
    assert_eq!(status["inline_values"], true, "{status}");
    // every member merges relayed commits; the first by name does
    for m in members.as_array().unwrap() {
        assert_eq!(m["relays"], true, "member record: {m}");
    }
    assert_eq!(status["commit_merger"], "n1", "{status}");
    assert_eq!(c.n(1).json(["cluster", "status"])["commit_merger"], "n1");
    c.n(0).ok(["store", "--text", "shared", "--name", "doc"]);
    let l = c.n(0).json(["locate", "doc"])["locator"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!l.contains("0.0.0.0"), "{l}");
    let hints: BTreeSet<String> = l
        .split_once("?at=")
        .unwrap()
        .1
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(hints, addrs, "the locator names every member: {l}");
    let mut lone = Node::new();
    lone.start();
    lone.ok(["adopt-locator", &l, "--name", "doc"]);
    assert_eq!(lone.ok(["cat", "doc"]), "shared");
}

#[test]
fn cluster_commands_refuse_bad_input() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(spec) = capstan_tests::etcd_spec("bad") else {
        return;
    };
    let mut n = Node::named("n1");
    // A node of an uninitialised store says what to run.
    let (code, err) = n.fail(["start", "--store", &spec, "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1);
    assert!(err.contains("cluster init"), "{err}");
    // init needs a replicated store.
    let (code, err) = n.fail(["cluster", "init", "--store", "/tmp/x.redb"]);
    assert_eq!(code, 1);
    assert!(err.contains("replicated store"), "{err}");
    // A cluster node must listen.
    n.ok(["cluster", "init", "--store", &spec]);
    let (_, err) = n.fail(["start", "--store", &spec]);
    assert!(err.contains("--listen"), "{err}");
    // cluster commands on a lone node explain themselves.
    let mut lone = Node::new();
    lone.start();
    let (code, err) = lone.fail(["cluster", "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("not in a cluster"), "{err}");
    lone.stop();
    // Unknown names.
    n.start_with(&["--store", &spec, "--listen", "127.0.0.1:0"]);
    let (_, err) = n.fail(["cluster", "placement", "nobody"]);
    assert!(err.contains("unknown name"), "{err}");
    let p = {
        n.ok(["mkguest", "idle"]);
        n.json(["cluster", "placement", "idle"])
    };
    assert_eq!(p["state"], "passive", "never used, so not incarnated: {p}");
    n.stop();
}

/// Waits until the root host's inbox (read through node `via`) has a
/// message from `from` with text `text`; returns the inbox.
fn wait_mail(c: &Cluster, via: usize, from: &str, text: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let inbox = c.n(via).inbox(&[]);
        if inbox
            .iter()
            .any(|m| m["from"] == from && texts(std::slice::from_ref(m)).concat() == text)
        {
            return inbox;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} from {from}: {inbox:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_guest_component_resumes_on_a_survivor_with_its_state() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wasm = guest_wasm("counter");
    let Some(mut c) = Cluster::start("component") else {
        return;
    };
    c.n(0).ok(["install", &wasm, "--name", "counter"]);
    c.n(0).ok(["mkguest", "bot", "--component", "counter"]);
    // The first mail for bot goes through n2: n2 owns bot and runs its component.
    c.n(1).ok(["send", "bot", "increment"]);
    wait_mail(&c, 0, "bot", "count = 1");
    let p = c.placement(0, "bot");
    assert_eq!(p["node"], "n2", "{p}");

    c.nodes[1].kill9();

    // Mail for bot through n3: n3 claims it once n2's lease lapsed, runs
    // the component from the store, and the count goes on from 1.
    c.n(2).ok(["send", "bot", "increment"]);
    wait_mail(&c, 2, "bot", "count = 2");
    let p = c.placement(0, "bot");
    assert_eq!(p["node"], "n3", "{p}");
    assert_eq!(c.n(0).ok(["cat", "--as", "bot", "count"]).trim(), "2");
    // A sentinel: once its answer is in, a repeated earlier answer would be
    // too (the guest handles its inbox in order).
    c.n(2).ok(["send", "bot", "increment"]);
    let inbox = wait_mail(&c, 2, "bot", "count = 3");
    // Exactly once: one answer per increment, none repeated by the survivor.
    let answers: Vec<String> = texts(&inbox)
        .into_iter()
        .filter(|t| t.starts_with("count = "))
        .collect();
    assert_eq!(
        answers,
        ["count = 1", "count = 2", "count = 3"],
        "{inbox:#?}"
    );
}

/// The owner of a guest dies with `kill -9` in the middle of a handler
/// (the count stored, the host told, no reply yet). With no new mail, a
/// survivor claims the guest once the dead node's lease lapsed, runs the
/// handler again, and nothing is done twice: one notice, one answer, and
/// the count is 1.
#[test]
fn a_handler_cut_short_by_its_nodes_death_finishes_on_a_survivor_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wasm = guest_wasm("counter");
    let Some(mut c) = Cluster::start("midhandler") else {
        return;
    };
    c.n(0).ok(["install", &wasm, "--name", "counter"]);
    c.n(0).ok([
        "mkguest",
        "bot",
        "--component",
        "counter",
        "--fuel",
        "100000000000",
        "--deadline-ms",
        "60000",
    ]);
    // Through n2: n2 owns bot and starts the slow handler.
    c.n(1).ok(["send", "bot", "increment slowly 1500000000"]);
    wait_mail(&c, 0, "bot", "stored count 1; working");
    let p = c.placement(0, "bot");
    assert_eq!(p["node"], "n2", "{p}");
    c.nodes[1].kill9();
    // The kill landed in the handler (else nothing was replayed and the
    // test tested nothing): its answer was not given yet.
    let at_kill = texts(&c.n(0).inbox(&[]));
    assert!(
        !at_kill.iter().any(|t| t.starts_with("count = ")),
        "the handler finished before its node was killed: {at_kill:?}"
    );

    wait_mail(&c, 0, "bot", "count = 1");
    let p = c.placement(0, "bot");
    assert_ne!(p["node"], "n2", "{p}");
    assert_eq!(c.n(0).ok(["cat", "--as", "bot", "count"]).trim(), "1");
    // A sentinel, then count: a repeated notice or answer of the replayed
    // handler would be in by the time the sentinel's answer is.
    c.n(0).ok(["send", "bot", "increment"]);
    let inbox = wait_mail(&c, 0, "bot", "count = 2");
    let all = texts(&inbox);
    let notices = all.iter().filter(|t| t.starts_with("stored count")).count();
    let answers = all.iter().filter(|t| t.starts_with("count = ")).count();
    assert_eq!((notices, answers), (1, 2), "{inbox:#?}");
}

/// Like [`wait_mail`], for a message whose text contains `needle`; returns it.
fn wait_mail_containing(c: &Cluster, via: usize, from: &str, needle: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let inbox = c.n(via).inbox(&[]);
        if let Some(m) = inbox.iter().find(|m| {
            m["from"] == from && texts(std::slice::from_ref(*m)).concat().contains(needle)
        }) {
            return m.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no message from {from} containing {needle:?}: {inbox:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An LLM agent waits for its host's decision on a code proposal; the node
/// owning it is killed with -9; the host decides through another node
/// (`capstan endow`), and the agent goes on with the same conversation on a
/// survivor, doing nothing twice.
#[test]
fn an_llm_agents_pending_approval_survives_its_nodes_death() {
    use capstan_tests::llm_server::{LlmServer, Reply};
    use serde_json::json;
    const KEY: &str = "test-anthropic-key-cluster-4f1e";
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = guest_wasm("llm-agent");
    let evaluator = guest_wasm("evaluator");
    let Some(mut c) = Cluster::start("llmagent") else {
        return;
    };
    let server = LlmServer::start();
    server.require_key(KEY);
    server.add_anthropic(c.n(0), "claude", KEY);
    c.n(0).ok([
        "install",
        &agent,
        "--name",
        "llm-agent",
        "--grant",
        "llm=claude",
    ]);
    c.n(0).ok(["install", &evaluator, "--name", "evaluator"]);
    c.n(0).ok(["mkguest", "helper", "--component", "llm-agent"]);
    server.push(Reply::Tools {
        text: String::new(),
        calls: vec![(
            "define_code".into(),
            json!({"source": "reader.inbox().length", "slots": {"reader": "an inbox reader"}}),
        )],
    });
    // Through n2: n2 owns helper and runs its turn up to the proposal.
    c.n(1)
        .ok(["send", "helper", "how many messages are in my inbox?"]);
    let proposal = wait_mail_containing(&c, 0, "helper", "definition: slots");
    let p = c.placement(0, "helper");
    assert_eq!(p["node"], "n2", "{p}");
    c.nodes[1].kill9();

    // The host decides through n3; a survivor takes helper over.
    server.push(Reply::text("You have 2 messages."));
    let n = proposal["number"].as_u64().unwrap().to_string();
    let v = c.n(2).json(["endow", n.as_str(), "--bind", "reader=SELF"]);
    assert_eq!(v["result"], "2", "{v}");
    wait_mail_containing(&c, 0, "helper", "You have 2 messages.");
    let p = c.placement(0, "helper");
    assert_ne!(p["node"], "n2", "{p}");
    // the survivor told the host that helper resumed there, once
    let notice = wait_mail_containing(&c, 0, "helper", "resumed on node");
    let notice = texts(&[notice]).concat();
    assert!(notice.contains("node n2 stopped serving me"), "{notice}");
    let reqs = server.requests();
    assert_eq!(
        reqs.len(),
        2,
        "the model was asked once per step: {reqs:#?}"
    );
    assert!(
        reqs[1].body.contains("how many messages are in my inbox?"),
        "the same conversation: {}",
        reqs[1].body
    );
    let all = texts(&c.n(0).inbox(&[]));
    assert_eq!(
        all.iter()
            .filter(|t| t.starts_with("resumed on node"))
            .count(),
        1,
        "{all:#?}"
    );
    let proposals = all
        .iter()
        .filter(|t| t.starts_with("definition: slots"))
        .count();
    let answers = all.iter().filter(|t| *t == "You have 2 messages.").count();
    assert_eq!((proposals, answers), (1, 1), "{all:#?}");
}

/// 300 `send`s at once through all three nodes to one counter guest: every
/// one is handled exactly once (the count is 300, 300 distinct answers),
/// though the sends reserve numbers at the guest's owner from three nodes
/// and their commits land in any order.
#[test]
fn concurrent_sends_through_every_node_to_one_guest_are_each_handled_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wasm = guest_wasm("counter");
    let Some(c) = Cluster::start("concurrent") else {
        return;
    };
    c.n(0).ok(["install", &wasm, "--name", "counter"]);
    c.n(0).ok(["mkguest", "bot", "--component", "counter"]);
    const SENDS: usize = 300;
    const THREADS: usize = 12;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let c = &c;
            s.spawn(move || {
                for i in (t..SENDS).step_by(THREADS) {
                    c.n(i % 3).ok(["send", "bot", "increment"]);
                }
            });
        }
    });
    // Every send was acknowledged; a sentinel after them all, then count.
    c.n(2).ok(["send", "bot", "get"]);
    let deadline = Instant::now() + Duration::from_secs(240);
    let inbox = loop {
        let inbox = c.n(0).inbox(&[]);
        let answers = texts(&inbox)
            .into_iter()
            .filter(|t| t.starts_with("count = "))
            .count();
        if answers > SENDS {
            break inbox;
        }
        assert!(
            Instant::now() < deadline,
            "{answers} of {} answers after 240 s",
            SENDS + 1
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    numbers_unique(&inbox);
    let answers: Vec<String> = texts(&inbox)
        .into_iter()
        .filter(|t| t.starts_with("count = "))
        .collect();
    let distinct: BTreeSet<&String> = answers.iter().collect();
    assert_eq!(answers.len(), SENDS + 1, "{answers:?}");
    // 300 increments answered 1..=300 once each, and the sentinel 300.
    assert_eq!(
        distinct.len(),
        SENDS,
        "an increment was answered twice: {answers:?}"
    );
    assert_eq!(answers.last().map(String::as_str), Some("count = 300"));
    assert_eq!(c.n(1).ok(["cat", "--as", "bot", "count"]).trim(), "300");
    let handled: u64 = (0..3)
        .map(|i| {
            c.n(i)
                .json(["guests"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|g| g["name"] == "bot")
                .map(|g| g["handled"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    assert_eq!(handled, SENDS as u64 + 1, "handler runs across the nodes");
}

/// A name rebound through one node is what another node sends to right
/// after. That node's transactions start from the last version it saw
/// (here allowed to be up to 30 s old, so it always is older than the
/// rebinding): the send resolves the name there, resolves it again in its
/// transaction, and the commit refuses what missed the rebinding. No message
/// reaches the agent the name used to designate.
#[test]
fn a_send_right_after_a_rebinding_on_another_node_reaches_the_new_agent() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start_with("rebind", "?commit-snapshot-age-ms=30000") else {
        return;
    };
    for g in ["a", "b"] {
        c.n(0).ok(["mkguest", g]);
    }
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let to = if round % 2 == 0 { "a" } else { "b" };
        if round > 0 {
            c.n(0).ok(["remove", "x"]);
        }
        c.n(0).ok(["copy", to, "x"]);
        c.n(1).ok(["send", "x", &format!("round {round} for {to}")]);
    }
    for (agent, parity) in [("a", 0), ("b", 1)] {
        let got: BTreeSet<String> = texts(&c.n(2).inbox(&["--as", agent]))
            .into_iter()
            .filter(|t| t.starts_with("round "))
            .collect();
        let want: BTreeSet<String> = (0..ROUNDS)
            .filter(|r| r % 2 == parity)
            .map(|r| format!("round {r} for {agent}"))
            .collect();
        assert_eq!(got, want, "mail of {agent}");
    }
}

/// The wake-ups a node received for messages committed on other nodes.
fn wakeups_received(c: &Cluster, i: usize) -> u64 {
    let v = c.n(i).json(["cluster", "status"]);
    v["wakeups"]["delivered_received"]
        .as_u64()
        .unwrap_or_else(|| panic!("cluster status without wake-up counts: {v}"))
}

/// The calls a node made to other members (`cluster status`: reservations
/// at a remote owner, wake calls).
fn link_calls(c: &Cluster, i: usize) -> (u64, u64) {
    let [reserve, wake] = capstan_tests::link_call_counts(c.n(i), ["reserve", "wake"]);
    (reserve, wake)
}

/// Scale-out: a committed message wakes the inbox's owner and the members
/// following it, not every member (that made each node handle the whole
/// cluster's mail). A follower on a node that is neither the sender nor
/// the owner sees every message once; a bystander node hears of none.
#[test]
fn a_message_wakes_its_inbox_owner_and_followers_not_every_member() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start("wakeups") else {
        return;
    };
    c.n(0).ok(["mkguest", "alice"]);
    c.n(0).ok(["send", "alice", "hello"]);
    let index = |p: Value| -> usize {
        let n = p["node"].as_str().unwrap_or_else(|| panic!("{p}"));
        n[1..].parse::<usize>().unwrap() - 1
    };
    let alice_owner = index(c.placement(0, "alice"));
    let host_owner = index(c.placement(0, "HOST"));
    // The follower: not alice's owner; the bystander: none of the three.
    let follower = if host_owner != alice_owner {
        host_owner
    } else {
        (alice_owner + 1) % 3
    };
    let bystander = (0..3)
        .find(|i| *i != alice_owner && *i != host_owner && *i != follower)
        .expect("a node that owns and follows nothing here");
    eprintln!(
        "alice on n{}, HOST on n{}, follower n{}, bystander n{}",
        alice_owner + 1,
        host_owner + 1,
        follower + 1,
        bystander + 1
    );

    let mut child = c
        .n(follower)
        .spawn(["--json", "inbox", "--follow", "--as", "alice"]);
    let lines = capstan_tests::LineReader::new(child.stdout.take().unwrap());
    let first = lines
        .next(Duration::from_secs(20))
        .expect("the first message");
    assert!(first.contains("hello"), "{first}");
    // Let the follower's node tell alice's owner (in the background).
    std::thread::sleep(Duration::from_millis(500));

    let before = wakeups_received(&c, bystander);
    let (follower_reserves, _) = link_calls(&c, follower);
    let bystander_calls = link_calls(&c, bystander);
    let sends = 20;
    for i in 0..sends {
        // From alice's owner and from the follower's node, in turn.
        let via = if i % 2 == 0 { alice_owner } else { follower };
        c.n(via).ok(["send", "alice", &format!("m{i}")]);
    }
    let mut seen = Vec::new();
    while seen.len() < sends {
        let Some(line) = lines.next(Duration::from_secs(20)) else {
            let inbox = c.n(follower).inbox(&["--as", "alice"]);
            let all: Vec<String> = inbox
                .iter()
                .map(|m| format!("{}={}", m["number"], m["text"]))
                .collect();
            panic!("the follower saw only {seen:?}; the inbox holds {all:?}");
        };
        let v: Value = serde_json::from_str(&line).unwrap();
        seen.push(v["text"].as_str().unwrap().to_string());
    }
    let mut want: Vec<String> = (0..sends).map(|i| format!("m{i}")).collect();
    seen.sort();
    want.sort();
    assert_eq!(seen, want, "each message once");
    assert!(
        lines.next(Duration::from_millis(500)).is_none(),
        "nothing twice"
    );
    // (wake-ups still in flight would have landed by now)
    std::thread::sleep(Duration::from_millis(300));
    let after = wakeups_received(&c, bystander);
    assert_eq!(
        after - before,
        0,
        "the bystander n{} was woken for messages it neither owns nor follows",
        bystander + 1
    );
    // Each of the follower's sends (one at a time: nothing to coalesce)
    // reserved alice's number at her owner, and the host's too when the
    // host's inbox lives on another node (the relay fills no number in:
    // off by default); the bystander called nobody.
    let reserves = link_calls(&c, follower).0 - follower_reserves;
    let per_send = if host_owner == follower { 1 } else { 2 };
    assert_eq!(
        reserves,
        per_send * sends as u64 / 2,
        "remote reservations made by the follower's node"
    );
    assert_eq!(
        link_calls(&c, bystander),
        bystander_calls,
        "the bystander n{} called other members",
        bystander + 1
    );
    capstan_tests::kill_child(child);
}

/// `send --trace` from a node that owns neither inbox: its hops show on
/// the nodes that did them (the reservations at both inboxes' owners: a
/// lone send on an idle node relays nothing, so the relay fills nothing in;
/// the sender's commit; the wake-up at the recipient's owner once someone
/// follows the inbox there: before, the owner said it needs none and is
/// not woken), any member gives the same spans back (`cluster trace ID`,
/// also as a Chrome trace), and a bad or unknown id is an error.
#[test]
fn a_traced_send_shows_its_hops_on_the_nodes_that_did_them() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start_filling("trace") else {
        return;
    };
    c.n(0).ok(["mkguest", "alice"]);
    c.n(0).ok(["send", "alice", "hello"]);
    let owner = |name: &str| c.placement(0, name)["node"].as_str().unwrap().to_string();
    let (host_owner, alice_owner) = (owner("HOST"), owner("alice"));
    // a sender that owns neither the host's inbox nor alice's
    let via = (0..3)
        .find(|i| format!("n{}", i + 1) != host_owner && format!("n{}", i + 1) != alice_owner)
        .expect("three nodes, at most two owners");
    let sender = format!("n{}", via + 1);
    // (a first send: the sender's node learns who owns the host's inbox)
    c.n(via).ok(["send", "alice", "first"]);
    let traced = |text: &str| {
        let v = c.n(via).json(["send", "alice", text, "--trace"]);
        let woken = v["spans"].as_array().is_some_and(|l| {
            l.iter()
                .any(|s| s["node"] == alice_owner.as_str() && s["name"] == "wake-up served")
        });
        (v, woken)
    };
    // Nobody follows alice on her owner and no component runs her there:
    // her owner said so with her numbers, and is not woken.
    let (v, woken) = traced("unseen");
    assert!(!woken, "alice's owner was woken for nothing: {v:#}");
    // A follower on her owner: the owner's next numbers say it needs the
    // wake-ups again.
    let owner_index = alice_owner[1..].parse::<usize>().unwrap() - 1;
    let mut child = c
        .n(owner_index)
        .spawn(["--json", "inbox", "--follow", "--as", "alice"]);
    let lines = capstan_tests::LineReader::new(child.stdout.take().unwrap());
    lines
        .next(Duration::from_secs(20))
        .expect("the follower's first message");
    let (v, woken) = traced("traced");
    assert!(
        woken,
        "alice's owner has a follower but was not woken: {v:#}"
    );
    let id = v["trace"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    assert!(v["number"].as_u64().is_some(), "{v}");
    let spans = v["spans"].as_array().unwrap().clone();
    let on = |node: &str, name: &str| {
        spans
            .iter()
            .any(|s| s["node"] == node && s["name"].as_str().unwrap().starts_with(name))
    };
    for (node, name) in [
        (sender.as_str(), "send"),
        (sender.as_str(), "inbox number"),
        (sender.as_str(), "reservation call to the inbox's owner"),
        (sender.as_str(), "commit"),
        (alice_owner.as_str(), "reservation at the inbox's owner"),
        (host_owner.as_str(), "reservation at the inbox's owner"),
        (alice_owner.as_str(), "wake-up served"),
    ] {
        assert!(on(node, name), "no {name:?} span on {node}: {v:#}");
    }
    assert!(
        spans.iter().all(|s| s["start_us"].as_u64().unwrap() > 0),
        "{v:#}"
    );
    // Another member gathers the same spans, and writes them for Perfetto.
    let other = (via + 1) % 3;
    let chrome = c.n(other).home().join("trace.json");
    let again = c.n(other).json([
        "cluster",
        "trace",
        id.as_str(),
        "--chrome",
        chrome.to_str().unwrap(),
    ]);
    let names = |l: &[Value]| -> BTreeSet<String> {
        l.iter()
            .map(|s| format!("{} {}", s["node"], s["name"]))
            .collect()
    };
    assert!(
        names(again["spans"].as_array().unwrap()).is_superset(&names(&spans)),
        "{again:#}"
    );
    let file: Value = serde_json::from_slice(&std::fs::read(&chrome).unwrap()).unwrap();
    let events = file["traceEvents"].as_array().unwrap();
    let pids: BTreeSet<u64> = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.len() >= 2, "one process per node: {file:#}");
    capstan_tests::kill_child(child);
    // Untraced sends record nothing; bad and unknown ids are errors.
    let (code, err) = c.n(0).fail(["cluster", "trace", "not-hex"]);
    assert_eq!(code, 1);
    assert!(err.contains("bad trace id"), "{err}");
    let (code, err) = c.n(0).fail(["cluster", "trace", "123abc"]);
    assert_eq!(code, 1);
    assert!(err.contains("no node recorded trace"), "{err}");
}
