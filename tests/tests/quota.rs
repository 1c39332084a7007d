//! Inbox quotas (issue 18, bounded tables): a host sets how many messages
//! and bytes an agent's inbox holds; a send to a full inbox is refused with
//! nothing written, on one node and across cluster nodes; federated mail to
//! a full inbox bounces to its sender; dismissals give room back.

use std::time::{Duration, Instant};

use capstan_tests::{Node, texts};
use serde_json::Value;

fn inbox_of(node: &Node, agent: &str) -> Vec<Value> {
    let v = node.json(["inbox", "--as", agent]);
    v.as_array().cloned().unwrap_or_default()
}

fn full_refusal(node: &Node, args: &[&str]) -> String {
    let (code, err) = node.fail(args);
    assert_ne!(code, 0, "{err}");
    err
}

#[test]
fn a_full_inbox_refuses_senders_and_dismissals_give_room_back() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);

    // The defaults, documented.
    let q = node.json(["quota", "alice"]);
    assert_eq!(q["max_messages"], 100_000, "{q}");
    assert_eq!(q["max_bytes"], 256u64 << 20, "{q}");
    assert_eq!(q["default"], true, "{q}");
    assert_eq!(q["messages"], 0, "{q}");

    let q = node.json(["quota", "alice", "--messages", "3"]);
    assert_eq!(q["max_messages"], 3, "{q}");
    assert_eq!(q["default"], false, "{q}");
    for i in 0..3 {
        node.ok(["send", "alice", &format!("m{i}")]);
    }
    let before = node.inbox(&[]).len();
    let err = full_refusal(&node, &["send", "alice", "one too many"]);
    assert!(
        err.contains("inbox of alice is full (3 messages /"),
        "{err}"
    );
    assert!(err.contains("capstan quota alice"), "{err}");
    // Nothing written: not in alice's inbox, no copy in the sender's.
    assert_eq!(texts(&inbox_of(&node, "alice")), ["m0", "m1", "m2"]);
    assert_eq!(node.inbox(&[]).len(), before);
    // A request is refused the same way.
    let err = full_refusal(&node, &["request", "alice", "need it"]);
    assert!(err.contains("inbox of alice is full"), "{err}");

    // --json: the same message, exit non-zero.
    let (code, err) = node.fail_json(["send", "alice", "again"]);
    assert_ne!(code, 0);
    assert!(err.contains("is full"), "{err}");

    // A dismissal gives room back.
    let first = inbox_of(&node, "alice")[0]["number"].as_u64().unwrap();
    node.ok(["dismiss", &first.to_string(), "--as", "alice"]);
    node.ok(["send", "alice", "m3"]);
    assert_eq!(texts(&inbox_of(&node, "alice")), ["m1", "m2", "m3"]);
    assert!(node.fail(["send", "alice", "m4"]).1.contains("is full"));

    // A byte quota: one message of 600 bytes fits in 1000, a second does not.
    node.ok(["mkguest", "bob"]);
    node.ok(["quota", "bob", "--bytes", "1000"]);
    let big = "x".repeat(600);
    node.ok(["send", "bob", &big]);
    let err = full_refusal(&node, &["send", "bob", &big]);
    assert!(err.contains("inbox of bob is full (1 messages /"), "{err}");
    node.ok(["send", "bob", "small"]);

    // Raising the quota lets mail in again; --default goes back.
    node.ok(["quota", "alice", "--messages", "10"]);
    node.ok(["send", "alice", "m4"]);
    let q = node.json(["quota", "alice", "--default"]);
    assert_eq!(q["default"], true, "{q}");
    assert_eq!(q["messages"], 4, "{q}");
    let shown = node.ok(["quota", "alice"]);
    assert!(
        shown.contains("4 of 100000 messages") && shown.contains("default"),
        "{shown}"
    );

    // Only a host sets quotas; a guest is told so.
    let err = full_refusal(&node, &["quota", "alice", "--as", "alice"]);
    assert!(err.contains("only a host"), "{err}");
}

#[test]
fn the_quota_holds_after_a_restart() {
    let mut node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["quota", "alice", "--messages", "2"]);
    node.ok(["send", "alice", "a"]);
    node.ok(["send", "alice", "b"]);
    node.kill9();
    node.start();
    let err = full_refusal(&node, &["send", "alice", "c"]);
    assert!(err.contains("inbox of alice is full (2 messages"), "{err}");
}

#[test]
fn a_full_inbox_refuses_senders_on_every_cluster_node() {
    let Some(spec) = capstan_tests::etcd_spec("quota") else {
        return;
    };
    let nodes = capstan_tests::start_cluster(&spec, 2, "5000");
    nodes[0].ok(["mkguest", "alice"]);
    nodes[0].ok(["quota", "alice", "--messages", "4"]);
    // Sends from both nodes: one of them reserves at the other, the owner.
    for i in 0..4 {
        nodes[i % 2].ok(["send", "alice", &format!("m{i}")]);
    }
    for n in &nodes {
        let err = full_refusal(n, &["send", "alice", "over"]);
        assert!(err.contains("inbox of alice is full (4 messages"), "{err}");
    }
    assert_eq!(inbox_of(&nodes[1], "alice").len(), 4);
    // A dismissal on either node gives room back (the owner recounts).
    let first = inbox_of(&nodes[1], "alice")[0]["number"].as_u64().unwrap();
    nodes[1].ok(["dismiss", &first.to_string(), "--as", "alice"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = nodes[0].run(["send", "alice", "room again"]);
        if r.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.stdout_str());
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(full_refusal(&nodes[1], &["send", "alice", "over"]).contains("is full"));
}

/// Many sends at once through a node that does not own the inbox: the
/// node asks the owner to admit them in batches, one call each, and still
/// exactly as many as the quota leaves room for get in; the others are
/// refused as a full inbox.
#[test]
fn concurrent_sends_through_another_node_fill_the_quota_exactly() {
    let Some(spec) = capstan_tests::etcd_spec("quota-batch") else {
        return;
    };
    let nodes = capstan_tests::start_cluster(&spec, 2, "5000");
    nodes[0].ok(["mkguest", "bob"]);
    nodes[0].ok(["quota", "bob", "--messages", "12"]);
    // bob's inbox is owned by the first node from its first message on.
    nodes[0].ok(["send", "bob", "first"]);
    let senders: Vec<_> = (0..30)
        .map(|i| nodes[1].spawn(["send", "bob", &format!("m{i}")]))
        .collect();
    let (mut sent, mut full) = (0, 0);
    for child in senders {
        let out = child.wait_with_output().expect("a send ran");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            sent += 1;
        } else {
            assert!(err.contains("inbox of bob is full"), "{err}");
            full += 1;
        }
    }
    assert_eq!((sent, full), (11, 19), "sends admitted, and refused");
    assert_eq!(inbox_of(&nodes[0], "bob").len(), 12);
}

#[test]
fn federated_mail_to_a_full_inbox_bounces() {
    let mut a = Node::new();
    a.start_with(&["--listen", "127.0.0.1:0"]);
    let mut b = Node::new();
    b.start_with(&["--listen", "127.0.0.1:0"]);
    let v = a.json(["invite", "bob"]);
    let inv = v["invitation"].as_str().expect("invite --json").to_string();
    b.ok(["accept", &inv, "alice"]);
    a.ok(["quota", "SELF", "--messages", "1"]);
    // a's own inbox: holds the copies of what a sent (none yet) and mail.
    b.ok(["send", "alice", "first"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !texts(&a.inbox(&[])).contains(&"first".to_string()) {
        assert!(Instant::now() < deadline, "first never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.ok(["send", "alice", "second"]);
    let bounce = loop {
        let inbox = b.inbox(&[]);
        if let Some(m) = inbox.iter().find(|m| {
            m["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("[undeliverable]"))
        }) {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "no bounce: {inbox:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = bounce["text"].as_str().unwrap();
    assert!(text.contains("is full"), "{text}");
    assert!(!texts(&a.inbox(&[])).contains(&"second".to_string()));
}
