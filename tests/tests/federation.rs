//! Federated mail (issue 3): invitations, and send / request / resolve /
//! reject / reply between agents of different nodes, each with its own home
//! and cluster, over QUIC on loopback. Delivery is asynchronous (an outbox
//! committed with the send), so the receiving side is polled.

use std::time::{Duration, Instant};

use capstan_tests::fed::{bounces, find, has, listening, pair, wait_inbox, wait_inbox_for};
use capstan_tests::{Node, texts};
use serde_json::Value;

#[test]
fn invited_agents_mail_each_other_with_references() {
    let a = listening();
    let b = listening();
    pair(&a, "bob", &b, "alice");

    // A sends a reference; B adopts it and reads it from A over QUIC.
    a.ok(["store", "--text", "report", "--name", "report"]);
    a.ok(["send", "bob", "see @report"]);
    let inbox = wait_inbox(&b, "alice's message", has("see @report"));
    let m = find(&inbox, "see @report");
    assert_eq!(m["from"], "alice");
    assert_eq!(m["names"], serde_json::json!(["report"]));
    let n = m["number"].as_u64().unwrap().to_string();
    b.ok(["adopt", &n, "report", "--name", "r"]);
    assert_eq!(b.ok(["cat", "r"]), "report");
    assert_eq!(b.json(["show", "r"])["type"], "remote");

    // B replies: A sees it from bob, in the same thread as its message.
    let id = m["message_id"].as_str().unwrap().to_string();
    b.ok(["reply", &n, "thanks"]);
    let inbox = wait_inbox(&a, "bob's reply", has("thanks"));
    let reply = find(&inbox, "thanks");
    assert_eq!(reply["from"], "bob");
    assert_eq!(reply["reply_to"], id.as_str());
    assert_eq!(
        texts(&a.inbox(&["--thread", &id])),
        ["see @report", "thanks"]
    );
    assert_eq!(
        texts(&b.inbox(&["--thread", &id])),
        ["see @report", "thanks"]
    );

    // A asks bob; B answers with one of its values; A reads it from B.
    a.ok(["request", "bob", "need a doc", "--name", "doc"]);
    let inbox = wait_inbox(&b, "alice's request", has("need a doc"));
    let req = find(&inbox, "need a doc");
    assert_eq!(req["type"], "request");
    assert_eq!(req["from"], "alice");
    assert_eq!(req["state"], "pending");
    b.ok(["store", "--text", "the doc", "--name", "greeting"]);
    let n = req["number"].as_u64().unwrap().to_string();
    b.ok(["resolve", &n, "greeting"]);
    wait_inbox(&a, "the answer", |i| {
        i.iter()
            .any(|m| m["description"] == "need a doc" && m["state"] == "resolved")
    });
    assert_eq!(a.ok(["cat", "doc"]), "the doc");
    let shown = a.json(["show", "doc"]);
    assert!(
        shown["detail"].as_str().unwrap().contains("on cluster"),
        "doc is B's value: {shown}"
    );
    // Answering twice is refused on B, and changes nothing on A.
    let (code, err) = b.fail(["resolve", &n, "greeting"]);
    assert_eq!(code, 1);
    assert!(err.contains("already settled"), "{err}");

    // A rejection travels too; A's --wait sees it.
    let waiter = a.spawn(["request", "bob", "another", "--wait"]);
    let inbox = wait_inbox(&b, "the second request", has("another"));
    let n = find(&inbox, "another")["number"]
        .as_u64()
        .unwrap()
        .to_string();
    b.ok(["reject", &n, "not today"]);
    let r = capstan_tests::wait_child(waiter, Duration::from_secs(30), "request --wait");
    assert!(!r.success(), "a rejected request --wait exits non-zero");
    assert!(r.stderr.contains("not today"), "{}", r.stderr);
}

#[test]
fn mail_waits_for_a_dead_peer_and_arrives_once() {
    let mut a = listening();
    let mut b = listening();
    pair(&a, "bob", &b, "alice");

    b.kill9();
    for i in 0..5 {
        a.ok(["send", "bob", &format!("message {i}")]);
    }
    // The sender dies too before anything could be delivered.
    a.kill9();
    a.start();
    b.start();
    wait_inbox(&b, "five messages", |i| i.len() >= 5);
    // A sentinel: mail to one peer is delivered in order, so once it is in,
    // a repeated delivery of the five would be too.
    a.ok(["send", "bob", "sentinel"]);
    let inbox = wait_inbox(&b, "the sentinel", has("sentinel"));
    let mut want: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
    want.push("sentinel".into());
    assert_eq!(texts(&inbox), want, "each once, in the order sent");
    assert!(inbox.iter().all(|m| m["from"] == "alice"));
}

#[test]
fn a_capability_passed_a_to_b_to_c_is_invoked_by_c() {
    let a = listening();
    let b = listening();
    let c = listening();
    pair(&a, "bob", &b, "alice");
    pair(&b, "carol", &c, "bob");

    a.ok(["store", "--text", "from A", "--name", "report"]);
    a.ok(["send", "bob", "@report"]);
    let inbox = wait_inbox(&b, "alice's reference", has("@report"));
    let n = find(&inbox, "@report")["number"]
        .as_u64()
        .unwrap()
        .to_string();
    b.ok(["adopt", &n, "report", "--name", "r"]);
    b.ok(["send", "carol", "passing on @r:from-alice"]);
    let inbox = wait_inbox(&c, "bob's reference", has("passing on @from-alice"));
    let m = find(&inbox, "passing on @from-alice");
    assert_eq!(m["from"], "bob");
    let n = m["number"].as_u64().unwrap().to_string();
    c.ok(["adopt", &n, "from-alice"]);
    assert_eq!(c.ok(["cat", "from-alice"]), "from A");

    // C talks to A directly: it keeps working with B gone.
    drop(b);
    assert_eq!(c.ok(["cat", "from-alice"]), "from A");
    // And A's cancel reaches it.
    a.ok(["cancel", "report"]);
    let (code, err) = c.fail(["cat", "from-alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("revoked"), "{err}");
}

#[test]
fn invitations_are_one_use_and_refused_mail_bounces() {
    let a = listening();
    let b = listening();
    let c = listening();
    let v = a.json(["invite", "bob"]);
    let inv = v["invitation"].as_str().unwrap().to_string();
    b.ok(["accept", &inv, "alice"]);
    // A second node cannot use the same invitation, and is told why.
    let (code, err) = c.fail(["accept", &inv, "alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("already used"), "{err}");
    assert!(!err.contains("revoked"), "{err}");
    assert!(
        !c.names(&[]).contains("alice"),
        "a refused accept named nothing"
    );
    // A name that is taken is refused before anything is sent.
    let inv2 = a.json(["invite", "carol"])["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok(["store", "--text", "x", "--name", "alice"]);
    let (code, err) = c.fail(["accept", &inv2, "alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(a.json(["show", "carol"])["type"], "invitation");
    // A withdrawn invitation cannot be accepted.
    a.ok(["cancel", "carol"]);
    let (code, err) = c.fail(["accept", &inv2, "anna"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown or revoked"), "{err}");
    // A node that does not listen cannot invite.
    let lone = Node::started();
    let (code, err) = lone.fail(["invite", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("--listen"), "{err}");

    // A revokes the handle it gave bob: bob's mail bounces back to bob.
    a.ok(["cancel", "SELF"]);
    b.ok(["send", "alice", "hello?"]);
    let inbox = wait_inbox(&b, "a bounce", |i| {
        i.iter().any(|m| {
            m["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("[undeliverable]"))
        })
    });
    let bounce = inbox
        .iter()
        .find(|m| {
            m["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("[undeliverable]")
        })
        .unwrap();
    assert!(
        bounce["text"].as_str().unwrap().contains("revoked"),
        "{bounce}"
    );
    assert!(
        a.inbox(&[]).is_empty(),
        "nothing reached A: {:?}",
        a.inbox(&[])
    );
    // A request through the revoked handle bounces too, and its promise is
    // rejected with the reason: the requester waiting on it is answered
    // (it waited forever before).
    let r = b
        .run_for(
            ["request", "alice", "need a doc", "--wait"],
            Duration::from_secs(60),
        )
        .expect("a bounced request's wait ends");
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("undeliverable") && r.stderr.contains("revoked"),
        "{r}"
    );
}

fn connections(node: &Node) -> u64 {
    node.json(["status"])["connections"]
        .as_u64()
        .expect("status --json has connections")
}

#[test]
fn one_connection_per_pair_of_nodes_even_when_both_dial() {
    let mut a = listening();
    let mut b = listening();
    pair(&a, "bob", &b, "alice");
    a.ok(["send", "bob", "one"]);
    wait_inbox(&b, "one", has("one"));
    b.ok(["send", "alice", "two"]);
    wait_inbox(&a, "two", has("two"));
    assert_eq!(connections(&a), 1, "A reuses the connection B dialled");
    assert_eq!(connections(&b), 1);

    // Both restart, then send at the same moment: each may dial the other.
    a.stop();
    b.stop();
    a.start();
    b.start();
    assert_eq!(connections(&a), 0);
    let ca = a.spawn(["send", "bob", "crossed a"]);
    let cb = b.spawn(["send", "alice", "crossed b"]);
    for (c, what) in [(ca, "send from A"), (cb, "send from B")] {
        let r = capstan_tests::wait_child(c, Duration::from_secs(30), what);
        assert!(r.success(), "{what}: {}", r.stderr);
    }
    wait_inbox(&b, "crossed a", has("crossed a"));
    wait_inbox(&a, "crossed b", has("crossed b"));
    // Both keep the same one connection; a duplicate is closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while connections(&a) != 1 || connections(&b) != 1 {
        assert!(
            Instant::now() < deadline,
            "connections: A {}, B {}",
            connections(&a),
            connections(&b)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.ok(["send", "bob", "after"]);
    wait_inbox(&b, "after", has("after"));
    b.ok(["send", "alice", "back"]);
    wait_inbox(&a, "back", has("back"));
    assert_eq!((connections(&a), connections(&b)), (1, 1));
}

/// Issue 16, authority: whoever can *read* a pending request's result (here
/// a hostile peer cluster that was mailed `@doc`) cannot *answer* it. Only
/// the capability given to the request's recipient settles it.
#[test]
fn a_reader_of_a_pending_result_cannot_settle_it() {
    let a = listening();
    let b = listening();
    pair(&a, "bob", &b, "alice");
    a.ok(["request", "bob", "need a doc", "--name", "doc"]);
    let inbox = wait_inbox(&b, "alice's request", has("need a doc"));
    let n = find(&inbox, "need a doc")["number"]
        .as_u64()
        .unwrap()
        .to_string();

    // A forwards its pending result to a peer of another cluster, which
    // turns out to be hostile: it receives `@doc` as a locator.
    let rogue = capstan_tests::rogue::RoguePeer::start();
    a.ok(["adopt-locator", &rogue.locator(), "--name", "mallory"]);
    a.ok(["send", "mallory", "fyi @doc"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc = loop {
        if let Some(d) = rogue.deliveries().iter().find(|d| d.refs.len() == 1) {
            break d.refs[0].clone();
        }
        assert!(Instant::now() < deadline, "the rogue never got @doc");
        std::thread::sleep(Duration::from_millis(50));
    };

    // It tries to answer the request through what it got: refused.
    let r = rogue.settle_rejected(&doc, "hijacked");
    let err = r.expect_err("a reader settled the request");
    assert!(err.contains("recipient"), "{err}");
    assert_eq!(a.json(["show", "doc"])["detail"], "pending");

    // The real resolver still answers it.
    b.ok(["store", "--text", "the doc", "--name", "greeting"]);
    b.ok(["resolve", &n, "greeting"]);
    wait_inbox(&a, "the answer", |i| {
        i.iter()
            .any(|m| m["description"] == "need a doc" && m["state"] == "resolved")
    });
    assert_eq!(a.ok(["cat", "doc"]), "the doc");
    assert!(
        !a.inbox(&[]).iter().any(|m| m["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("[undeliverable]"))),
        "the real answer was not refused"
    );
}

/// Issue 16: the outbox is a queue per peer cluster. A dead peer with a
/// long backlog delays only its own mail; once back, it gets all of it,
/// once and in order.
#[test]
fn a_dead_peer_delays_only_its_own_mail() {
    let a = listening();
    let mut b = listening();
    let c = listening();
    pair(&a, "bob", &b, "alice");
    pair(&a, "carol", &c, "alice");
    b.stop();
    const N: usize = 300;
    for i in 0..N {
        a.ok(["send", "bob", &format!("backlog {i}")]);
    }
    a.ok(["send", "bob", "sentinel"]);
    let sent = Instant::now();
    a.ok(["send", "carol", "for carol"]);
    wait_inbox_for(
        &c,
        "carol's message, with B down",
        Duration::from_secs(10),
        has("for carol"),
    );
    eprintln!("carol's message arrived after {:?}", sent.elapsed());

    b.start();
    let inbox = wait_inbox_for(
        &b,
        "the sentinel",
        Duration::from_secs(120),
        has("sentinel"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let inbox2 = b.inbox(&[]);
    assert_eq!(inbox2.len(), inbox.len(), "more arrived after the sentinel");
    let mut want: Vec<String> = (0..N).map(|i| format!("backlog {i}")).collect();
    want.push("sentinel".into());
    assert_eq!(
        texts(&inbox2),
        want,
        "every message once, in the order sent"
    );
}

/// The `list --json` entry of `name`.
fn entry(node: &Node, name: &str) -> Value {
    node.json(["list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the list"))
        .clone()
}

/// Waits until the rogue has answered `n` deliveries; returns them all.
fn wait_deliveries(
    rogue: &capstan_tests::rogue::RoguePeer,
    what: &str,
    pred: impl Fn(&[capstan_tests::rogue::Delivery]) -> bool,
) -> Vec<capstan_tests::rogue::Delivery> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = rogue.deliveries();
        if pred(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "waited 30 s for {what}: {d:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 16: only a refusal for good bounces. A receiver that answers "not
/// now" (`overloaded`: its store failed, it lost its cluster lease, it ran
/// out of retries) or hangs up gets the item again later, until it takes
/// it; the sender hears nothing. A refusal for good (`failed`: revoked)
/// bounces at once, once.
#[test]
fn transient_failures_are_retried_and_refusals_bounce() {
    use capstan_tests::rogue::{Answer, RoguePeer};
    let a = listening();
    let rogue = RoguePeer::start();
    a.ok(["adopt-locator", &rogue.locator(), "--name", "peer"]);
    rogue.script([
        Answer::Overloaded("store error: the store is unreachable".into()),
        Answer::Overloaded(
            "node n1 does not hold its cluster lease right now; retry, or use another node".into(),
        ),
        Answer::Disconnect,
        Answer::Overloaded("the transaction failed after too many retries".into()),
    ]);
    a.ok(["send", "peer", "hello"]);
    let d = wait_deliveries(&rogue, "hello taken", |d| {
        d.iter().any(|x| x.answer == Answer::Ok)
    });
    assert!(d.len() >= 5, "every failure was followed by a retry: {d:?}");
    assert!(
        d.iter().all(|x| x.id == d[0].id && x.strings == ["hello"]),
        "one item, retried: {d:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        rogue
            .deliveries()
            .iter()
            .filter(|x| x.answer == Answer::Ok)
            .count(),
        1,
        "taken once, then no more retries"
    );
    assert_eq!(bounces(&a.inbox(&[])), Vec::<String>::new());

    // A refusal for good bounces to the sender, once.
    rogue.script([Answer::Failed(
        "revoked: the locator of this capability was cancelled".into(),
    )]);
    a.ok(["send", "peer", "second"]);
    let inbox = wait_inbox(&a, "the bounce", |i| !bounces(i).is_empty());
    let b = bounces(&inbox);
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains("revoked"), "{b:?}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        rogue
            .deliveries()
            .iter()
            .filter(|x| x.strings == ["second"])
            .count(),
        1,
        "a refused item is not retried"
    );
    assert_eq!(bounces(&a.inbox(&[])).len(), 1);
}

/// Issue 16: mail that keeps failing for a transient reason is retried up
/// to the outbox expiry (24 h; `CAPSTAN_OUTBOX_EXPIRY_MS` here), then its
/// sender gets one bounce saying so, with the last error.
#[test]
fn mail_undelivered_by_the_expiry_bounces_once() {
    use capstan_tests::rogue::{Answer, RoguePeer};
    let mut a = Node::new().with_env("CAPSTAN_OUTBOX_EXPIRY_MS", "3000");
    a.start_with(&["--listen", "127.0.0.1:0"]);
    let rogue = RoguePeer::start();
    a.ok(["adopt-locator", &rogue.locator(), "--name", "peer"]);
    rogue.answer_by_default(Answer::Overloaded("busy, try later".into()));
    let sent = Instant::now();
    a.ok(["send", "peer", "hello"]);
    let inbox = wait_inbox(&a, "the bounce", |i| !bounces(i).is_empty());
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "bounced before the expiry: {:?}",
        sent.elapsed()
    );
    let b = bounces(&inbox);
    assert!(
        b[0].contains("within 3 s") && b[0].contains("busy, try later"),
        "{b:?}"
    );
    assert!(
        rogue.deliveries().len() >= 2,
        "it was retried until then: {:?}",
        rogue.deliveries()
    );
    let tried = rogue.deliveries().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bounces(&a.inbox(&[])).len(), 1, "one bounce");
    assert_eq!(
        rogue.deliveries().len(),
        tried,
        "no retries after the bounce"
    );
}

/// Issue 16: `invite` and `accept` sent twice with the same request id (as
/// the CLI does when it lost the daemon's answer) apply once and answer
/// alike; the retried invitation works, and the first one dies with it.
#[test]
fn invite_and_accept_retried_with_the_same_request_id_apply_once() {
    use capstan_tests::control;
    let a = listening();
    let b = listening();
    let req = capstan_proto::RequestId::random().0;
    let inv1 = control::invite(&a, "bob", req).expect("invite");
    let inv2 = control::invite(&a, "bob", req).expect("the same invite again");
    assert_eq!(a.json(["show", "bob"])["type"], "invitation");

    let req = capstan_proto::RequestId::random().0;
    let id1 = control::accept(&b, req, &inv2, "alice").expect("accept");
    let id2 = control::accept(&b, req, &inv2, "alice").expect("the same accept again");
    assert_eq!(id1, id2, "the same answer");
    let shown = b.json(["show", "alice"]);
    assert_eq!(shown["type"], "remote");
    assert_eq!(shown["id"], id1.as_str());
    assert_eq!(a.json(["show", "bob"])["type"], "remote");

    // One use: the other copy of the invitation died with the acceptance.
    let c = listening();
    let (code, err) = c.fail(["accept", &inv1, "alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown or revoked"), "{err}");
    // The one that was used says so.
    let (_, err) = c.fail(["accept", &inv2, "alice"]);
    assert!(err.contains("already used"), "{err}");

    a.ok(["send", "bob", "hi"]);
    wait_inbox(&b, "hi", has("hi"));
    b.ok(["send", "alice", "hello"]);
    wait_inbox(&a, "hello", has("hello"));
}

/// Issue 16: accepting reserves its name before the inviter is asked (so
/// nothing else takes it meanwhile), and a node that dies before the
/// answer goes on where it was: the inviter sees one redeemer, retrying
/// with the same request id.
#[test]
fn accept_reserves_its_name_first_and_survives_a_crash() {
    use capstan_tests::rogue::RoguePeer;
    let mut b = listening();
    let rogue = RoguePeer::start();
    let inv = rogue.locator();
    rogue.hold_accepts(true);
    let child = b.spawn(["accept", &inv, "alice"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rogue.accepts().is_empty() {
        assert!(Instant::now() < deadline, "the inviter was never asked");
        std::thread::sleep(Duration::from_millis(20));
    }
    // While the inviter has not answered, the name is held.
    let (_, err) = b.fail(["mkdir", "alice"]);
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(b.json(["show", "alice"])["type"], "accepting");

    // The node dies before the answer arrives.
    b.kill9();
    capstan_tests::kill_child(child);
    rogue.hold_accepts(false);
    b.start();
    assert_eq!(
        b.json(["show", "alice"])["type"],
        "accepting",
        "the reservation survived the crash"
    );
    // Accepting again goes on with the first attempt.
    b.ok(["accept", &inv, "alice"]);
    let acc = rogue.accepts();
    assert_eq!(acc.len(), 2, "{acc:?}");
    assert_eq!(acc[0].req.len(), 16, "a request id was sent: {acc:?}");
    assert_eq!(acc[0].req, acc[1].req, "the same request id: {acc:?}");
    assert!(acc.iter().all(|a| a.taken), "{acc:?}");
    assert_eq!(entry(&b, "alice")["type"], "remote");
    b.ok(["send", "alice", "hello"]);
    wait_deliveries(&rogue, "hello", |d| {
        d.iter().any(|x| x.strings == ["hello"])
    });
}

/// Issue 16: the inviter answers a redeemer that retries with the same
/// request id as the first time (the same formula, now designating the
/// handle offered last); any other request is refused.
#[test]
fn an_invitation_redeemed_again_with_the_same_request_id_gets_the_same_answer() {
    use capstan_tests::rogue::RoguePeer;
    let a = listening();
    let rogue = RoguePeer::start();
    let inv: capstan_proto::Locator = a.json(["invite", "bob"])["invitation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let req = capstan_proto::RequestId::random().0;
    let s1 = rogue.accept_invitation(&inv, req).expect("accepted");
    // (`list`, not `show`: showing a remote name asks its node, the rogue.)
    let shown = entry(&a, "bob");
    assert_eq!(shown["type"], "remote");
    let s2 = rogue
        .accept_invitation(&inv, req)
        .expect("accepted again: the same request");
    assert_ne!(s1, s2, "a fresh handle");
    assert_eq!(entry(&a, "bob")["id"], shown["id"], "the same formula");
    let err = rogue
        .accept_invitation(&inv, capstan_proto::RequestId::random().0)
        .expect_err("another request redeemed a used invitation");
    assert!(err.contains("already used"), "{err}");

    a.ok(["send", "bob", "hi"]);
    let d = wait_deliveries(&rogue, "hi", |d| d.iter().any(|x| x.strings == ["hi"]));
    assert_eq!(d.len(), 1, "{d:?}");
}

/// Issue 16: a copy of an invitation's name does not dangle once it is
/// accepted. The invitation itself becomes the invited agent, so every name
/// of it (a copy in another directory too) names that agent.
#[test]
fn copies_of_an_invitation_name_the_invited_agent_after_accept() {
    let a = listening();
    let b = listening();
    let inv = a.json(["invite", "bob"])["invitation"]
        .as_str()
        .unwrap()
        .to_string();
    a.ok(["copy", "bob", "bob2"]);
    a.ok(["mkdir", "team"]);
    a.ok(["copy", "bob", "team.bob"]);
    b.ok(["accept", &inv, "alice"]);
    let list = a.json(["list"]);
    let bob = entry(&a, "bob");
    let bob2 = entry(&a, "bob2");
    assert_eq!(bob["type"], "remote", "{list}");
    assert_eq!(bob2["id"], bob["id"], "bob2 names what bob names: {list}");
    assert_eq!(a.json(["show", "team.bob"])["id"], bob["id"]);
    a.ok(["send", "bob2", "via the copy"]);
    let inbox = wait_inbox(&b, "mail through the copy", has("via the copy"));
    assert_eq!(find(&inbox, "via the copy")["from"], "alice");
}
