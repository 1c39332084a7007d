//! Secrets at rest (issue 16): the store holds LLM API keys and a cluster's
//! CA private key only sealed with a secrets key that is not in the store.
//! The lone-node test scans the embedded store's file; the cluster test
//! scans every key and value under its etcd prefix (`etcdctl get --prefix`)
//! on the shared etcd (`CAPSTAN_ETCD_ENDPOINTS`; skipped without it unless
//! `CAPSTAN_REQUIRE_ETCD=1`).

use std::time::{Duration, Instant};

use capstan_tests::Node;
use capstan_tests::llm_server::{LlmServer, Reply};

const API_KEY: &str = "test-secret-api-key-8c1f0e93d2a7";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn store_file(node: &Node) -> std::path::PathBuf {
    let w = node.json(["where"]);
    std::path::PathBuf::from(w["store"].as_str().expect("store path"))
}

#[test]
fn a_lone_node_seals_llm_keys_and_needs_its_key_to_use_them() {
    let mut node = Node::new();
    node.start();
    let server = LlmServer::start();
    server.add_anthropic(&node, "claude", API_KEY);
    server.push(Reply::text("sealed and working"));
    assert_eq!(
        node.ok(["llm", "ask", "claude", "hello"]),
        "sealed and working\n"
    );

    // The key file: 0600, in the home's identity directory.
    let key = node.home().join("identity").join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    node.stop();
    let bytes = std::fs::read(store_file(&node)).unwrap();
    assert!(bytes.len() > 1000, "the store file");
    assert!(
        !contains(&bytes, API_KEY.as_bytes()),
        "the API key is in the store file in plaintext"
    );

    // Without its secrets key the node refuses to start, saying what to pass.
    let moved = node.home().join("secrets.key.bak");
    std::fs::rename(&key, &moved).unwrap();
    let (code, err) = node.fail(["start"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--secrets-key"), "{err}");
    assert!(!key.exists(), "no new key made over sealed secrets");
    // Another key is refused too (not a panic, not a corrupt store).
    let other = node.home().join("other.key");
    std::fs::write(
        &other,
        format!("capstan-secrets-key-v1 {}\n", "ab".repeat(32)),
    )
    .unwrap();
    let (code, err) = node.fail(["start", "--secrets-key", other.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another secrets key"), "{err}");
    std::fs::remove_file(&key).unwrap();
    // A file that is no key: refused, nothing installed.
    let (code, err) = node.fail(["start", "--secrets-key", API_KEY]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("secrets key"), "{err}");
    assert!(!key.exists());

    // Given back (a backup of the file), it works again.
    node.start_with(&["--secrets-key", moved.to_str().unwrap()]);
    server.push(Reply::text("still working"));
    assert_eq!(
        node.ok(["llm", "ask", "claude", "hello"]),
        "still working\n"
    );
}

fn endpoints() -> Option<String> {
    match std::env::var("CAPSTAN_ETCD_ENDPOINTS") {
        Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => {
            assert!(
                std::env::var("CAPSTAN_REQUIRE_ETCD").as_deref() != Ok("1"),
                "CAPSTAN_REQUIRE_ETCD=1 but CAPSTAN_ETCD_ENDPOINTS is not set: run scripts/etcd-cluster start"
            );
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            None
        }
    }
}

/// Every key and value under `prefix`, as etcdctl prints them.
fn etcd_dump(eps: &str, prefix: &str) -> Vec<u8> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={eps}"), "get", "--prefix", prefix])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_cluster_keeps_its_secrets_sealed_in_etcd() {
    let Some(eps) = endpoints() else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("capstan-e2e/secrets-{nanos}");
    let spec = format!("etcd://{eps}/{prefix}");

    let mut n1 = Node::named("n1");
    let v = n1.json(["cluster", "init", "--store", &spec]);
    assert_eq!(v["created"], true, "{v}");
    let key = v["secrets_key"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&key).exists(), "{v}");
    // Again: nothing changes; with a key file that is not the cluster's:
    // refused, and no key is written there.
    let again = n1.json(["cluster", "init", "--store", &spec]);
    assert_eq!(again["created"], false, "{again}");
    let elsewhere = n1.home().join("elsewhere.key");
    let (code, err) = n1.fail([
        "cluster",
        "init",
        "--store",
        &spec,
        "--secrets-key",
        elsewhere.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--secrets-key FILE"), "{err}");
    assert!(!elsewhere.exists());

    n1.start_with(&["--store", &spec, "--listen", "127.0.0.1:0"]);
    let mut n2 = Node::named("n2");
    // A node without the cluster's secrets key says what to pass.
    let (code, err) = n2.fail(["start", "--store", &spec, "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--secrets-key"), "{err}");
    assert!(err.contains("cluster init"), "{err}");
    n2.start_with(&[
        "--store",
        &spec,
        "--listen",
        "127.0.0.1:0",
        "--secrets-key",
        &key,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = n1.json(["cluster", "members"]);
        let live = m
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "live")
            .count();
        if live == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "two live members: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let server = LlmServer::start();
    server.add_anthropic(&n1, "claude", API_KEY);
    // The other node uses the key (it reads it from the store and opens it).
    server.push(Reply::text("from the other node"));
    assert_eq!(
        n2.ok(["llm", "ask", "claude", "hello"]),
        "from the other node\n"
    );
    // The nodes talk: mail across them.
    n1.ok(["mkguest", "alice"]);
    n2.ok(["send", "alice", "hello across"]);
    let inbox = n1.inbox(&["--as", "alice"]);
    assert!(
        inbox.iter().any(|m| m["text"] == "hello across"),
        "{inbox:?}"
    );

    let dump = etcd_dump(&eps, &prefix);
    assert!(dump.len() > 1000, "the dump holds the cluster's state");
    assert!(
        !contains(&dump, API_KEY.as_bytes()),
        "the API key is in etcd in plaintext"
    );
    // The CA private key (n1's home has a copy, outside the store).
    let ca = std::fs::read(n1.home().join("identity").join("cluster.key")).unwrap();
    assert!(!contains(&dump, &ca), "the CA key is in etcd");
    assert!(
        !contains(&dump, hexs(&ca).as_bytes()),
        "the CA key is in etcd (hex)"
    );
    // Its seed alone (after OCTET STRING { OCTET STRING (32) } in the
    // PKCS#8 DER; the public key at its end is public, in the certificate).
    let at = ca
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .expect("an Ed25519 PKCS#8 key")
        + 4;
    let seed = &ca[at..at + 32];
    assert!(!contains(&dump, seed));
    assert!(!contains(&dump, hexs(seed).as_bytes()));
}
