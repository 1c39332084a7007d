//! Issue 2's scenario, command by command, including `kill -9` of the daemon
//! with a request pending and its resolution after the restart.

use std::time::{Duration, Instant};

use capstan_tests::{Node, is_formula_id, pid_alive};
use serde_json::json;

#[test]
fn issue_scenario_survives_kill_9() {
    let mut node = Node::new();

    // capstan start
    let pid = node.start();
    assert!(pid_alive(pid));

    // capstan mkguest alice
    let alice = node.json(["mkguest", "alice"]);
    assert!(is_formula_id(&alice["id"]), "mkguest --json: {alice}");

    // capstan store --text "hello [world]" --name greeting
    let greeting = node.json(["store", "--text", "hello [world]", "--name", "greeting"]);
    assert!(is_formula_id(&greeting["id"]), "store --json: {greeting}");
    assert_eq!(node.ok(["cat", "greeting"]), "hello [world]");

    // capstan send alice "here is @greeting"
    let sent = node.json(["send", "alice", "here is @greeting"]);
    assert_eq!(sent, json!({"number": 0}), "the sender's copy is message 0");

    // capstan inbox --as alice: message 0 with the reference
    let human = node.ok(["inbox", "--as", "alice"]);
    assert!(
        human.contains(r#"0. from HOST to SELF: "here is @greeting""#),
        "alice's inbox: {human}"
    );
    let inbox = node.inbox(&["--as", "alice"]);
    assert_eq!(inbox.len(), 1, "alice's inbox: {inbox:?}");
    let m = &inbox[0];
    assert_eq!(m["number"], 0);
    assert_eq!(m["type"], "package");
    assert_eq!(m["from"], "HOST");
    assert_eq!(m["to"], "SELF");
    assert_eq!(m["names"], json!(["greeting"]));
    assert_eq!(m["text"], "here is @greeting");
    assert_eq!(m["strings"][0], "here is ");

    // capstan adopt 0 greeting --name g --as alice
    let adopted = node.json(["adopt", "0", "greeting", "--name", "g", "--as", "alice"]);
    assert_eq!(adopted["id"], greeting["id"], "adopt gives the same value");
    assert_eq!(node.ok(["cat", "g", "--as", "alice"]), "hello [world]");

    // capstan request HOST "need a doc" --name doc --as alice: returns at once
    let t0 = Instant::now();
    let req = node.json([
        "request",
        "HOST",
        "need a doc",
        "--name",
        "doc",
        "--as",
        "alice",
    ]);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "request did not return at once"
    );
    assert_eq!(req["number"], 1, "alice's copy of her request: {req}");
    assert!(is_formula_id(&req["promise"]), "request --json: {req}");
    let doc = node.json(["show", "doc", "--as", "alice"]);
    assert_eq!(doc["type"], "promise", "show doc --as alice: {doc}");
    assert_eq!(doc["detail"], "pending", "show doc --as alice: {doc}");
    assert_eq!(doc["id"], req["promise"]);

    // capstan inbox: 0 = the host's sent copy to alice, 1 = alice's request
    let human = node.ok(["inbox"]);
    assert!(
        human.contains(r#"1. from alice to SELF: request "need a doc" (pending)"#),
        "host's inbox: {human}"
    );
    let host_inbox = node.inbox(&[]);
    assert_eq!(host_inbox.len(), 2, "host's inbox: {host_inbox:?}");
    assert_eq!(host_inbox[0]["number"], 0);
    assert_eq!(host_inbox[0]["to"], "alice");
    assert_eq!(host_inbox[0]["text"], "here is @greeting");
    assert_eq!(host_inbox[1]["number"], 1);
    assert_eq!(host_inbox[1]["from"], "alice");
    assert_eq!(host_inbox[1]["type"], "request");
    assert_eq!(host_inbox[1]["description"], "need a doc");
    assert_eq!(host_inbox[1]["state"], "pending");
    let names_before = node.json(["list"]);
    let alice_names_before = node.json(["list", "--as", "alice"]);

    // kill -9 <daemon pid>; capstan start: nothing acknowledged is lost
    node.kill9();
    assert!(!pid_alive(pid));
    let (code, err) = node.fail(["ping"]);
    assert_eq!(code, 2, "no daemon: {err}");
    let pid2 = node.start();
    assert_ne!(pid, pid2);
    assert_eq!(
        node.json(["list"]),
        names_before,
        "host's names after restart"
    );
    assert_eq!(
        node.json(["list", "--as", "alice"]),
        alice_names_before,
        "alice's names after restart"
    );
    assert_eq!(node.inbox(&[]), host_inbox, "host's inbox after restart");
    assert_eq!(node.ok(["cat", "g", "--as", "alice"]), "hello [world]");

    // capstan resolve 1 greeting
    assert_eq!(
        node.json(["resolve", "1", "greeting"]),
        json!({"number": 1, "resolved": "greeting"})
    );

    // capstan show doc --as alice: alice now holds it
    let doc = node.json(["show", "doc", "--as", "alice"]);
    assert_eq!(doc["name"], "doc");
    match doc["type"].as_str() {
        Some("promise") => assert!(
            doc["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("resolved")),
            "show doc: {doc}"
        ),
        Some("value") => {}
        _ => panic!("show doc --as alice after resolve: {doc}"),
    }
    assert_eq!(node.ok(["cat", "doc", "--as", "alice"]), "hello [world]");
    let host_inbox = node.inbox(&[]);
    assert_eq!(
        host_inbox[1]["state"], "resolved",
        "host's view: {host_inbox:?}"
    );
    let alice_inbox = node.inbox(&["--as", "alice"]);
    assert_eq!(
        alice_inbox[1]["state"], "resolved",
        "alice's view: {alice_inbox:?}"
    );

    // Resolving twice is an error and changes nothing.
    let (code, _) = node.fail(["resolve", "1", "greeting"]);
    assert_eq!(code, 1);

    // And it all survives a clean restart as well.
    node.stop();
    node.start();
    assert_eq!(node.ok(["cat", "doc", "--as", "alice"]), "hello [world]");
    assert_eq!(node.inbox(&[])[1]["state"], "resolved");
}
