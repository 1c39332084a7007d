//! The command line says what happened (issue 19): size limits named with
//! what to do instead, `@word`s that name nothing, a line for every command
//! that changes something, a rejected promise. (Elsewhere: a reused
//! invitation in federation.rs, MAIL and NONE in `list` and the demo in
//! cli.rs, locators checked at adopt time in net.rs.)

use capstan_tests::{Node, assert_cli_error, is_formula_id, is_hex};
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;
const KIB: usize = 1024;

fn with_alice() -> Node {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["store", "--text", "v", "--name", "v"]);
    node
}

/// Everything a user can observe of the node's state.
fn snapshot(node: &Node) -> (Value, Value, Value, Value) {
    (
        node.json(["list"]),
        node.json(["list", "--as", "alice"]),
        node.json(["inbox"]),
        node.json(["inbox", "--as", "alice"]),
    )
}

/// The number of the host's request with `description`.
fn request_number(node: &Node, description: &str) -> String {
    node.inbox(&[])
        .iter()
        .find(|m| m["description"] == description)
        .unwrap_or_else(|| panic!("no request {description:?}"))["number"]
        .as_u64()
        .unwrap()
        .to_string()
}

#[test]
fn size_limits_are_named_with_what_to_do() {
    let node = with_alice();
    node.ok(["request", "HOST", "a request", "--as", "alice"]);
    let n = request_number(&node, "a request");
    let before = snapshot(&node);

    // One value: at most 8 MiB.
    let big = vec![b'x'; 8 * MIB + 1];
    let r = node.run_stdin(["store", "--stdin", "--name", "huge"], Some(&big));
    assert_eq!(r.code, Some(1), "{r}");
    assert_cli_error(&r);
    for words in ["8 MiB", "8388608 bytes", "split it into several values"] {
        assert!(r.stderr.contains(words), "no {words:?} in: {}", r.stderr);
    }
    let file = node.home().join("huge.bin");
    std::fs::write(&file, &big).unwrap();
    let (code, err) = node.fail(["store", "--file", file.to_str().unwrap(), "--name", "huge"]);
    assert_eq!(code, 1);
    assert!(err.contains("over the limit of 8 MiB"), "{err}");

    // The text of one message: at most 64 KiB.
    let long = "a".repeat(64 * KIB + 1);
    let (code, err) = node.fail(["send", "alice", &long]);
    assert_eq!(code, 1);
    for words in ["64 KiB", "65536 bytes", "capstan store --file", "@NAME"] {
        assert!(err.contains(words), "no {words:?} in: {err}");
    }
    let (code, err) = node.fail(["reply", "0", &long, "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("64 KiB"), "{err}");
    let (code, err) = node.fail(["request", "HOST", &long, "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(err.contains("the description is 64.0 KiB"), "{err}");
    let (code, err) = node.fail(["reject", &n, &long]);
    assert_eq!(code, 1);
    assert!(err.contains("the reason is"), "{err}");
    // At most 64 references.
    let many = vec!["@v"; 65].join(" ");
    let (code, err) = node.fail(["send", "alice", &many]);
    assert_eq!(code, 1);
    assert!(err.contains("65 references") && err.contains("64"), "{err}");
    assert_eq!(
        snapshot(&node),
        before,
        "a refused command changed something"
    );

    // At the limits exactly: accepted.
    let exact = vec![b'y'; 8 * MIB];
    let r = node.run_stdin(["store", "--stdin", "--name", "exact"], Some(&exact));
    assert!(r.success(), "{r}");
    assert_eq!(node.ok_bytes(["cat", "exact"]).len(), 8 * MIB);
    node.ok(["send", "alice", &"b".repeat(64 * KIB)]);
    node.ok(["send", "alice", &vec!["@v"; 64].join(" ")]);

    // And the help says so.
    for (cmd, words) in [
        ("store", "8 MiB"),
        ("send", "64 KiB"),
        ("reply", "64 KiB"),
        ("request", "64 KiB"),
        ("reject", "64 KiB"),
    ] {
        let help = node.ok([cmd, "--help"]);
        assert!(
            help.contains(words),
            "`capstan {cmd} --help` lacks {words:?}:\n{help}"
        );
    }
}

#[test]
fn at_words_that_name_nothing_are_errors() {
    let node = with_alice();
    node.ok(["mkdir", "docs"]);
    node.ok(["store", "--text", "A", "--name", "docs.a"]);
    let before = snapshot(&node);

    // Not a name at all: refused before anything is sent.
    let (code, err) = node.fail(["send", "alice", "see @Report"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`@Report` refers to no name"), "{err}");
    assert!(err.contains("write @@Report for a literal @"), "{err}");
    let (code, err) = node.fail(["send", "alice", "see @HOST.Greeting"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("@@HOST.Greeting"), "{err}");
    // A name the sender does not have.
    let (code, err) = node.fail(["send", "alice", "see @report"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no name \"report\""), "{err}");
    assert!(err.contains("write @@report for a literal @"), "{err}");
    let (code, err) = node.fail(["send", "alice", "see @docs.b"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("@@docs.b"), "{err}");
    // `@HOST.greeting` is the path HOST.greeting (not HOST, then text).
    let (code, err) = node.fail(["send", "alice", "look: @HOST.greeting"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"HOST.greeting\" is a host"), "{err}");
    let (code, _) = node.fail(["reply", "0", "@Nope", "--as", "alice"]);
    assert_eq!(code, 1);
    assert_eq!(snapshot(&node), before, "a refused send changed something");

    // `@@` writes a literal `@`; a path joins names with `.`.
    node.ok(["send", "alice", "see @@Report and @docs.a, then @v."]);
    let m = node.inbox(&["--as", "alice"]).pop().unwrap();
    assert_eq!(m["text"], "see @Report and @a, then @v.", "{m}");
    assert_eq!(m["names"], json!(["a", "v"]), "{m}");
    assert_eq!(m["strings"], json!(["see @Report and ", ", then ", "."]));
    let n = m["number"].as_u64().unwrap().to_string();
    node.ok(["adopt", &n, "a", "--as", "alice"]);
    assert_eq!(node.ok(["cat", "a", "--as", "alice"]), "A");
    // Literal `@`s stay literal: inside a word, before a space, at the end.
    node.ok(["send", "alice", "mail a@b.c @ noon, or @-) me@"]);
    let m = node.inbox(&["--as", "alice"]).pop().unwrap();
    assert_eq!(m["text"], "mail a@b.c @ noon, or @-) me@", "{m}");
    assert_eq!(m["names"], json!([]));
}

/// The id in a line `… (id HEX)`.
fn id_in(line: &str) -> String {
    let id = line
        .trim_end()
        .strip_suffix(')')
        .and_then(|l| l.rsplit_once("(id "))
        .unwrap_or_else(|| panic!("no `(id HEX)` in {line:?}"))
        .1;
    assert!(is_hex(id, 64), "{line:?}");
    id.to_string()
}

#[test]
fn commands_say_what_they_did() {
    let node = Node::started();

    // Made things: a line naming what was made, and its id.
    let out = node.ok(["mkguest", "alice"]);
    assert!(out.starts_with("made guest alice (id "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(node.json(["show", "alice"])["id"], id_in(&out));
    let out = node.ok(["mkhost", "boss"]);
    assert!(out.starts_with("made host boss (id "), "{out}");
    let out = node.ok(["mkdir", "docs"]);
    assert!(out.starts_with("made directory docs (id "), "{out}");
    let out = node.ok(["store", "--text", "hello", "--name", "greeting"]);
    assert!(
        out.starts_with("stored greeting: text, 5 bytes (id "),
        "{out}"
    );
    assert_eq!(node.json(["show", "greeting"])["id"], id_in(&out));
    // --json stays one object with the id.
    let v = node.json(["mkguest", "bob"]);
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    assert!(is_formula_id(&v["id"]), "{v}");

    // Changed names.
    assert_eq!(
        node.ok(["move", "greeting", "docs.g"]),
        "moved greeting to docs.g\n"
    );
    assert_eq!(
        node.ok(["copy", "docs.g", "g2"]),
        "copied docs.g to g2 (both name the same thing)\n"
    );
    assert_eq!(node.ok(["remove", "g2"]), "removed the name g2\n");
    assert_eq!(node.json(["rm", "docs.g"]), json!({"removed": "docs.g"}));
    node.ok(["store", "--text", "hello", "--name", "greeting"]);

    // Requests answered.
    node.ok([
        "request",
        "HOST",
        "need a doc",
        "--name",
        "doc",
        "--as",
        "alice",
    ]);
    let n = request_number(&node, "need a doc");
    assert_eq!(
        node.ok(["resolve", &n, "greeting"]),
        format!("resolved request {n} with greeting\n")
    );
    node.ok(["request", "HOST", "the keys", "--as", "alice"]);
    let n = request_number(&node, "the keys");
    assert_eq!(
        node.ok(["reject", &n, "not", "today"]),
        format!("rejected request {n}: not today\n")
    );
    node.ok(["request", "HOST", "more", "--as", "alice"]);
    let n = request_number(&node, "more");
    assert_eq!(
        node.json(["reject", &n]),
        json!({"number": n.parse::<u64>().unwrap(), "rejected": ""})
    );
    node.ok(["request", "HOST", "again", "--as", "alice"]);
    let n = request_number(&node, "again");
    assert_eq!(
        node.ok(["reject", &n]),
        format!("rejected request {n} (no reason given)\n")
    );
    assert_eq!(node.ok(["dismiss", &n]), format!("dismissed message {n}\n"));
}

#[test]
fn a_rejected_promise_says_so() {
    let mut node = with_alice();
    node.ok([
        "request",
        "HOST",
        "need a doc",
        "--name",
        "doc",
        "--as",
        "alice",
    ]);
    node.ok([
        "request", "HOST", "anything", "--name", "any", "--as", "alice",
    ]);
    node.ok([
        "request", "HOST", "later", "--name", "later", "--as", "alice",
    ]);
    let (code, err) = node.fail(["cat", "later", "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("later is a request that is still pending"),
        "{err}"
    );
    node.ok(["reject", &request_number(&node, "need a doc"), "not today"]);
    node.ok(["reject", &request_number(&node, "anything")]);

    // Also long after (here: after a restart), the reason is kept.
    node.stop();
    node.start();
    let (code, err) = node.fail(["cat", "doc", "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("doc is a request that was rejected: not today"),
        "{err}"
    );
    assert!(!err.contains("nothing to show yet"), "{err}");
    let (code, err) = node.fail(["cat", "any", "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("any is a request that was rejected: no reason given"),
        "{err}"
    );
    assert_eq!(
        node.json(["show", "doc", "--as", "alice"])["detail"],
        "rejected: not today"
    );
}
