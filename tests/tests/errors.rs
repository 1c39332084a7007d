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
    let cases: &[&[&str]] = &[
        &["store", "--text", "x", "--name", "Bad_Name"],
        &["store", "--text", "x", "--name", ""],
        &["store", "--text", "x", "--name", "a..b"],
        &["store", "--text", "x", "--name", "trailing."],
        &["store", "--json", "{oops", "--name", "j"],
        &["store", "--json", "", "--name", "j"],
        &["store", "--json", "{} {}", "--name", "j"],
        &["store", "--file", "/nonexistent/file", "--name", "f"],
        &["adopt", "99", "x"],
        &["adopt", "0", "nosuchedge", "--as", "alice"],
        &[
            "adopt", "0", "greeting", "--name", "Bad_Name", "--as", "alice",
        ],
        &["resolve", "99", "greeting"],
        &["reject", "99", "no"],
        &["dismiss", "99"],
        &["reply", "99", "hi"],
        &["mkguest", "Bad_Name"],
        &["mkdir", "UPPER"],
        &["show", "nosuch"],
        &["cat", "nosuch"],
        &["cat", "alice"],
        &["send", "greeting", "not an agent"],
        &["request", "nosuch", "x"],
        &["inbox", "--as", "greeting"],
    ];
    for args in cases {
        let (code, err) = node.fail(*args);
        assert_eq!(code, 1, "{args:?}: {err}");
        // The same error format with --json.
        let (code, _) = node.fail_json(*args);
        assert_eq!(code, 1, "--json {args:?}");
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
