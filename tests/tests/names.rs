//! Pet names: confinement of guests, and move/copy/remove across directories.

use std::collections::BTreeSet;

use capstan_tests::{Node, is_formula_id};
use serde_json::{Value, json};

fn lower_names(names: &BTreeSet<String>) -> BTreeSet<String> {
    names
        .iter()
        .filter(|n| !n.chars().all(|c| c.is_ascii_uppercase()))
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn guests_cannot_reach_their_hosts_names() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    node.ok(["store", "--text", "secret", "--name", "greeting"]);
    node.ok(["mkdir", "private"]);
    node.ok(["store", "--text", "deeper", "--name", "private.note"]);

    // alice was not given greeting: to her it does not exist.
    let (code, err) = node.fail(["cat", "greeting", "--as", "alice"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("greeting"),
        "the error names the unknown name: {err}"
    );
    node.fail(["show", "greeting", "--as", "alice"]);
    node.fail(["cat", "private.note", "--as", "alice"]);

    // Not through her HOST either.
    let r = node.run(["cat", "HOST.greeting", "--as", "alice"]);
    assert!(
        !r.success(),
        "a guest read its host's names through HOST: {r}"
    );
    // HOST is an agent, not a directory: listing it is refused (CLI.md).
    let (code, err) = node.fail(["--json", "list", "HOST", "--as", "alice"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    assert!(!err.contains("greeting"), "{err}");
    let (code, err) = node.fail(["send", "HOST", "look: @greeting", "--as", "alice"]);
    assert_eq!(
        code, 1,
        "a guest sent a reference to its host's name: {err}"
    );
    // `@HOST.greeting` is the path HOST.greeting, which does not go
    // through an agent: refused, and nothing is sent.
    let before = node.inbox(&[]);
    let (code, err) = node.fail(["send", "HOST", "look: @HOST.greeting", "--as", "alice"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HOST.greeting"), "{err}");
    assert_eq!(
        node.inbox(&[]),
        before,
        "a refused send delivered something"
    );

    // alice's list shows only her names and her special names.
    let names = node.names(&["--as", "alice"]);
    assert!(lower_names(&names).is_empty(), "alice's names: {names:?}");
    assert!(
        names.contains("SELF") && names.contains("HOST"),
        "{names:?}"
    );
    let host_names = node.names(&[]);
    for n in ["alice", "greeting", "private", "SELF", "HOST"] {
        assert!(
            host_names.contains(n),
            "host names lack {n}: {host_names:?}"
        );
    }

    // A guest makes no guests or hosts.
    let (code, _) = node.fail(["mkguest", "bob", "--as", "alice"]);
    assert_eq!(code, 1);
    let (code, _) = node.fail(["mkhost", "bob", "--as", "alice"]);
    assert_eq!(code, 1);
    assert!(lower_names(&node.names(&["--as", "alice"])).is_empty());

    // --as needs an agent held by the root host.
    for target in ["greeting", "private", "nobody", "alice.nobody", "Bad_Name"] {
        let (code, err) = node.fail(["list", "--as", target]);
        assert_eq!(
            code,
            capstan_tests::user_error_exit(&err),
            "--as {target}: {err}"
        );
    }

    // What alice is given, she has; nothing else.
    node.ok(["send", "alice", "take @greeting"]);
    let n = node.inbox(&["--as", "alice"]).pop().unwrap()["number"].to_string();
    node.ok(["adopt", &n, "greeting", "--as", "alice"]);
    assert_eq!(
        lower_names(&node.names(&["--as", "alice"])),
        set(&["greeting"])
    );
    assert_eq!(node.ok(["cat", "greeting", "--as", "alice"]), "secret");
    node.fail(["cat", "private.note", "--as", "alice"]);

    // Her own names are her own: removing hers leaves the host's.
    node.ok(["remove", "greeting", "--as", "alice"]);
    assert_eq!(node.ok(["cat", "greeting"]), "secret");
    assert!(lower_names(&node.names(&["--as", "alice"])).is_empty());
}

#[test]
fn move_copy_remove_across_directories() {
    let node = Node::started();
    let dir = node.json(["mkdir", "docs"]);
    assert!(is_formula_id(&dir["id"]));
    let a = node.json(["store", "--text", "A", "--name", "docs.a"]);
    assert_eq!(node.names(&["docs"]), set(&["a"]));

    // move docs.a b
    assert_eq!(
        node.json(["move", "docs.a", "b"]),
        json!({"moved": "docs.a", "to": "b"})
    );
    assert!(node.names(&["docs"]).is_empty());
    let b = node.json(["show", "b"]);
    assert_eq!(b["id"], a["id"], "move keeps the id");
    assert_eq!(b["type"], "value");

    // copy b docs.c
    assert_eq!(
        node.json(["copy", "b", "docs.c"]),
        json!({"copied": "b", "to": "docs.c"})
    );
    assert_eq!(node.json(["show", "docs.c"])["id"], a["id"]);

    // remove b
    assert_eq!(node.json(["remove", "b"]), json!({"removed": "b"}));
    node.fail(["show", "b"]);
    assert_eq!(node.names(&["docs"]), set(&["c"]));
    assert_eq!(node.ok(["cat", "docs.c"]), "A");

    // list docs --json
    let list = node.json(["list", "docs"]);
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["name"], "c");
    assert_eq!(entries[0]["id"], a["id"]);
    assert_eq!(entries[0]["type"], "value");

    // Aliases.
    node.ok(["cp", "docs.c", "d"]);
    node.ok(["mv", "d", "docs.d"]);
    assert_eq!(node.names(&["docs"]), set(&["c", "d"]));
    node.ok(["rm", "docs.d"]);
    assert_eq!(node.ok(["ls", "docs"]), node.ok(["list", "docs"]));

    // Nested directories.
    node.ok(["mkdir", "docs.sub"]);
    node.ok(["move", "docs.c", "docs.sub.c"]);
    assert_eq!(node.ok(["cat", "docs.sub.c"]), "A");
    assert_eq!(node.names(&["docs.sub"]), set(&["c"]));

    // Errors change nothing.
    let before: Value = node.json(["list"]);
    let before_docs: Value = node.json(["list", "docs"]);
    let before_sub: Value = node.json(["list", "docs.sub"]);
    let cases: &[&[&str]] = &[
        &["move", "nope", "x"],
        &["copy", "nope", "x"],
        &["remove", "nope"],
        &["remove", "docs.nope"],
        &["move", "docs.sub.c", "nodir.c"],
        &["copy", "docs.sub.c", "nodir.c"],
        &["move", "docs.sub.c", "SELF"],
        &["move", "docs.sub.c", "HOST"],
        &["copy", "docs.sub.c", "NONE"],
        &["move", "SELF", "x"],
        &["move", "HOST", "x"],
        &["remove", "SELF"],
        &["remove", "HOST"],
        &["remove", "MAIL"],
        &["store", "--text", "x", "--name", "SELF"],
        &["store", "--text", "x", "--name", "docs.sub.c.x"],
        &["mkdir", "docs.sub.c.x"],
        &["list", "docs.sub.c"],
        &["list", "nope"],
        &["move", "docs.sub.c", "Bad_Name"],
        &["copy", "docs.sub.c", "a..b"],
    ];
    for args in cases {
        let (code, err) = node.fail(*args);
        assert_eq!(
            code,
            capstan_tests::user_error_exit(&err),
            "{args:?}: {err}"
        );
    }
    let (code, err) = node.fail(["move", "nope", "x"]);
    assert_eq!(code, 3, "an unknown name is exit 3: {err}");
    assert!(err.contains("nope"), "error names the unknown name: {err}");
    assert_eq!(node.json(["list"]), before);
    assert_eq!(node.json(["list", "docs"]), before_docs);
    assert_eq!(node.json(["list", "docs.sub"]), before_sub);
    assert_eq!(node.ok(["cat", "docs.sub.c"]), "A");
}

/// Issue 16: like `mv`, a directory cannot be moved into itself (that
/// would leave it and all it holds reachable by no name); the error says
/// so and nothing changes.
#[test]
fn moving_a_directory_into_itself_is_refused() {
    let node = Node::started();
    node.ok(["mkdir", "d"]);
    node.ok(["mkdir", "d.inner"]);
    node.ok(["store", "--text", "kept", "--name", "d.inner.x"]);
    let before = node.json(["list"]);
    let before_d = node.json(["list", "d"]);
    for (from, to) in [
        ("d", "d.inner"),
        ("d", "d.new"),
        ("d", "d.inner.deeper"),
        ("d.inner", "d.inner.y"),
    ] {
        let (code, err) = node.fail(["move", from, to]);
        assert_eq!(code, 1, "move {from} {to}: {err}");
        assert!(err.contains("into itself"), "move {from} {to}: {err}");
    }
    assert_eq!(node.json(["list"]), before);
    assert_eq!(node.json(["list", "d"]), before_d);
    assert_eq!(node.ok(["cat", "d.inner.x"]), "kept");
    // Moving it elsewhere, or onto its own name, still works.
    node.ok(["move", "d", "d"]);
    node.ok(["mkdir", "e"]);
    node.ok(["move", "d", "e.d"]);
    assert_eq!(node.ok(["cat", "e.d.inner.x"]), "kept");
}
