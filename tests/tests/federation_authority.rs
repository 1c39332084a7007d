//! Who mail across clusters is from, and what a refusal means (issue 15's
//! review): a handle made by
//! invite/accept carries the mail of the cluster it was given to, as from
//! the agent it was given to, and nothing else. Passed on to a third
//! cluster, cancelled by the agent that gave it, or offered by an accept
//! that was given up, it is refused for good (the sender gets a bounce);
//! a used invitation passed back in a message is refused like a call
//! through it; and an item refused for good is never delivered after. Real
//! nodes over QUIC on loopback; a rogue cluster where a hostile peer, or
//! full control of a sender's tries, is needed.

use std::time::{Duration, Instant};

use capstan_proto::{Locator, RequestId};
use capstan_tests::fed::{bounces, find, has, listening, pair, wait_inbox};
use capstan_tests::rogue::RoguePeer;
use capstan_tests::texts;

/// A rogue cluster that accepted an invitation of `a`'s host: the rogue,
/// and the handle `a` gave it (mail through it is the rogue's).
fn rogue_invited_by(a: &capstan_tests::Node) -> (RoguePeer, Locator) {
    let rogue = RoguePeer::start();
    let invite: Locator = a.json(["invite", "rogue"])["invitation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let swiss = rogue
        .accept_invitation(&invite, RequestId::random().0)
        .expect("the rogue accepted its invitation");
    (rogue, Locator { swiss, ..invite })
}

/// B passes the handle A gave it (alice, for bob) to D. D's mail through
/// it is not taken as bob's: it bounces to D, and A's alice never sees
/// it, while bob's own mail still arrives.
#[test]
fn a_handle_passed_on_to_a_third_cluster_carries_no_mail_as_its_holder() {
    let (a, b, d) = (listening(), listening(), listening());
    pair(&a, "bob", &b, "alice");
    pair(&b, "dave", &d, "bob");
    b.ok(["send", "dave", "meet @alice"]);
    let inbox = wait_inbox(&d, "bob's reference", has("meet @alice"));
    let n = find(&inbox, "meet @alice")["number"]
        .as_u64()
        .unwrap()
        .to_string();
    d.ok(["adopt", &n, "alice", "--name", "alice-via-bob"]);
    d.ok(["send", "alice-via-bob", "I am bob"]);
    let inbox = wait_inbox(&d, "a bounce", |i| !bounces(i).is_empty());
    let bounced = bounces(&inbox);
    assert!(bounced[0].contains("given to"), "{bounced:?}");
    b.ok(["send", "alice", "the real bob"]);
    let inbox = wait_inbox(&a, "bob's own mail", has("the real bob"));
    assert!(
        !texts(&inbox).iter().any(|t| t == "I am bob"),
        "D's mail landed as bob's: {inbox:?}"
    );
}

/// Alice cancels bob: bob's mail through the handle she gave bounces, and
/// nothing more lands in her inbox.
#[test]
fn mail_from_a_cancelled_peer_bounces() {
    let (a, b) = (listening(), listening());
    pair(&a, "bob", &b, "alice");
    b.ok(["send", "alice", "before"]);
    wait_inbox(&a, "bob's mail", has("before"));
    a.ok(["cancel", "bob"]);
    b.ok(["send", "alice", "after"]);
    let inbox = wait_inbox(&b, "a bounce", |i| !bounces(i).is_empty());
    assert!(bounces(&inbox)[0].contains("revoked"), "{inbox:?}");
    let inbox = a.inbox(&[]);
    assert!(
        !texts(&inbox).iter().any(|t| t == "after"),
        "a cancelled peer's mail landed: {inbox:?}"
    );
}

/// An invitation that was accepted designates the agent that redeemed it;
/// a call through it is refused, and so is the same locator carried in a
/// message (a peer that saw the invitation string would otherwise reach
/// alice's handle for bob through it).
#[test]
fn a_used_invitation_carried_in_a_message_is_refused() {
    let (a, b) = (listening(), listening());
    let inv = a.json(["invite", "bob"])["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    b.ok(["accept", &inv, "alice"]);
    let used: Locator = inv.parse().unwrap();

    let (rogue, handle) = rogue_invited_by(&a);
    let err = rogue
        .deliver(&handle, "look at ", &[used])
        .expect_err("a used invitation was taken in a message");
    assert!(err.contains("revoked"), "{err}");
    // (the handle works: a message with a reference A gives is taken)
    a.ok(["store", "--text", "x", "--name", "v"]);
    let v: Locator = a.json(["locate", "v"])["locator"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    rogue
        .deliver(&handle, "see ", &[v])
        .expect("a message with a valid reference");
    let inbox = wait_inbox(&a, "the rogue's valid message", |i| {
        i.iter().any(|m| m["text"] == "see @r0")
    });
    assert!(
        !inbox.iter().any(|m| m["text"] == "look at @r0"),
        "{inbox:?}"
    );
}

/// An accept whose answer never came holds its name (`accepting`); mail
/// through the handle it offered waits ("not now"). Removing the name
/// gives the accept up, as the accept's error says: the mail is then
/// refused for good, so the inviter bounces it instead of holding up all
/// of its mail to this cluster, and the name is free.
#[test]
fn removing_a_name_held_for_an_accept_gives_the_accept_up() {
    let mut b = listening();
    let rogue = RoguePeer::start();
    rogue.hold_accepts(true);
    let child = b.spawn(["accept", &rogue.locator(), "alice"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rogue.accepts().is_empty() {
        assert!(Instant::now() < deadline, "the inviter was never asked");
        std::thread::sleep(Duration::from_millis(20));
    }
    let offered = rogue.accepts()[0].handle.clone();
    let err = rogue
        .deliver(&offered, "early", &[])
        .expect_err("mail through a handle of an unfinished accept");
    assert!(err.contains("still accepting"), "{err}");

    // The answer is lost (the node dies); its user gives the accept up.
    b.kill9();
    capstan_tests::kill_child(child);
    b.start();
    assert_eq!(b.json(["show", "alice"])["type"], "accepting");
    b.ok(["remove", "alice"]);
    let err = rogue
        .deliver(&offered, "late", &[])
        .expect_err("mail through the handle of an accept given up");
    assert!(err.contains("revoked"), "{err}");
    assert!(b.inbox(&[]).is_empty(), "{:?}", b.inbox(&[]));
    b.ok(["mkdir", "alice"]);
}

/// An item refused for good (here: the inbox was full) is bounced by its
/// sender; a try of the same item that lands later must not deliver it
/// too. Two nodes of the sending cluster can try one item at once, and an
/// earlier try can still be committing when a later one is refused: the
/// refusal is recorded under the item's id, so the same item is refused
/// from then on, even with room in the inbox, and `applied` says it was
/// not. (A second try delivered it before.)
#[test]
fn an_item_refused_for_good_is_never_delivered_after() {
    let a = listening();
    let (rogue, handle) = rogue_invited_by(&a);
    // (a quota of 0 means the default: one message first, then a quota
    // of what the inbox holds)
    a.ok(["send", "SELF", "filler"]);
    let held = a.json(["quota", "SELF"])["messages"].as_u64().unwrap();
    assert!(held >= 1, "the inbox holds {held} messages");
    a.ok(["quota", "SELF", "--messages", &held.to_string()]);
    let item = RequestId::random().0;
    let err = rogue
        .deliver_item(&handle, item, "first try", &[])
        .expect_err("a full inbox took the item");
    assert!(err.contains("full"), "{err}");

    a.ok(["quota", "SELF", "--messages", &(held + 10).to_string()]);
    let err = rogue
        .deliver_item(&handle, item, "second try", &[])
        .expect_err("an item refused for good was delivered by a later try");
    assert!(err.contains("refused for good before"), "{err}");
    // (another item is taken: the inbox has room)
    rogue
        .deliver(&handle, "another item", &[])
        .expect("a new item");
    let inbox = wait_inbox(&a, "the new item", has("another item"));
    assert!(
        !texts(&inbox).iter().any(|t| t.ends_with("try")),
        "{inbox:?}"
    );
}
