//! `capstan eval` and `capstan endow` end to end: a real daemon runs the
//! evaluator component (guests/evaluator: Boa, a JavaScript engine, as a
//! confined guest) with only the capabilities bound to the code's slots.

use capstan_tests::{Node, guest_wasm, texts};
use serde_json::Value;

/// A node with the evaluator installed as `evaluator`.
fn node_with_evaluator() -> Node {
    let node = Node::started();
    let wasm = guest_wasm("evaluator");
    let info = node.json(["install", wasm.as_str(), "--name", "evaluator"]);
    assert_eq!(info["world"], "capstan:evaluator/sandboxed-evaluator@0.1.0");
    node
}

fn eval_json(node: &Node, args: &[&str]) -> Value {
    let mut a = vec!["eval"];
    a.extend_from_slice(args);
    node.json(a)
}

#[test]
fn eval_runs_javascript_with_only_the_bound_capabilities() {
    let node = node_with_evaluator();
    node.ok(["store", "--text", "hello [world] ✓", "--name", "greeting"]);
    node.ok([
        "store",
        "--json",
        r#"{"n": [1, 2, 3]}"#,
        "--name",
        "numbers",
    ]);
    node.ok(["mkdir", "docs"]);
    node.ok(["store", "--text", "first", "--name", "docs.a"]);
    node.ok(["store", "--text", "second", "--name", "docs.b"]);

    // plain JavaScript: the completion value, as JSON
    assert_eq!(
        node.ok(["eval", "[1, 2, 3].map(x => x * x)"]).trim(),
        "[\n  1,\n  4,\n  9\n]"
    );
    let v = eval_json(&node, &["({a: 1, b: 'two'})"]);
    assert_eq!(v["result"], r#"{"a":1,"b":"two"}"#);
    assert!(v["fuel"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["invokes"], 0);
    // async code is awaited
    let v = eval_json(&node, &["(async () => 6 * 7)()"]);
    assert_eq!(v["result"], "42");

    // a value, byte-exact; a JSON value parsed
    let v = eval_json(&node, &["g.text()", "g=greeting"]);
    assert_eq!(v["result"], r#""hello [world] ✓""#);
    assert_eq!(v["invokes"], 1);
    let v = eval_json(
        &node,
        &["n.json().n.reduce((a, b) => a + b, 0)", "n=numbers"],
    );
    assert_eq!(v["result"], "6");
    // a directory: its names and its values
    let v = eval_json(&node, &["d.list().map(x => d.read(x)).join('+')", "d=docs"]);
    assert_eq!(v["result"], r#""first+second""#);
    // an agent: its inbox, and mail sent as the host
    node.ok(["mkguest", "alice"]);
    let v = eval_json(
        &node,
        &["a.send('from the evaluator'); a.inbox().length", "a=alice"],
    );
    assert_eq!(v["result"], "1");
    let inbox = node.inbox(&["--as", "alice"]);
    assert_eq!(texts(&inbox), vec!["from the evaluator"]);

    // what was not bound does not exist
    let (_, e) = node.fail(["eval", "secret.text()", "g=greeting"]);
    assert!(e.contains("secret is not defined"), "{e}");
    // a slot's methods are only those of its kind
    let (_, e) = node.fail(["eval", "g.send('x')", "g=greeting"]);
    assert!(e.contains("not a callable function"), "{e}");
    // a failed capability call is an exception the code can catch
    let v = eval_json(
        &node,
        &[
            "try { n.json(); g.json() } catch (e) { 'caught: ' + e.message }",
            "n=numbers",
            "g=greeting",
        ],
    );
    let r = v["result"].as_str().unwrap();
    assert!(r.starts_with("\"caught: "), "{v}");
    assert!(r.contains("not JSON"), "{v}");
}

#[test]
fn eval_refuses_bad_input_and_stops_runaway_code() {
    let node = Node::started();
    // no evaluator installed yet: the error says what to do
    let (_, e) = node.fail(["eval", "1"]);
    assert!(e.contains("capstan install"), "{e}");
    let wasm = guest_wasm("evaluator");
    node.ok(["install", wasm.as_str(), "--name", "evaluator"]);
    node.ok(["store", "--text", "x", "--name", "x"]);

    let (_, e) = node.fail(["eval", "1", "x=nothing-here"]);
    assert!(e.contains("nothing-here"), "{e}");
    let (_, e) = node.fail(["eval", "1", "no-equals"]);
    assert!(e.contains("SLOT=PATH"), "{e}");
    let (_, e) = node.fail(["eval", "1", "Bad=x"]);
    assert!(e.contains("cannot be a slot"), "{e}");
    let (_, e) = node.fail(["eval", "1", "a=x", "a=x"]);
    assert!(e.contains("bound twice"), "{e}");
    let (_, e) = node.fail(["eval", "1 +", "a=x"]);
    assert!(e.contains("SyntaxError"), "{e}");
    let (_, e) = node.fail(["eval", "throw new Error('boom')"]);
    assert!(e.contains("boom"), "{e}");
    // the evaluator is not an agent; another component is not an evaluator
    let (_, e) = node.fail(["mkguest", "ev", "--component", "evaluator"]);
    assert!(e.contains("evaluator"), "{e}");
    let counter = guest_wasm("counter");
    node.ok(["install", counter.as_str(), "--name", "counter"]);
    let (_, e) = node.fail(["eval", "1", "--evaluator", "counter"]);
    assert!(e.contains("not an evaluator"), "{e}");

    // an endless loop is stopped by fuel, a memory bomb by the memory limit
    let (_, e) = node.fail(["eval", "while (true) {}"]);
    assert!(e.contains("fuel limit"), "{e}");
    let (_, e) = node.fail([
        "eval",
        "let a = []; while (true) a.push('x'.repeat(1000) + a.length)",
    ]);
    assert!(e.contains("stopped"), "{e}");
    // and the node goes on
    assert_eq!(node.ok(["eval", "'still here'"]).trim(), "\"still here\"");
    assert!(node.names(&[]).contains("x"));
}

/// A proposal mailed by a guest, answered with `endow`: the slots must be
/// bound exactly, the result goes back as a reply, and only once.
#[test]
fn endow_answers_a_proposal_once_with_what_the_host_bound() {
    let node = node_with_evaluator();
    node.ok(["mkguest", "helper"]);
    node.ok(["store", "--text", "a secret plan", "--name", "plan"]);
    let proposal = r#"definition: slots {doc: "a document to summarise"}
{"kind":"define_code","call":"c1","source":"doc.text().split(' ').length","slots":{"doc":"a document to summarise"}}"#;
    node.ok(["send", "--as", "helper", "HOST", proposal]);
    let inbox = node.inbox(&[]);
    let n = inbox
        .iter()
        .find(|m| m["from"] == "helper")
        .and_then(|m| m["number"].as_u64())
        .expect("the proposal arrived");
    let n = n.to_string();

    // every slot, and only the proposal's slots
    let (_, e) = node.fail(["endow", n.as_str()]);
    assert!(e.contains("doc (\"a document to summarise\")"), "{e}");
    let (_, e) = node.fail([
        "endow",
        n.as_str(),
        "--bind",
        "doc=plan",
        "--bind",
        "other=plan",
    ]);
    assert!(e.contains("no slot \"other\""), "{e}");
    // a message that is not a proposal
    node.ok(["send", "--as", "helper", "HOST", "just chatting"]);
    let chat = node
        .inbox(&[])
        .iter()
        .find(|m| texts(std::slice::from_ref(*m)).concat() == "just chatting")
        .and_then(|m| m["number"].as_u64())
        .unwrap()
        .to_string();
    let (_, e) = node.fail(["endow", chat.as_str(), "--bind", "doc=plan"]);
    assert!(e.contains("not a code proposal"), "{e}");
    let from_host = |node: &Node| {
        node.inbox(&["--as", "helper"])
            .into_iter()
            .filter(|m| m["from"] == "HOST")
            .count()
    };
    assert_eq!(from_host(&node), 0, "nothing was mailed");

    let v = node.json(["endow", n.as_str(), "--bind", "doc=plan"]);
    assert_eq!(v["result"], "3", "{v}");
    let helper = node.inbox(&["--as", "helper"]);
    let replies: Vec<&Value> = helper.iter().filter(|m| m["from"] == "HOST").collect();
    assert_eq!(replies.len(), 1, "{helper:#?}");
    assert_eq!(texts(&[replies[0].clone()]), vec!["result: 3"]);
    // the reply is in the proposal's thread
    let thread = node.inbox(&[
        "--thread",
        inbox.iter().find(|m| m["from"] == "helper").unwrap()["message_id"]
            .as_str()
            .unwrap(),
    ]);
    assert_eq!(thread.len(), 2, "{thread:#?}");

    // answered once
    let (_, e) = node.fail(["endow", n.as_str(), "--bind", "doc=plan"]);
    assert!(e.contains("already answered"), "{e}");
    assert_eq!(from_host(&node), 1);
}

/// Issue 16: acting as another agent follows the agents one made. A
/// sub-host's code cannot act as its HOST (the root) through an agent slot:
/// it can neither list, read nor read the inbox of it; it can still mail it.
#[test]
fn a_sub_host_cannot_act_as_its_host_through_a_slot() {
    let node = node_with_evaluator();
    node.ok(["store", "--text", "the root's secret", "--name", "secret"]);
    node.ok(["mkhost", "bob"]);
    node.ok(["send", "bob", "@evaluator"]);
    let n = node.inbox(&["--as", "bob"])[0]["number"]
        .as_u64()
        .unwrap()
        .to_string();
    node.ok(["adopt", &n, "evaluator", "--as", "bob"]);

    let v = eval_json(&node, &["s.list()", "s=SELF", "--as", "bob"]);
    assert!(
        v["result"].as_str().unwrap().contains("evaluator"),
        "its own names: {v}"
    );
    for code in ["h.list()", "h.read('secret')", "h.inbox().length"] {
        let (_, e) = node.fail(["eval", code, "h=HOST", "--as", "bob"]);
        assert!(e.contains("not an agent you made"), "{code}: {e}");
        assert!(!e.contains("the root's secret"), "{code}: {e}");
    }
    node.ok(["eval", "h.send('hello')", "h=HOST", "--as", "bob"]);
    let inbox = node.inbox(&[]);
    assert!(
        inbox
            .iter()
            .any(|m| m["text"] == "hello" && m["from"] == "bob"),
        "{inbox:?}"
    );
}
