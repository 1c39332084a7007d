//! `capstan start --metrics HOST:PORT`: the Prometheus endpoint (see
//! `nodes/CLI.md`, "Metrics").

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use capstan_tests::Node;

/// The `host:port` of the node's metrics URL (`status --json`).
fn metrics_addr(node: &Node) -> String {
    let st = node.json(["status"]);
    let url = st["metrics"]
        .as_str()
        .unwrap_or_else(|| panic!("status without metrics: {st}"));
    url.strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("not http://HOST:PORT/metrics: {url}"))
        .to_string()
}

/// Sends `request` raw; returns everything the server sent before closing.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8(out).expect("UTF-8 response")
}

/// `GET path`: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let r = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    );
    let (head, body) = r
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {r:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    if path == "/metrics" {
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
    assert_eq!(len, body.len(), "{head}");
    (code, body.to_string())
}

/// Parses the exposition text, checking every line: comments are `# HELP`
/// or `# TYPE`, samples `name{label="v",…} number` or `name number`.
/// Returns sample (name with labels) → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("# ") {
            let mut w = c.splitn(3, ' ');
            let kind = w.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "bad comment {line:?}");
            assert!(name_ok(w.next().unwrap_or("")), "bad comment {line:?}");
            if kind == "TYPE" {
                let t = w.next().unwrap_or("");
                assert!(["counter", "gauge"].contains(&t), "bad type {line:?}");
            }
            continue;
        }
        let (sample, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value not a number: {line:?}"));
        let name = match sample.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                for l in labels.split("\",").filter(|l| !l.is_empty()) {
                    let (k, v) = l
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label {l:?} in {line:?}"));
                    assert!(name_ok(k), "bad label name in {line:?}");
                    assert!(!v.contains('\n'), "{line:?}");
                }
                name
            }
            None => sample,
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        out.insert(sample.to_string(), value);
    }
    out
}

#[test]
fn serves_metrics_that_follow_the_work_done() {
    let mut node = Node::new();
    let started = node.run(["start", "--metrics", "127.0.0.1:0"]);
    assert!(started.success(), "{started}");
    let out = started.stdout_str();
    assert!(
        out.contains("metrics at http://127.0.0.1:"),
        "start did not print the metrics address: {out}"
    );
    let addr = metrics_addr(&node);
    assert!(
        out.contains(&format!("metrics at http://{addr}/metrics")),
        "{out}"
    );
    assert!(
        node.ok(["status"])
            .contains(&format!("http://{addr}/metrics")),
        "status does not show the metrics URL"
    );

    let (code, body) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let before = parse(&body);
    for m in [
        "capstan_process_uptime_seconds",
        "capstan_incarnations",
        "capstan_store_commits_total",
        "capstan_guests",
    ] {
        assert!(before.contains_key(m), "no {m} in:\n{body}");
    }
    // An embedded store is not a cluster.
    assert!(!body.contains("capstan_cluster_"), "{body}");

    node.json(["mkguest", "alice"]);
    for i in 0..3 {
        node.ok(["send", "alice", &format!("hello {i}")]);
    }
    let (code, body) = get(&addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let after = parse(&body);
    let commits = |m: &BTreeMap<String, f64>| m["capstan_store_commits_total"];
    assert!(
        commits(&after) >= commits(&before) + 4.0,
        "commits {} -> {}:\n{body}",
        commits(&before),
        commits(&after)
    );
    assert!(
        after["capstan_process_uptime_seconds"] >= before["capstan_process_uptime_seconds"],
        "{body}"
    );

    // Other paths and methods.
    let (code, _) = get(&addr, "/");
    assert_eq!(code, 404);
    let (code, _) = get(&addr, "/metrics/x");
    assert_eq!(code, 404);
    let r = raw(
        &addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 405 "), "{r:?}");
    let r = raw(&addr, b"nonsense\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400 "), "{r:?}");
    // A request head over 8 KiB is dropped unanswered.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 9 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&addr, &big), "", "an oversized request was answered");
    // The endpoint still answers.
    assert_eq!(get(&addr, "/metrics").0, 200);

    // Remembered: a plain restart serves on the same address.
    node.stop();
    node.start();
    assert_eq!(metrics_addr(&node), addr);
    assert_eq!(get(&addr, "/metrics").0, 200);
}

#[test]
fn refuses_a_public_address_without_metrics_public() {
    let node = Node::new();
    let (code, err) = node.fail(["start", "--metrics", "0.0.0.0:0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--metrics-public"), "{err}");
    // Nothing was started or written.
    let (_, err) = node.fail(["ping"]);
    assert!(!err.is_empty());
    assert!(
        !node.home().join("capstan.log").exists() && !node.home().join("metrics").exists(),
        "the refused start left files in the home"
    );
    let (_, err) = node.fail(["start", "--metrics-public"]);
    assert!(err.contains("--metrics"), "{err}");

    // Allowed with --metrics-public.
    let mut node = Node::new();
    node.start_with(&["--metrics", "0.0.0.0:0", "--metrics-public"]);
    let addr = metrics_addr(&node);
    let port = addr.rsplit_once(':').unwrap().1;
    assert_eq!(get(&format!("127.0.0.1:{port}"), "/metrics").0, 200);
}

/// A client slower than 5 s is dropped, and at most 16 connections are
/// served at once: a 17th is closed unanswered until one ends.
#[test]
fn slow_clients_are_dropped_and_connections_bounded() {
    let mut node = Node::new();
    node.start_with(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&node);
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /met").unwrap();
            s
        })
        .collect();
    // Let the daemon accept them all.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        raw(&addr, b"GET /metrics HTTP/1.1\r\n\r\n"),
        "",
        "a 17th connection was served"
    );
    let t = std::time::Instant::now();
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "a partial request was answered");
    }
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
        "slow clients dropped after {waited:?}"
    );
    assert_eq!(get(&addr, "/metrics").0, 200);
}
