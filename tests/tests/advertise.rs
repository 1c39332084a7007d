//! Addresses that work across hosts (issue 17): `start --advertise`, no
//! wildcard address in locators, IPv6.

use capstan_tests::Node;

/// The locator `locate --json NAME` prints on `node`.
fn locate(node: &Node, name: &str) -> String {
    let v = node.json(["locate", name]);
    let l = v["locator"]
        .as_str()
        .expect("locate --json gives a locator");
    assert!(l.starts_with("capstan://"), "locator: {l}");
    l.to_string()
}

/// The `at=` address hints of a locator.
fn hints(locator: &str) -> Vec<String> {
    let at = locator.split_once("?at=").expect("?at=").1;
    at.split(',').map(str::to_string).collect()
}

fn no_wildcard(text: &str) {
    for bad in ["0.0.0.0", "[::]"] {
        assert!(!text.contains(bad), "advertises {bad}: {text}");
    }
}

/// The port the home remembers it is bound to.
fn bound_port(node: &Node) -> u16 {
    let listen = std::fs::read_to_string(node.home().join("listen")).expect("<home>/listen");
    listen
        .trim()
        .parse::<std::net::SocketAddr>()
        .expect("listen holds HOST:PORT")
        .port()
}

/// Home entries, to check a refused start changed nothing.
fn entries(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(node.home())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn wildcard_listen_without_advertise_is_refused() {
    let a = Node::new();
    let before = entries(&a);
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (code, err) = a.fail(["start", "--listen", listen]);
        assert_eq!(code, 1, "start --listen {listen}");
        assert!(err.contains("--advertise"), "{err}");
        assert!(err.contains("every interface"), "{err}");
    }
    assert_eq!(entries(&a), before, "a refused start changed the home");
    assert!(a.run(["ping"]).code != Some(0), "no daemon runs");
}

#[test]
fn advertised_host_with_the_bound_port() {
    let mut a = Node::new();
    a.start_with(&["--listen", "0.0.0.0:0", "--advertise", "127.0.0.1"]);
    let port = bound_port(&a);
    assert_ne!(port, 0);
    a.ok(["store", "--text", "far away", "--name", "doc"]);
    let l = locate(&a, "doc");
    no_wildcard(&l);
    assert_eq!(hints(&l), vec![format!("127.0.0.1:{port}")], "{l}");

    // Invitations name the advertised address too.
    let inv = a.json(["invite", "friend"]);
    let inv = inv["invitation"]
        .as_str()
        .expect("invite --json")
        .to_string();
    no_wildcard(&inv);
    assert_eq!(hints(&inv), vec![format!("127.0.0.1:{port}")], "{inv}");

    // The human start line says what others dial.
    let status = a.ok(["status"]);
    assert!(
        status.contains(&format!("advertised    127.0.0.1:{port}")),
        "{status}"
    );

    let mut b = Node::new();
    b.start();
    b.ok(["adopt-locator", &l, "--name", "doc"]);
    assert_eq!(b.ok(["cat", "doc"]), "far away");

    // Remembered: a plain restart listens and advertises the same.
    a.stop();
    a.start();
    assert_eq!(bound_port(&a), port);
    let again = locate(&a, "doc");
    assert_eq!(hints(&again), vec![format!("127.0.0.1:{port}")]);
    assert_eq!(b.ok(["cat", "doc"]), "far away", "B reconnects");
}

#[test]
fn several_advertised_addresses_with_ports() {
    let mut a = Node::new();
    a.start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--advertise",
        "node-a.example:7401,127.0.0.1",
    ]);
    let port = bound_port(&a);
    a.ok(["store", "--text", "x", "--name", "x"]);
    let l = locate(&a, "x");
    assert_eq!(
        hints(&l),
        vec![
            "node-a.example:7401".to_string(),
            format!("127.0.0.1:{port}")
        ],
        "{l}"
    );
}

#[test]
fn ipv6_loopback_end_to_end() {
    let mut a = Node::new();
    a.start_with(&["--listen", "[::1]:0"]);
    let port = bound_port(&a);
    a.ok(["store", "--text", "over v6", "--name", "doc"]);
    let l = locate(&a, "doc");
    assert_eq!(hints(&l), vec![format!("[::1]:{port}")], "{l}");

    // A node that only dials, and one listening on IPv6 too.
    let mut b = Node::new();
    b.start();
    b.ok(["adopt-locator", &l, "--name", "doc"]);
    assert_eq!(b.ok(["cat", "doc"]), "over v6");
    let mut c = Node::new();
    c.start_with(&["--listen", "[::1]:0"]);
    c.ok(["adopt-locator", &l, "--name", "doc"]);
    assert_eq!(c.ok(["cat", "doc"]), "over v6");

    // An IPv6 wildcard with an advertised IPv6 address.
    let mut d = Node::new();
    d.start_with(&["--listen", "[::]:0", "--advertise", "[::1]"]);
    let dport = bound_port(&d);
    d.ok(["store", "--text", "dual", "--name", "doc"]);
    let l = locate(&d, "doc");
    assert_eq!(hints(&l), vec![format!("[::1]:{dport}")], "{l}");
    b.ok(["adopt-locator", &l, "--name", "dual"]);
    assert_eq!(b.ok(["cat", "dual"]), "dual");
}

#[test]
fn bad_advertise_values_are_refused_and_change_nothing() {
    let a = Node::new();
    let before = entries(&a);
    for bad in [
        "0.0.0.0",
        "0.0.0.0:7401",
        "[::]:7401",
        "::",
        "127.0.0.1:0",
        "127.0.0.1:",
        "127.0.0.1:99999",
        "host:port",
        "::1:x",
        "[::1",
        "not a host",
        "10.0.0.256",
        "",
    ] {
        let (code, err) = a.fail(["start", "--listen", "127.0.0.1:0", "--advertise", bad]);
        assert_eq!(code, 1, "--advertise {bad:?}: {err}");
        assert!(err.contains("--advertise"), "{err}");
    }
    // --advertise needs a listen address.
    let (code, err) = a.fail(["start", "--advertise", "127.0.0.1:7401"]);
    assert_eq!(code, 1);
    assert!(err.contains("--listen"), "{err}");
    assert_eq!(entries(&a), before, "a refused start changed the home");

    // On a running node's home, a refused restart changes nothing either.
    let mut b = Node::new();
    b.start_with(&["--listen", "127.0.0.1:0", "--advertise", "127.0.0.1"]);
    b.stop();
    let advertise = std::fs::read_to_string(b.home().join("advertise")).unwrap();
    let (code, _) = b.fail(["start", "--advertise", "0.0.0.0"]);
    assert_eq!(code, 1);
    assert_eq!(
        std::fs::read_to_string(b.home().join("advertise")).unwrap(),
        advertise
    );
    assert!(b.run(["ping"]).code != Some(0), "no daemon runs");
}
