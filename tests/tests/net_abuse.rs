//! Bad input on the QUIC port (issue 3, safety): garbage datagrams, a flood
//! of handshakes with certificates of no cluster, and repeated failed
//! restores. Each is refused; the node, its existing connections and its
//! data are unaffected.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use capstan_tests::Node;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Refused,
    TimedOut,
    Served,
}

fn listening() -> Node {
    let mut n = Node::new();
    n.start_with(&["--listen", "127.0.0.1:0"]);
    n
}

fn locate(node: &Node, name: &str) -> String {
    node.json(["locate", name])["locator"]
        .as_str()
        .expect("locate --json gives a locator")
        .to_string()
}

fn port_of(locator: &str) -> std::net::SocketAddr {
    locator
        .split("?at=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A QUIC client presenting a self-signed certificate (of no cluster).
fn rogue_client() -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["capstan".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(capstan_tests::rogue::AnyServer(provider)))
        .with_client_auth_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![b"capstan/1".to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[test]
fn garbage_and_rogue_handshakes_are_refused_and_change_nothing() {
    let a = listening();
    let b = listening();
    a.ok(["store", "--text", "fine", "--name", "v"]);
    let good = locate(&a, "v");
    let addr = port_of(&good);
    b.ok(["adopt-locator", &good, "--name", "v"]);
    assert_eq!(
        b.ok(["cat", "v"]),
        "fine",
        "B's connection is up before the abuse"
    );
    let names_before = a.names(&[]);

    // Garbage datagrams of every size, some looking like QUIC long headers.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000usize {
        let len = [1, 20, 1200, 1500, 9000, 65_000][i % 6];
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 {
            buf[0] = 0xc0; // long header, Initial
            if len >= 5 {
                buf[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
            }
        }
        let _ = sock.send_to(&buf, addr);
    }

    // A flood of handshakes with a certificate of no cluster: all refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(rogue_client());
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move {
                let c = match ep.connect(addr, "capstan") {
                    Ok(c) => c,
                    Err(_) => return Outcome::Refused,
                };
                match tokio::time::timeout(std::time::Duration::from_secs(20), c).await {
                    Ok(Ok(conn)) => {
                        // The client may finish its side of the handshake
                        // before the server checked the client certificate:
                        // then the server must close the connection, which
                        // the client sees once it sends something.
                        let probe = async {
                            let (mut send, mut recv) = conn.open_bi().await?;
                            send.write_all(b"not capnp").await?;
                            let mut buf = [0u8; 16];
                            recv.read(&mut buf).await?;
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                        };
                        match tokio::time::timeout(std::time::Duration::from_secs(15), probe).await
                        {
                            Ok(Err(_)) => Outcome::Refused,
                            Ok(Ok(())) => Outcome::Served,
                            Err(_) if conn.close_reason().is_some() => Outcome::Refused,
                            Err(_) => Outcome::Served,
                        }
                    }
                    Ok(Err(_)) => Outcome::Refused,
                    Err(_) => Outcome::TimedOut,
                }
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        ep.close(0u32.into(), b"");
        outcomes
    });
    let served = refused.iter().filter(|o| **o == Outcome::Served).count();
    let timed_out = refused.iter().filter(|o| **o == Outcome::TimedOut).count();
    assert_eq!(
        served, 0,
        "a connection with a certificate of no cluster was served"
    );
    // Under a flood the node may drop handshakes rather than answer them
    // (that is a refusal too), but most get an explicit one.
    assert!(
        timed_out < 150,
        "{timed_out} of 300 handshakes got no answer at all"
    );

    // A still serves B on its existing connection, its data is intact, and a
    // new node can still connect.
    assert_eq!(b.ok(["cat", "v"]), "fine");
    assert_eq!(a.names(&[]), names_before);
    assert_eq!(a.ok(["cat", "v"]), "fine");
    let c = listening();
    c.ok(["adopt-locator", &good, "--name", "v"]);
    assert_eq!(c.ok(["cat", "v"]), "fine");
}

#[test]
fn repeated_failed_restores_are_refused_and_the_good_locator_still_works() {
    let a = listening();
    let b = listening();
    a.ok(["store", "--text", "fine", "--name", "v"]);
    let good = locate(&a, "v");
    let parts: Vec<&str> = good.splitn(5, '/').collect();
    let query = parts[3].split_once('?').unwrap().1;
    // Guessing swiss numbers: each guess is refused (and costs the guesser
    // a delay; after 16 on one connection, A closes it).
    for i in 0..20 {
        let swiss = capstan_proto::locator::encode32(&[i as u8 + 1; 32]);
        let guess = format!("capstan://{}/{swiss}?{query}", parts[2]);
        let name = format!("guess{i}");
        // (checked with A at adopt time: refused, and nothing is named)
        let (code, err) = b.fail(["adopt-locator", &guess, "--name", &name]);
        assert_eq!(code, 1);
        assert!(
            err.contains("unknown or revoked locator") || err.contains("lost the connection"),
            "guess {i}: {err}"
        );
    }
    assert!(
        !b.names(&[]).iter().any(|n| n.starts_with("guess")),
        "a refused guess was named"
    );
    b.ok(["adopt-locator", &good, "--name", "v"]);
    assert_eq!(
        b.ok(["cat", "v"]),
        "fine",
        "B reconnects and the real locator works"
    );
    assert_eq!(a.ok(["cat", "v"]), "fine");
}

/// A peer that sends the header of a Cap'n Proto frame claiming 32 MiB (more
/// than any legitimate node-to-node message, less than the control
/// socket's 64 MiB) is cut off at once, before the node waits for or
/// allocates the data; the node goes on serving a well-behaved peer.
#[test]
fn a_frame_claiming_more_than_the_protocol_sends_is_refused_from_its_header() {
    let node = listening();
    node.ok(["store", "--text", "still here", "--name", "doc"]);
    let locator = locate(&node, "doc");
    let target: capstan_proto::Locator = locator.parse().expect("locator");
    let rogue = capstan_tests::rogue::RoguePeer::start();
    let words = (32u32 << 20) / 8;
    let took = rogue
        .claim_frame(&target, words, Duration::from_secs(5))
        .expect("the node refused the frame");
    assert!(took < Duration::from_secs(2), "refused only after {took:?}");
    // A claim within the limit is waited for (the limit is not zero).
    let small = rogue.claim_frame(&target, 1024, Duration::from_millis(500));
    assert!(small.is_err(), "a 8 KiB frame was refused: {small:?}");
    // The node still serves: another node reads the value over QUIC.
    let reader = Node::started();
    reader.ok(["adopt-locator", &locator, "--name", "d"]);
    assert_eq!(reader.ok(["cat", "d"]).trim(), "still here");
}

/// 40 connections from one hostile cluster, then 100 fresh clusters from one
/// other address: the node keeps at most 16 of the first and 64 of the
/// second, a well-behaved peer is served all the while, and the entries of
/// the clusters that left are gone afterwards (the metrics say how many
/// peer clusters the node keeps).
#[test]
fn one_cluster_or_one_address_cannot_take_every_connection() {
    let mut node = Node::new();
    node.start_with(&["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    node.ok(["store", "--text", "served", "--name", "doc"]);
    let locator = locate(&node, "doc");
    let target: capstan_proto::Locator = locator.parse().expect("locator");
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let kept = capstan_tests::rogue::flood(&target, 1, 40, loopback, Duration::from_millis(500));
    assert!(
        (1..=16).contains(&kept),
        "one cluster kept {kept} connections open"
    );
    let other = std::net::IpAddr::from([127, 0, 0, 2]);
    let flood = {
        let target = target.clone();
        std::thread::spawn(move || {
            capstan_tests::rogue::flood(&target, 100, 1, other, Duration::from_secs(3))
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // meanwhile, from 127.0.0.1, an ordinary peer
    let reader = Node::started();
    reader.ok(["adopt-locator", &locator, "--name", "d"]);
    assert_eq!(reader.ok(["cat", "d"]).trim(), "served");
    let kept = flood.join().expect("flood thread");
    assert!(
        (1..=64).contains(&kept),
        "one address kept {kept} connections open"
    );
    // The clusters that left leave no entries: only the reader's remains.
    let metrics_url = node.json(["status"])["metrics"]
        .as_str()
        .expect("status names the metrics URL")
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let peers = peer_clusters(&metrics_url);
        if peers <= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{peers} peer clusters still listed after the flood"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `capstan_peer_clusters` from the node's metrics endpoint.
fn peer_clusters(url: &str) -> u64 {
    use std::io::{Read, Write};
    let hostport = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let mut s = std::net::TcpStream::connect(hostport).expect("metrics endpoint");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("capstan_peer_clusters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no capstan_peer_clusters in {body}"))
}

/// 256 hostile connections (fresh cluster identities from four addresses,
/// 64 each: every per-address allowance) do not shut a known federation peer
/// out: the node keeps at most 192 connections of unknown clusters, and a
/// peer that restored one of its locators before connects and delivers
/// mail while the flood holds on.
#[test]
fn a_flood_of_unknown_clusters_does_not_shut_out_a_known_peer() {
    let a = listening();
    let mut b = listening();
    // b accepts a's invitation: b restores a locator of a (so a knows b).
    let v = a.json(["invite", "bob"]);
    let inv = v["invitation"].as_str().expect("invite --json").to_string();
    b.ok(["accept", &inv, "alice"]);
    b.ok(["send", "alice", "before the flood"]);
    wait_text(&a, "before the flood", Duration::from_secs(30));

    a.ok(["store", "--text", "x", "--name", "doc"]);
    let target: capstan_proto::Locator = locate(&a, "doc").parse().expect("locator");
    let hold = Duration::from_secs(12);
    let started = std::time::Instant::now();
    let floods: Vec<_> = (2..=5u8)
        .map(|last| {
            let target = target.clone();
            std::thread::spawn(move || {
                let from = std::net::IpAddr::from([127, 0, 0, last]);
                capstan_tests::rogue::flood(&target, 64, 1, from, hold)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // b restarts, so it must open a new connection to a during the flood.
    b.stop();
    b.start();
    b.ok(["send", "alice", "during the flood"]);
    wait_text(&a, "during the flood", Duration::from_secs(8));
    let arrived = started.elapsed();
    let kept: usize = floods.into_iter().map(|f| f.join().expect("flood")).sum();
    eprintln!(
        "the known peer's mail arrived {arrived:?} into the flood; the flood kept {kept} connections"
    );
    assert!(
        arrived < hold,
        "the mail arrived only after the flood let go ({arrived:?})"
    );
    assert!(
        kept <= MAX_UNKNOWN_CONNECTIONS,
        "unknown clusters kept {kept} connections"
    );
}

/// The node's cap on connections of clusters it does not know
/// (`MAX_UNKNOWN_CONNECTIONS` in nodes/src/net).
const MAX_UNKNOWN_CONNECTIONS: usize = 192;

/// Waits until `node`'s inbox holds a message with `text`.
fn wait_text(node: &Node, text: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let inbox = node.inbox(&[]);
        if inbox.iter().any(|m| m["text"] == text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {within:?} for {text:?}; inbox: {inbox:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
