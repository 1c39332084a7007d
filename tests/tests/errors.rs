//! Bad input: a non-zero exit, one line `capstan: …` on stderr, and nothing
//! changed.

use capstan_tests::{Node, pid_alive};
use serde_json::Value;

/// Everything a user can observe of a node's state.
fn snapshot(node: &Node) -> (Value, Value, Value, Value) {
    (
        node.json(["list"]),
        node.json(["list", "--as", "alice"]),
        node.json(["inbox"]),
        node.json(["inbox", "--as", "alice"]),
    )
}

fn populated() -> Node {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["store", "--text", "hi", "--name", "greeting"]);
    node.ok(["send", "alice", "have @greeting"]);
    node
}

#[test]
fn bad_arguments_change_nothing() {
    let node = populated();
    let before = snapshot(&node);
    // Exit 1: bad input (or a refusal); 3: what it names does not exist
    // (`nodes/CLI.md`). With `--json` the error is also one JSON value on
    // stdout naming its kind.
    let not_found = 3;
    let cases: &[(&[&str], i32)] = &[
        (&["store", "--text", "x", "--name", "Bad_Name"], 1),
        (&["store", "--text", "x", "--name", ""], 1),
        (&["store", "--text", "x", "--name", "a..b"], 1),
        (&["store", "--text", "x", "--name", "trailing."], 1),
        (&["store", "--json", "{oops", "--name", "j"], 1),
        (&["store", "--json", "", "--name", "j"], 1),
        (&["store", "--json", "{} {}", "--name", "j"], 1),
        (&["store", "--file", "/nonexistent/file", "--name", "f"], 1),
        (&["adopt", "99", "x"], not_found),
        (&["adopt", "0", "nosuchedge", "--as", "alice"], 1),
        (
            &[
                "adopt", "0", "greeting", "--name", "Bad_Name", "--as", "alice",
            ],
            1,
        ),
        (&["resolve", "99", "greeting"], not_found),
        (&["reject", "99", "no"], not_found),
        (&["dismiss", "99"], not_found),
        (&["reply", "99", "hi"], not_found),
        (&["mkguest", "Bad_Name"], 1),
        (&["mkdir", "UPPER"], 1),
        (&["show", "nosuch"], not_found),
        (&["cat", "nosuch"], not_found),
        (&["cat", "alice"], 1),
        (&["send", "greeting", "not an agent"], 1),
        (&["request", "nosuch", "x"], not_found),
        (&["inbox", "--as", "greeting"], 1),
    ];
    for (args, expected) in cases {
        let (code, err) = node.fail(*args);
        assert_eq!(code, *expected, "{args:?}: {err}");
        // The same error format with --json, and the error on stdout.
        let r = node.run(capstan_tests::json_args(*args));
        assert_eq!(r.code, Some(*expected), "--json {args:?}: {r}");
        capstan_tests::assert_cli_error(&r);
        let v: Value = serde_json::from_slice(&r.stdout)
            .unwrap_or_else(|e| panic!("--json {args:?}: stdout is not one JSON value ({e}): {r}"));
        assert_eq!(v["error"]["exit"], *expected, "{v}");
        let kind = v["error"]["kind"].as_str().unwrap_or_default();
        if *expected == not_found {
            assert_eq!(kind, "not_found", "{args:?}: {v}");
        } else {
            assert!(
                ["invalid", "refused", "failed"].contains(&kind),
                "{args:?}: {v}"
            );
        }
        assert!(
            err.contains(v["error"]["message"].as_str().unwrap_or("?")),
            "the same message: {v} / {err}"
        );
        assert_eq!(snapshot(&node), before, "state changed by {args:?}");
    }
    let (_, err) = node.fail(["store", "--text", "x", "--name", "Bad_Name"]);
    assert!(err.contains("Bad_Name"), "error names the bad name: {err}");
    let (_, err) = node.fail(["adopt", "99", "x"]);
    assert!(err.contains("99"), "error names the message: {err}");

    // Usage errors: exit 1 too.
    for args in [
        &["frobnicate"][..],
        &["store", "--name", "x"][..],
        &["store", "--text", "a", "--json", "1", "--name", "x"][..],
        &["adopt", "notanumber", "x"][..],
        &["send"][..],
    ] {
        let r = node.run(args);
        assert_eq!(r.code, Some(1), "usage error {args:?}: {r}");
        assert!(
            r.stderr.contains("capstan"),
            "usage errors go to stderr: {r}"
        );
    }
    assert_eq!(snapshot(&node), before);
}

#[test]
fn oversized_value_is_refused() {
    let node = populated();
    let before = snapshot(&node);
    let big = vec![b'x'; 9 * 1024 * 1024];
    let r = node.run_stdin(["store", "--stdin", "--name", "huge"], Some(&big));
    assert_eq!(r.code, Some(1), "{r}");
    capstan_tests::assert_cli_error(&r);
    let file = node.home().join("huge.bin");
    std::fs::write(&file, &big).unwrap();
    let (code, _) = node.fail(["store", "--file", file.to_str().unwrap(), "--name", "huge"]);
    assert_eq!(code, 1);
    assert_eq!(snapshot(&node), before);
    // The daemon still works.
    node.ok(["store", "--text", "small", "--name", "small"]);
    assert_eq!(node.ok(["cat", "small"]), "small");
}

#[test]
fn second_daemon_on_the_same_home_is_refused() {
    let node = populated();
    let pid = node.daemon_pid();
    let before = snapshot(&node);
    let (code, err) = node.fail(["start"]);
    assert_eq!(code, 1, "{err}");
    // `start --foreground` is refused as well, without waiting forever.
    let r = node.run(["start", "--foreground"]);
    assert!(!r.success() && r.code.is_some(), "{r}");
    let ping = node.json(["ping"]);
    assert_eq!(ping["pid"], pid, "the first daemon still answers");
    assert!(pid_alive(pid));
    assert_eq!(snapshot(&node), before);
}

#[test]
fn corrupt_store_file_is_refused_and_left_alone() {
    let node = Node::new();
    let store = node.home().join("store.redb");
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&store, &garbage).unwrap();
    let (code, err) = node.fail(["start"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("store") || err.contains("redb") || err.contains("corrupt"),
        "the error says what is wrong: {err}"
    );
    assert_eq!(
        std::fs::read(&store).unwrap(),
        garbage,
        "the store file was changed"
    );
    // No daemon was left behind.
    let (code, _) = node.fail(["ping"]);
    assert_eq!(code, 2);
    // `start --foreground` fails the same way instead of serving.
    let r = node.run(["start", "--foreground"]);
    assert_ne!(r.code, Some(0), "{r}");
    assert_eq!(std::fs::read(&store).unwrap(), garbage);
}

/// A store file truncated to 0 bytes is refused with an error that says
/// so, instead of starting as an empty store in place of the lost one.
#[test]
fn an_empty_store_file_is_refused_not_taken_for_a_new_store() {
    let node = Node::new();
    let store = node.home().join("store.redb");
    std::fs::write(&store, b"").unwrap();
    let (code, err) = node.fail(["start"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("empty") && err.contains("backup"),
        "the error says what is wrong and what to do: {err}"
    );
    assert_eq!(
        std::fs::metadata(&store).unwrap().len(),
        0,
        "the file was changed"
    );
    let (code, _) = node.fail(["ping"]);
    assert_eq!(code, 2, "no daemon was left behind");
}

#[test]
fn no_daemon_means_exit_2() {
    // Never started.
    let node = Node::new();
    for args in [
        &["ping"][..],
        &["list"][..],
        &["inbox"][..],
        &["status"][..],
    ] {
        let (code, err) = node.fail(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("capstan start"), "{args:?}: {err}");
        let (code, _) = node.fail_json(args);
        assert_eq!(code, 2);
    }

    // Killed: a stale socket and pid file are left behind.
    let mut node = Node::started();
    node.kill9();
    let (code, err) = node.fail(["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("capstan start"), "{err}");
    // And `start` recovers from the leftovers.
    node.start();
    node.ok(["ping"]);
}

/// A client on the socket that sends a package the CLI's syntax could not
/// make (chunks that do not match its references, a bad edge name, too
/// many references) is refused with the rule it broke, and nothing is
/// delivered; a well-formed one through the same call goes through.
#[test]
fn a_malformed_package_on_the_socket_is_refused_and_changes_nothing() {
    let node = populated();
    let before = snapshot(&node);
    let many: Vec<(&str, &str)> = (0..65).map(|_| ("greeting", "g")).collect();
    let chunks = vec![""; 66];
    for (strings, refs, expect) in [
        (vec!["a", "b"], vec![], "one more text chunk"),
        (vec!["a"], vec![("greeting", "g")], "one more text chunk"),
        (
            vec!["a", "b"],
            vec![("greeting", "not a name")],
            "not a name",
        ),
        (chunks, many, "references"),
    ] {
        let e = capstan_tests::control::send_raw(&node, "alice", &strings, &refs)
            .expect_err("a malformed package is refused");
        assert!(e.contains(expect), "{expect:?} in {e}");
    }
    assert_eq!(snapshot(&node), before, "a refused send changed nothing");
    let n = capstan_tests::control::send_raw(&node, "alice", &["see ", ""], &[("greeting", "g")])
        .expect("a well-formed package goes through");
    let inbox = node.json(["inbox", "--as", "alice"]);
    assert!(
        inbox
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["names"] == serde_json::json!(["g"])),
        "{inbox} (sent as {n})"
    );
}
