//! Helpers of the federation tests: listening nodes, pairing two agents
//! of different clusters, and waiting for mail.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Node;

/// A node started with a QUIC port on loopback (its own cluster).
pub fn listening() -> Node {
    let mut n = Node::new();
    n.start_with(&["--listen", "127.0.0.1:0"]);
    n
}

/// `inviter` invites `invitee` as `as_invitee`; `invitee` names it `as_inviter`.
pub fn pair(inviter: &Node, as_invitee: &str, invitee: &Node, as_inviter: &str) {
    let v = inviter.json(["invite", as_invitee]);
    let inv = v["invitation"].as_str().expect("invite --json");
    assert!(inv.starts_with("capstan://"), "{v}");
    let shown = inviter.json(["show", as_invitee]);
    assert_eq!(shown["type"], "invitation", "before accept: {shown}");
    invitee.ok(["accept", inv, as_inviter]);
    assert_eq!(invitee.json(["show", as_inviter])["type"], "remote");
    assert_eq!(inviter.json(["show", as_invitee])["type"], "remote");
}

/// Polls `node`'s inbox until `pred` holds for it; the inbox.
pub fn wait_inbox(node: &Node, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    wait_inbox_for(node, what, Duration::from_secs(30), pred)
}

/// [`wait_inbox`] with a deadline of `within`.
pub fn wait_inbox_for(
    node: &Node,
    what: &str,
    within: Duration,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let inbox = node.inbox(&[]);
        if pred(&inbox) {
            return inbox;
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} for {what}; inbox: {inbox:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The message of `inbox` whose text or description is `text`.
pub fn find<'a>(inbox: &'a [Value], text: &str) -> &'a Value {
    inbox
        .iter()
        .find(|m| m["text"] == text || m["description"] == text)
        .unwrap_or_else(|| panic!("no message {text:?} in {inbox:?}"))
}

/// Whether an inbox has a message whose text or description is `text`.
pub fn has(text: &'static str) -> impl Fn(&[Value]) -> bool {
    move |inbox| {
        inbox
            .iter()
            .any(|m| m["text"] == text || m["description"] == text)
    }
}

/// The bounces of an inbox (texts starting `[undeliverable]`).
pub fn bounces(inbox: &[Value]) -> Vec<String> {
    inbox
        .iter()
        .filter_map(|m| m["text"].as_str())
        .filter(|t| t.starts_with("[undeliverable]"))
        .map(str::to_owned)
        .collect()
}
