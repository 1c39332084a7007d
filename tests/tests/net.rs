//! Capabilities between nodes (issue 3): two daemons with their own homes
//! and clusters, QUIC on loopback; locators, restarts, revocation and bad
//! input.

use capstan_tests::Node;

/// A node listening on a free loopback port (remembered for restarts).
fn listening() -> Node {
    let mut n = Node::new();
    n.start_with(&["--listen", "127.0.0.1:0"]);
    n
}

fn locate(node: &Node, name: &str) -> String {
    let v = node.json(["locate", name]);
    let l = v["locator"]
        .as_str()
        .expect("locate --json gives a locator");
    assert!(l.starts_with("capstan://"), "locator: {l}");
    assert!(l.contains("?at=127.0.0.1:"), "locator: {l}");
    l.to_string()
}

#[test]
fn locators_work_across_restarts_until_cancelled() {
    let mut a = listening();
    let mut b = listening();
    a.ok(["store", "--text", "report", "--name", "report"]);
    let locator = locate(&a, "report");
    // Only the hash of the swiss is in A's home: the locator's secret is not.
    let swiss = locator
        .split('/')
        .nth(3)
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let raw = capstan_proto::locator::decode32(swiss, "swiss").unwrap();
    let store = std::fs::read(a.home().join("store.redb")).unwrap();
    assert!(
        !store.windows(32).any(|w| w == raw),
        "the swiss number appears in A's store"
    );

    b.ok(["adopt-locator", &locator, "--name", "r"]);
    assert_eq!(b.ok(["cat", "r"]), "report", "fetched from A over QUIC");
    let shown = b.json(["show", "r"]);
    assert_eq!(shown["type"], "remote");
    assert!(
        shown["detail"].as_str().unwrap().contains("value"),
        "show r: {shown}"
    );

    // A dies and comes back: B reconnects on demand.
    a.kill9();
    let (code, err) = b.fail(["cat", "r"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot reach") || err.contains("lost the connection"),
        "{err}"
    );
    a.start();
    assert_eq!(b.ok(["cat", "r"]), "report");

    // B dies and comes back: its remote formula is durable.
    b.kill9();
    b.start();
    assert_eq!(b.ok(["cat", "r"]), "report");
    b.ok(["adopt-locator", &locator, "--name", "r2"]);

    // Revocation: the live capability fails, and so does a new restore.
    let revoked = a.json(["cancel", "report"]);
    assert_eq!(revoked["revoked"], 1, "cancel --json: {revoked}");
    for name in ["r", "r2"] {
        let (code, err) = b.fail(["cat", name]);
        assert_eq!(code, 1);
        assert!(err.contains("revoked"), "cat {name} after cancel: {err}");
    }
    // A's own name still works; a new locator works again.
    assert_eq!(a.ok(["cat", "report"]), "report");
    let fresh = locate(&a, "report");
    assert_ne!(fresh, locator, "each locate issues a new swiss number");
    b.ok(["adopt-locator", &fresh, "--name", "r3"]);
    assert_eq!(b.ok(["cat", "r3"]), "report");
}

#[test]
fn bad_locators_are_refused_and_change_nothing() {
    let a = listening();
    let b = listening();
    a.ok(["store", "--text", "secret", "--name", "s"]);
    let good = locate(&a, "s");
    let before = b.names(&[]);

    for bad in [
        "garbage",
        "capstan://short/short?at=127.0.0.1:1",
        &good.replace("?at=", "?to="),
        &good.replace("127.0.0.1:", "127.0.0.1:x"),
    ] {
        let (code, err) = b.fail(["adopt-locator", bad, "--name", "x"]);
        assert_eq!(code, 1, "adopt-locator {bad:?}");
        assert!(
            err.contains("locator") || err.contains("capstan://"),
            "{err}"
        );
    }
    assert_eq!(b.names(&[]), before, "refused locators changed B's names");

    // A locator of the right shape is checked with its cluster before it
    // is named: each of these fails at adopt-locator, naming nothing.
    // Right cluster, unknown swiss (a forged secret):
    let parts: Vec<&str> = good.splitn(5, '/').collect();
    let (cluster, rest) = (parts[2], parts[3]);
    let query = rest.split_once('?').unwrap().1;
    let forged = format!("capstan://{cluster}/{}?{query}", "a".repeat(52));
    let (code, err) = b.fail(["adopt-locator", &forged, "--name", "forged"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown or revoked locator"), "{err}");
    assert!(err.contains("nothing was named"), "{err}");

    // The locator's cluster id does not match the node at the address.
    let other = listening();
    let elsewhere = locate(&other, "SELF");
    let other_cluster = elsewhere.split('/').nth(2).unwrap();
    let wrong = good.replacen(cluster, other_cluster, 1);
    let (code, err) = b.fail(["adopt-locator", &wrong, "--name", "wrong"]);
    assert_eq!(code, 1);
    assert!(err.contains("belongs to cluster"), "{err}");
    assert!(err.contains("nothing was named"), "{err}");

    // Nothing listens at the address (a cluster B has no connection to):
    // it cannot be checked, so it is not named either.
    let lone = listening();
    let unreachable = locate(&lone, "SELF");
    let nowhere = unreachable.replace(unreachable.split("?at=").nth(1).unwrap(), "127.0.0.1:9");
    let (code, err) = b.fail(["adopt-locator", &nowhere, "--name", "nowhere"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(err.contains("nothing was named"), "{err}");
    assert_eq!(b.names(&[]), before, "unchecked locators changed B's names");

    // A revoked locator is refused at adopt time too.
    a.ok(["store", "--text", "gone", "--name", "gone"]);
    let gone = locate(&a, "gone");
    a.ok(["cancel", "gone"]);
    let (code, err) = b.fail(["adopt-locator", &gone, "--name", "gone"]);
    assert_eq!(code, 1);
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(b.names(&[]), before);

    // Both nodes still serve, and the good locator still works.
    b.ok(["adopt-locator", &good, "--name", "good"]);
    assert_eq!(b.ok(["cat", "good"]), "secret");
    assert_eq!(a.ok(["cat", "s"]), "secret");
}

#[test]
fn locate_needs_a_listening_node() {
    let n = Node::started();
    n.ok(["store", "--text", "x", "--name", "x"]);
    let (code, err) = n.fail(["locate", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("--listen"), "{err}");
    let (code, err) = n.fail(["locate", "nope"]);
    assert_eq!(code, 1);
    assert!(!err.is_empty());
}
