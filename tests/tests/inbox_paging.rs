//! `inbox --limit N --after M` pages through an inbox; `du` counts the store
//! by kind of key (issue 18, bounded tables).

use std::time::Duration;

use capstan_tests::{LineReader, Node, kill_child, texts};
use serde_json::Value;

const SENT: u64 = 25;

fn numbers(page: &[Value]) -> Vec<u64> {
    page.iter()
        .map(|m| m["number"].as_u64().expect("message number"))
        .collect()
}

fn du(node: &Node) -> Value {
    let v = node.json(["du"]);
    let kinds = v["kinds"].as_array().expect("du kinds");
    let keys: u64 = kinds.iter().map(|k| k["keys"].as_u64().unwrap()).sum();
    let bytes: u64 = kinds.iter().map(|k| k["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["total_keys"].as_u64(), Some(keys), "{v}");
    assert_eq!(v["total_bytes"].as_u64(), Some(bytes), "{v}");
    assert!(keys > 0 && bytes > 0, "{v}");
    v
}

fn kind(du: &Value, kind: &str) -> u64 {
    du["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == kind)
        .unwrap_or_else(|| panic!("no kind {kind}: {du}"))["keys"]
        .as_u64()
        .unwrap()
}

#[test]
fn inbox_pages_and_du() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    let before = du(&node);
    assert!(node.inbox(&[]).is_empty());
    let mut texts = Vec::new();
    for i in 0..SENT {
        let text = format!("message {i}");
        node.ok(["send", "alice", &text]);
        texts.push(text);
    }
    let after_du = du(&node);
    // A send writes the recipient's message and the sender's copy.
    let host_copies = node.inbox(&[]).len() as u64;
    assert_eq!(host_copies, SENT);
    assert_eq!(
        kind(&after_du, "messages"),
        kind(&before, "messages") + SENT + host_copies,
        "before: {before}\nafter: {after_du}"
    );
    assert!(after_du["total_bytes"].as_u64() > before["total_bytes"].as_u64());
    for k in [
        "formulas", "values", "names", "messages", "dedup", "journals", "outbox", "locators",
        "others",
    ] {
        kind(&after_du, k);
    }

    // Page through alice's inbox 10 at a time: every message once, in order.
    let all = node.inbox(&["--as", "alice"]);
    assert_eq!(all.len() as u64, SENT, "{all:?}");
    let mut seen = Vec::new();
    let mut after: Option<u64> = None;
    let mut pages = 0;
    loop {
        let mut args = vec![
            "--as".to_string(),
            "alice".into(),
            "--limit".into(),
            "10".into(),
        ];
        if let Some(a) = after {
            args.push("--after".into());
            args.push(a.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let page = node.inbox(&args);
        assert!(page.len() <= 10, "{page:?}");
        pages += 1;
        if page.is_empty() {
            break;
        }
        let ns = numbers(&page);
        if let Some(a) = after {
            assert!(ns.iter().all(|n| *n > a), "{ns:?} after {a}");
        }
        after = ns.last().copied();
        seen.extend(page);
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 4, "25 messages in pages of 10, then an empty page");
    assert_eq!(numbers(&seen), numbers(&all));
    let mut sorted = numbers(&seen);
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len() as u64, SENT);
    assert_eq!(sorted, numbers(&seen), "in number order, each once");
    for (m, t) in seen.iter().zip(&texts) {
        assert_eq!(m["strings"][0].as_str(), Some(t.as_str()), "{m}");
    }

    // Human output says where the next page starts, only when there is one.
    let first = numbers(&seen);
    let human = node.ok(["inbox", "--as", "alice", "--limit", "10"]);
    assert!(
        human.contains(&format!(
            "(showing 10 of more; next page: --after {})",
            first[9]
        )),
        "{human}"
    );
    let last = node.ok([
        "inbox",
        "--as",
        "alice",
        "--limit",
        "10",
        "--after",
        &first[19].to_string(),
    ]);
    assert!(!last.contains("next page"), "{last}");
    let exact = node.ok([
        "inbox",
        "--as",
        "alice",
        "--limit",
        "5",
        "--after",
        &first[19].to_string(),
    ]);
    assert!(!exact.contains("next page"), "{exact}");

    // Bad arguments are refused.
    for bad in [
        &["inbox", "--limit", "0"][..],
        &["inbox", "--limit", "10001"],
        &["inbox", "--limit", "x"],
        &["inbox", "--after", "abc"],
    ] {
        let (code, err) = node.fail(bad);
        assert_ne!(code, 0, "{bad:?}");
        assert!(
            err.contains("--limit") || err.contains("--after"),
            "{bad:?}: {err}"
        );
    }

    // The human table of du ends with the total.
    let table = node.ok(["du"]);
    assert!(table.starts_with("KIND"), "{table}");
    assert!(table.contains("messages"), "{table}");
    assert!(
        table.lines().last().unwrap().starts_with("total"),
        "{table}"
    );
}

#[test]
fn threads_and_follow_page_too() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    for i in 0..5 {
        node.ok(["send", "alice", &format!("m{i}")]);
    }
    let inbox = node.inbox(&["--as", "alice"]);
    let id = inbox[1]["message_id"].as_str().unwrap().to_owned();
    node.ok(["reply", "1", "r1", "--as", "alice"]);
    node.ok(["reply", "1", "r2", "--as", "alice"]);

    // The thread of m1 in alice's inbox: m1, r1, r2 (her copies), a page at a time.
    let whole = node.inbox(&["--as", "alice", "--thread", &id]);
    assert_eq!(texts(&whole), ["m1", "r1", "r2"], "{whole:?}");
    let p1 = node.inbox(&["--as", "alice", "--thread", &id, "--limit", "2"]);
    assert_eq!(texts(&p1), ["m1", "r1"]);
    let after = p1[1]["number"].as_u64().unwrap().to_string();
    let p2 = node.inbox(&[
        "--as", "alice", "--thread", &id, "--limit", "2", "--after", &after,
    ]);
    assert_eq!(texts(&p2), ["r2"]);
    let human = node.ok(["inbox", "--as", "alice", "--thread", &id, "--limit", "2"]);
    assert!(
        human.contains(&format!("(showing 2 of more; next page: --after {after})")),
        "{human}"
    );

    // --follow starts after --after.
    let mut child = node.spawn([
        "--json", "inbox", "--follow", "--as", "alice", "--after", "3",
    ]);
    let lines = LineReader::new(child.stdout.take().unwrap());
    let first: Value =
        serde_json::from_str(&lines.next(Duration::from_secs(15)).expect("a message")).unwrap();
    assert_eq!(first["number"], 4, "{first}");
    kill_child(child);
}

/// The same on etcd (a node of a one-node cluster). Needs
/// `CAPSTAN_ETCD_ENDPOINTS` (scripts/etcd-cluster start); skipped without it.
#[test]
fn du_and_paging_on_etcd() {
    let Some(eps) = std::env::var("CAPSTAN_ETCD_ENDPOINTS")
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let spec = format!("etcd://{}/capstan-e2e/du-{nanos}", eps.trim());
    let mut node = Node::named("n1");
    node.json(["cluster", "init", "--store", &spec]);
    node.start_with(&["--store", &spec, "--listen", "127.0.0.1:0"]);
    node.ok(["mkguest", "alice"]);
    let before = du(&node);
    for i in 0..12 {
        node.ok(["send", "alice", &format!("m{i}")]);
    }
    let after = du(&node);
    assert_eq!(
        kind(&after, "messages"),
        kind(&before, "messages") + 24,
        "before: {before}\nafter: {after}"
    );
    let p1 = node.inbox(&["--as", "alice", "--limit", "5"]);
    let last = p1[4]["number"].as_u64().unwrap().to_string();
    let p2 = node.inbox(&["--as", "alice", "--limit", "10", "--after", &last]);
    let mut got = texts(&p1);
    got.extend(texts(&p2));
    let want: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
}
