//! Cascading cancellation (issue 18): `cancel NAME` cancels what depends on
//! it, each dependent told why, durable across kill -9 and across cluster
//! nodes; `show` tells a cancelled formula from a live one. Modelled on
//! Endo's daemon tests "direct cancellation" and "indirect cancellation".

use std::time::{Duration, Instant};

use capstan_tests::{Node, guest_wasm};
use serde_json::Value;

fn request_state(node: &Node, description: &str) -> String {
    node.inbox(&[])
        .iter()
        .find(|m| m["description"] == description)
        .unwrap_or_else(|| panic!("no request {description:?}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn detail(node: &Node, name: &str) -> String {
    node.json(["show", name])["detail"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Host `h` makes guest `g` and hands it to the root host, which names it
/// `hg` (a host's agents are not under its name: `h.g` is no path).
fn host_with_guest(node: &Node) {
    node.ok(["mkhost", "h"]);
    node.ok(["mkguest", "g", "--as", "h"]);
    node.ok(["send", "HOST", "here is @g", "--as", "h"]);
    let m = node
        .inbox(&[])
        .into_iter()
        .find(|m| m["from"] == "h")
        .expect("h's message");
    let n = m["number"].as_u64().unwrap().to_string();
    node.ok(["adopt", &n, "g", "--name", "hg"]);
}

fn cancelled_types(v: &Value) -> Vec<String> {
    v["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn direct_cancellation() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["request", "alice", "need a doc", "--name", "doc"]);
    assert_eq!(request_state(&node, "need a doc"), "pending");
    assert!(!detail(&node, "alice").contains("cancelled"));

    let v = node.json(["cancel", "alice"]);
    assert_eq!(cancelled_types(&v), ["guest"], "{v}");
    assert_eq!(v["cancelled"][0]["reason"], "cancelled by its host", "{v}");
    assert_eq!(v["rejected"], 1, "{v}");

    // show tells it from a live one
    assert_eq!(detail(&node, "alice"), "cancelled by its host");
    // the pending request waiting on it is rejected, and says why
    let state = request_state(&node, "need a doc");
    assert!(
        state.starts_with("rejected: cancelled: its dependency alice (guest "),
        "{state}"
    );
    let (code, err) = node.fail(["cat", "doc"]);
    assert_ne!(code, 0);
    assert!(err.contains("was cancelled"), "{err}");
    // mail to it is refused, nothing written; it cannot act
    let (code, err) = node.fail(["send", "alice", "hello?"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("alice was cancelled (cancelled by its host): nothing was sent"),
        "{err}"
    );
    let (_, err) = node.fail(["inbox", "--as", "alice"]);
    assert!(err.contains("alice was cancelled"), "{err}");
    // other agents live on
    node.ok(["mkguest", "bob"]);
    node.ok(["send", "bob", "still fine"]);
    // human output names what died
    node.ok(["mkguest", "carol"]);
    let out = node.ok(["cancel", "carol"]);
    assert!(out.contains("cancelled guest"), "{out}");
    assert!(out.contains("cancelled by its host"), "{out}");
}

#[test]
fn indirect_cancellation() {
    let node = Node::started();
    // host h made guest g; the root host asks g for something
    host_with_guest(&node);
    node.ok(["request", "hg", "from root"]);
    node.ok(["mkguest", "other"]);
    node.ok(["send", "g", "hi", "--as", "h"]);
    node.ok(["request", "other", "unrelated"]);
    let v = node.json(["cancel", "h"]);
    let mut types = cancelled_types(&v);
    types.sort();
    assert_eq!(types, ["guest", "host"], "{v}");
    let g = v["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "guest")
        .unwrap();
    assert!(
        g["reason"]
            .as_str()
            .unwrap()
            .starts_with("cancelled: its dependency h (host "),
        "{v}"
    );
    // the guest made by the cancelled host is cancelled too, and says why;
    // the request waiting on it is rejected
    assert!(detail(&node, "hg").starts_with("cancelled: its dependency h (host "));
    let (_, err) = node.fail(["inbox", "--as", "hg"]);
    assert!(err.contains("hg was cancelled"), "{err}");
    let state = request_state(&node, "from root");
    assert!(
        state.starts_with("rejected: cancelled: its dependency g (guest ")
            || state.starts_with("rejected: cancelled: its dependency guest "),
        "{state}"
    );
    let (_, err) = node.fail(["send", "h", "x"]);
    assert!(err.contains("h was cancelled"), "{err}");
    // unrelated things live on
    assert_eq!(request_state(&node, "unrelated"), "pending");
    node.ok(["send", "other", "fine"]);
}

#[test]
fn cancelling_a_component_or_a_grant_cancels_the_guests_made_of_it() {
    let node = Node::started();
    let path = guest_wasm("counter");
    node.ok(["install", &path, "--name", "counter"]);
    node.ok(["store", "--text", "secret", "--name", "note"]);
    node.ok(["mkguest", "bot", "--component", "counter"]);
    node.ok([
        "mkguest",
        "noted",
        "--component",
        "counter",
        "--with",
        "note=note",
    ]);
    node.ok(["mkguest", "plain"]);
    node.ok(["request", "noted", "answer me"]);

    // a value granted to a guest: that guest dies, the value stays readable
    let v = node.json(["cancel", "note"]);
    assert_eq!(cancelled_types(&v), ["guest"], "{v}");
    assert!(
        v["cancelled"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("cancelled: its dependency note (value "),
        "{v}"
    );
    assert_eq!(node.ok(["cat", "note"]), "secret");
    assert!(detail(&node, "noted").starts_with("cancelled: its dependency note"));
    let state = request_state(&node, "answer me");
    assert!(
        state.starts_with("rejected: cancelled: its dependency noted (guest "),
        "{state}"
    );
    // bot still runs
    node.ok(["send", "bot", "increment"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !node
        .inbox(&[])
        .iter()
        .any(|m| m["from"] == "bot" && m["text"].as_str().is_some_and(|t| t.contains("count = 1")))
    {
        assert!(Instant::now() < deadline, "bot never answered");
        std::thread::sleep(Duration::from_millis(100));
    }

    // the component itself: every guest running it dies (the live one
    // stops), plain guests do not
    let v = node.json(["cancel", "counter"]);
    assert_eq!(cancelled_types(&v), ["guest"], "{v}");
    assert!(detail(&node, "bot").starts_with("cancelled: its dependency counter (value "));
    assert!(!detail(&node, "plain").contains("cancelled"));
    let (_, err) = node.fail(["send", "bot", "increment"]);
    assert!(err.contains("bot was cancelled"), "{err}");
}

#[test]
fn cancellation_holds_across_kill_9() {
    let mut node = Node::started();
    host_with_guest(&node);
    node.ok(["cancel", "h"]);
    node.kill9();
    node.start();
    assert_eq!(detail(&node, "h"), "cancelled by its host");
    let (_, err) = node.fail(["send", "h", "x"]);
    assert!(err.contains("h was cancelled"), "{err}");
    let (_, err) = node.fail(["inbox", "--as", "hg"]);
    assert!(err.contains("cancelled: its dependency h (host"), "{err}");
}

#[test]
fn cancellation_reaches_every_cluster_node() {
    let Some(spec) = capstan_tests::etcd_spec("cancel") else {
        return;
    };
    let nodes = capstan_tests::start_cluster(&spec, 2, "5000");
    host_with_guest(&nodes[0]);
    // n2 sends to g (so it may own g's inbox) and asks it something
    nodes[1].ok(["send", "hg", "hello"]);
    nodes[1].ok(["request", "hg", "from n2"]);
    let v = nodes[0].json(["cancel", "h"]);
    assert_eq!(cancelled_types(&v).len(), 2, "{v}");
    assert_eq!(v["rejected"], 1, "{v}");
    // n2 sees it at once: show, refusal, the rejected request
    assert_eq!(detail(&nodes[1], "h"), "cancelled by its host");
    let (_, err) = nodes[1].fail(["send", "h", "x"]);
    assert!(err.contains("h was cancelled"), "{err}");
    let (_, err) = nodes[1].fail(["inbox", "--as", "hg"]);
    assert!(err.contains("was cancelled"), "{err}");
    // and with the node that cancelled gone (kill -9): it is in the store
    let mut nodes = nodes;
    nodes[0].kill9();
    assert_eq!(detail(&nodes[1], "h"), "cancelled by its host");
    let (_, err) = nodes[1].fail(["send", "hg", "x"]);
    assert!(err.contains("cancelled: its dependency h (host"), "{err}");
}

/// An eval result (`eval … --name R`) depends on what its slots held and on
/// its evaluator: cancelling one cancels it, and it says why, across kill
/// -9; results made from other inputs, and the inputs (data), live on.
#[test]
fn cancelling_a_slot_cancels_the_eval_results_made_from_it() {
    let mut node = Node::started();
    let wasm = guest_wasm("evaluator");
    node.ok(["install", wasm.as_str(), "--name", "evaluator"]);
    node.ok(["store", "--text", "hello", "--name", "doc"]);
    node.ok(["store", "--text", "other", "--name", "other"]);
    let v = node.json(["eval", "d.text().length", "d=doc", "--name", "len"]);
    assert_eq!(v["result"], "5", "{v}");
    assert!(v["id"].is_string(), "{v}");
    node.json(["eval", "o.text() + '!'", "o=other", "--name", "shout"]);
    assert_eq!(node.ok(["cat", "len"]).trim(), "5");
    // code that throws stores nothing
    node.fail(["eval", "throw new Error('no')", "--name", "nothing"]);
    node.fail(["show", "nothing"]);

    let v = node.json(["cancel", "doc"]);
    assert_eq!(cancelled_types(&v), ["value"], "{v}");
    let why = v["cancelled"][0]["reason"].as_str().unwrap();
    assert!(
        why.starts_with("cancelled: its dependency doc (value "),
        "{why}"
    );
    // show and cat tell the cancelled result from a live one
    assert_eq!(detail(&node, "len"), why);
    let (_, err) = node.fail(["cat", "len"]);
    assert!(
        err.contains("len was cancelled (cancelled: its dependency doc"),
        "{err}"
    );
    // the input is data: it is still read; the other result lives on
    assert_eq!(node.ok(["cat", "doc"]).trim(), "hello");
    assert!(!detail(&node, "shout").contains("cancelled"));
    assert!(node.ok(["cat", "shout"]).contains("other!"));
    node.kill9();
    node.start();
    assert_eq!(detail(&node, "len"), why);
    // cancelling the evaluator cancels every result it computed
    let v = node.json(["cancel", "evaluator"]);
    assert_eq!(cancelled_types(&v), ["value"], "{v}");
    assert!(detail(&node, "shout").contains("its dependency evaluator (value "));
}

/// A running evaluation stops when what it depends on is cancelled: one
/// waiting for an http server that never answers (60 s timeout) ends as
/// soon as its http capability is cancelled, saying why, and stores
/// nothing.
#[test]
fn cancelling_a_slot_stops_the_evaluation_that_is_running_on_it() {
    use std::io::Read;
    let node = Node::started();
    let wasm = guest_wasm("evaluator");
    node.ok(["install", wasm.as_str(), "--name", "evaluator"]);
    // A server that reads the request and never answers.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let _ = seen_tx.send(());
        // Held open, unanswered, until the test process ends.
        std::thread::sleep(Duration::from_secs(600));
        drop(conn);
    });
    let prefix = format!("http://127.0.0.1:{port}/");
    node.ok(["mkhttp", "api", "--allow", &prefix, "--timeout-ms", "60000"]);
    let child = node.spawn([
        "eval",
        &format!("h.fetch('{prefix}slow').status"),
        "h=api",
        "--name",
        "answer",
    ]);
    seen_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the evaluation never reached the server");
    let t = Instant::now();
    node.json(["cancel", "api"]);
    let r = capstan_tests::wait_child(child, Duration::from_secs(45), "eval");
    assert!(!r.success(), "the evaluation succeeded: {}", r.stdout_str());
    assert!(
        r.stderr.contains("api was cancelled")
            && r.stderr
                .contains("the evaluation depending on it was stopped"),
        "{}",
        r.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(45),
        "it ran until the http timeout"
    );
    node.fail(["show", "answer"]);
}
