//! Mail: following an inbox, threads, requests answered while a waiter waits,
//! and message text round trips.

use std::thread;
use std::time::{Duration, Instant};

use capstan_tests::{LineReader, Node, is_formula_id, is_hex, kill_child, texts, wait_child};
use serde_json::{Value, json};

const LINE_TIMEOUT: Duration = Duration::from_secs(15);

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"))
}

fn check_message_shape(m: &Value) {
    assert!(m["number"].is_u64(), "number: {m}");
    assert!(
        m["message_id"].as_str().is_some_and(|s| is_hex(s, 32)),
        "message_id: {m}"
    );
    assert!(
        m["reply_to"].is_null() || m["reply_to"].as_str().is_some_and(|s| is_hex(s, 32)),
        "reply_to: {m}"
    );
    assert!(m["from"].is_string() && m["to"].is_string(), "from/to: {m}");
    assert!(m["date_ms"].is_u64(), "date_ms: {m}");
    match m["type"].as_str() {
        Some("package") => {
            assert!(m["strings"].is_array() && m["names"].is_array(), "{m}");
            assert!(m["text"].is_string(), "{m}");
            assert_eq!(
                m["strings"].as_array().unwrap().len(),
                m["names"].as_array().unwrap().len() + 1,
                "strings interleave names: {m}"
            );
        }
        Some("request") => {
            assert!(m["description"].is_string(), "{m}");
            let state = m["state"].as_str().unwrap_or("");
            assert!(
                state == "pending" || state == "resolved" || state.starts_with("rejected: "),
                "state: {m}"
            );
        }
        _ => panic!("type: {m}"),
    }
}

#[test]
fn inbox_follow_sees_new_messages() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["send", "alice", "first"]);

    let mut child = node.spawn(["--json", "inbox", "--follow", "--as", "alice"]);
    let lines = LineReader::new(child.stdout.take().unwrap());
    let first = lines
        .next(LINE_TIMEOUT)
        .expect("the existing message first");
    let first = parse_line(&first);
    check_message_shape(&first);
    assert_eq!(first["number"], 0);
    assert_eq!(first["text"], "first");

    node.ok(["send", "alice", "second @@ one"]);
    let second = lines
        .next(LINE_TIMEOUT)
        .expect("a message sent after following");
    let second = parse_line(&second);
    check_message_shape(&second);
    assert_eq!(second["number"], 1);
    assert_eq!(second["text"], "second @ one");

    // A request shows up too.
    node.ok(["request", "alice", "a favour"]);
    let third = parse_line(&lines.next(LINE_TIMEOUT).expect("the request"));
    assert_eq!(third["type"], "request");
    assert_eq!(third["description"], "a favour");
    assert_eq!(third["state"], "pending");

    // Nothing else arrives; the follower is still running.
    assert!(lines.next(Duration::from_millis(300)).is_none());
    assert!(
        child.try_wait().unwrap().is_none(),
        "inbox --follow exited on its own"
    );
    kill_child(child);
}

#[test]
fn inbox_follow_human_output() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    let mut child = node.spawn(["inbox", "--follow", "--as", "alice"]);
    let lines = LineReader::new(child.stdout.take().unwrap());
    thread::sleep(Duration::from_millis(200));
    node.ok(["send", "alice", "hi there"]);
    let line = lines
        .next(LINE_TIMEOUT)
        .expect("a line for the new message");
    assert_eq!(line, r#"0. from HOST to SELF: "hi there""#);
    kill_child(child);
}

#[test]
fn threads_hold_the_original_and_its_replies() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["send", "alice", "hello alice"]);
    node.ok(["send", "alice", "unrelated"]);

    let alice_inbox = node.inbox(&["--as", "alice"]);
    let original = &alice_inbox[0];
    assert_eq!(original["text"], "hello alice");
    assert!(original["reply_to"].is_null());
    let id = original["message_id"].as_str().unwrap().to_owned();

    // The sender's copy carries the same message id.
    let host_inbox = node.inbox(&[]);
    assert_eq!(host_inbox[0]["message_id"], original["message_id"]);
    assert_ne!(host_inbox[1]["message_id"], original["message_id"]);

    // capstan reply 0 "thanks" --as alice
    let r = node.json(["reply", "0", "thanks", "--as", "alice"]);
    assert_eq!(r, json!({"number": 2}), "alice's copy of her reply");

    for who in [&["--as", "alice"][..], &[][..]] {
        let mut args = vec!["--thread", id.as_str()];
        args.extend_from_slice(who);
        let thread = node.inbox(&args);
        assert_eq!(
            texts(&thread),
            ["hello alice", "thanks"],
            "thread {who:?}: {thread:?}"
        );
        assert_eq!(thread[0]["message_id"], id.as_str());
        assert!(thread[0]["reply_to"].is_null());
        assert_eq!(thread[1]["reply_to"], id.as_str());
        for m in &thread {
            check_message_shape(m);
        }
    }
    let host_thread = node.inbox(&["--thread", &id]);
    assert_eq!(host_thread[1]["from"], "alice");

    // An unknown thread id is a filter that matches nothing: an empty list
    // (CLI.md); a malformed one is an error.
    let unknown = "0".repeat(32);
    assert_eq!(
        node.json(["inbox", "--thread", &unknown]),
        json!([]),
        "unknown thread"
    );
    let (code, _) = node.fail(["inbox", "--thread", "not-hex"]);
    assert_eq!(code, 1);
    let (code, _) = node.fail(["reply", "99", "nope", "--as", "alice"]);
    assert_eq!(code, 3, "no message 99");
}

#[test]
fn request_wait_resolve_and_reject() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["store", "--json", r#"{"k":[1,2,3]}"#, "--name", "cfg"]);

    // A waiter blocks until the host resolves.
    let waiter = node.spawn([
        "--json",
        "request",
        "HOST",
        "config please",
        "--name",
        "cfg",
        "--wait",
        "--as",
        "alice",
    ]);
    let number = wait_for_request(&node, "config please");
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(300));
    node.ok(["resolve", &number.to_string(), "cfg"]);
    let r = wait_child(waiter, Duration::from_secs(30), "request --wait (resolved)");
    assert!(r.success(), "{r}");
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["state"], "resolved", "{v}");
    assert!(is_formula_id(&v["id"]), "{v}");
    assert_eq!(v["id"], node.json(["show", "cfg"])["id"]);
    assert!(t0.elapsed() < Duration::from_secs(20));
    let cfg = node.json(["cat", "cfg", "--as", "alice"]);
    assert_eq!(cfg["kind"], "json");
    assert_eq!(cfg["text"], r#"{"k":[1,2,3]}"#);

    // A rejection ends the waiter with exit 1 and the reason.
    let waiter = node.spawn(["request", "HOST", "the keys", "--wait", "--as", "alice"]);
    let number = wait_for_request(&node, "the keys");
    node.ok(["reject", &number.to_string(), "not today"]);
    let r = wait_child(waiter, Duration::from_secs(30), "request --wait (rejected)");
    assert_eq!(r.code, Some(1), "{r}");
    capstan_tests::assert_cli_error(&r);
    assert!(r.stderr.contains("not today"), "{r}");
    let m = node
        .inbox(&[])
        .into_iter()
        .find(|m| m["description"] == "the keys")
        .unwrap();
    assert_eq!(m["state"], "rejected: not today");

    // Settled requests stay settled.
    let (code, _) = node.fail(["resolve", &number.to_string(), "cfg"]);
    assert_eq!(code, 1);
    let (code, _) = node.fail(["reject", &number.to_string(), "again"]);
    assert_eq!(code, 1);
    // Resolving a package is an error.
    node.ok(["send", "alice", "just text"]);
    let pkg = node.inbox(&[]).last().unwrap()["number"].as_u64().unwrap();
    let (code, _) = node.fail(["resolve", &pkg.to_string(), "cfg"]);
    assert_eq!(code, 1);

    // dismiss removes a message.
    let before = node.inbox(&[]).len();
    assert_eq!(
        node.json(["dismiss", &pkg.to_string()]),
        json!({"dismissed": pkg})
    );
    assert_eq!(node.inbox(&[]).len(), before - 1);
    let (code, _) = node.fail(["dismiss", &pkg.to_string()]);
    assert_eq!(code, 3, "dismissed already: no such message");
}

/// Waits until the host's inbox holds a request with `description`; its number.
fn wait_for_request(node: &Node, description: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = node
            .inbox(&[])
            .into_iter()
            .find(|m| m["description"] == description)
        {
            assert_eq!(m["state"], "pending");
            return m["number"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "request {description:?} never arrived"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn message_text_round_trips() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["store", "--text", "v", "--name", "val"]);

    let text =
        "héllo ✓ 日本語 🦀 \"quoted\" 'single' \\ tab\there\nnew line; @@handle; a@b.c; x-@y";
    let expected =
        "héllo ✓ 日本語 🦀 \"quoted\" 'single' \\ tab\there\nnew line; @handle; a@b.c; x-@y";
    node.ok(["send", "alice", text]);
    let m = &node.inbox(&["--as", "alice"])[0];
    assert_eq!(m["text"], expected);
    assert_eq!(m["strings"], json!([expected]));
    assert_eq!(m["names"], json!([]));

    // References: default edge name, suggested edge name, special names.
    node.ok([
        "send",
        "alice",
        "@val first, then @val:renamed, (@val) and @@val",
    ]);
    let m = &node.inbox(&["--as", "alice"])[1];
    assert_eq!(m["names"], json!(["val", "renamed", "val"]));
    assert_eq!(
        m["strings"],
        json!(["", " first, then ", ", (", ") and @val"])
    );
    assert_eq!(m["text"], "@val first, then @renamed, (@val) and @val");
    node.ok(["adopt", "1", "renamed", "--as", "alice"]);
    assert_eq!(node.ok(["cat", "renamed", "--as", "alice"]), "v");

    // A reference to an unknown name is an error naming it, and sends nothing.
    let before = node.inbox(&["--as", "alice"]);
    let (code, err) = node.fail(["send", "alice", "see @missing"]);
    assert_eq!(code, capstan_tests::user_error_exit(&err), "{err}");
    assert!(err.contains("missing"), "{err}");
    let (code, _) = node.fail(["send", "nobody", "hi"]);
    assert_eq!(code, 3, "no agent named nobody");
    assert_eq!(node.inbox(&["--as", "alice"]), before);
}
