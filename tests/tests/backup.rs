//! Damaged stores and backups (issue 16): a store damaged on disk is
//! refused at start with one clear error, never served; `capstan backup`
//! takes a consistent copy while the node serves; `capstan restore` brings
//! it back, and refuses anything that could mix or lose records. Homes
//! are private to their user.

use std::time::Duration;

use capstan_tests::{Node, texts};
use serde_json::Value;

/// What a user sees of a node's state.
fn state(node: &Node) -> (Value, Value, Vec<Value>, Vec<Value>) {
    (
        node.json(["list"]),
        node.json(["list", "--as", "alice"]),
        node.inbox(&[]),
        node.inbox(&["--as", "alice"]),
    )
}

fn populated() -> Node {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    for i in 0..60 {
        let text = format!("value {i} {}", "x".repeat(900));
        node.ok(["store", "--text", &text, "--name", &format!("v{i}")]);
        node.ok(["send", "alice", &format!("message {i} with @v{i}")]);
    }
    node
}

/// Writes pseudo-random bytes over 32 places spread through the file past
/// its first 16 KiB (where the page layout differs from run to run, a few
/// places can all land in free pages, which no check reads).
fn damage(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for k in 0..32 {
        let at = 16 * 1024 + (len - 16 * 1024) * k / 32;
        for b in &mut bytes[at..(at + 64).min(len)] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn a_damaged_store_is_refused_at_start_and_restored_from_a_backup() {
    let mut node = populated();
    let before = state(&node);
    let backup = node.home().join("before.bak");
    let v = node.json(["backup", backup.to_str().unwrap()]);
    assert!(v["pairs"].as_u64().unwrap() > 100, "{v}");
    node.stop();

    let store = node.home().join("store.redb");
    damage(&store);
    let damaged = std::fs::read(&store).unwrap();
    let (code, err) = node.fail(["start"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("store.redb") && err.contains("capstan restore"),
        "the error names the file and what to do: {err}"
    );
    assert!(!err.contains("panicked"), "no panic text: {err}");
    assert_eq!(
        std::fs::read(&store).unwrap(),
        damaged,
        "the refused start wrote to the damaged file"
    );
    let (code, _) = node.fail(["ping"]);
    assert_eq!(code, 2, "no daemon was left serving the damaged store");

    // Restoring over the damaged file is refused (it cannot be opened): the
    // error says to move it away; nothing is changed.
    let (code, err) = node.fail(["restore", backup.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("move the file away"), "{err}");
    assert_eq!(std::fs::read(&store).unwrap(), damaged);

    std::fs::rename(&store, node.home().join("store.redb.damaged")).unwrap();
    let v = node.json(["restore", backup.to_str().unwrap()]);
    assert!(v["pairs"].as_u64().unwrap() > 100, "{v}");
    node.start();
    assert_eq!(state(&node), before, "the restored node shows what it held");
    assert!(node.ok(["cat", "v59"]).starts_with("value 59 "));
}

#[test]
fn an_online_backup_is_one_consistent_snapshot() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    // Sends run while the backup is taken; the backup must hold a prefix
    // of them, each whole, with no number missing.
    let backup = node.home().join("mid.bak");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..150 {
                node.ok(["send", "alice", &format!("burst {i}")]);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        node.ok(["backup", backup.to_str().unwrap()]);
    });

    let mut copy = Node::new();
    copy.ok(["restore", backup.to_str().unwrap()]);
    copy.start();
    let inbox = copy.inbox(&["--as", "alice"]);
    let got = texts(&inbox);
    eprintln!("the backup holds {} of the 150 sends", got.len());
    let numbers: Vec<u64> = inbox
        .iter()
        .map(|m| m["number"].as_u64().unwrap())
        .collect();
    let want: Vec<String> = (0..got.len()).map(|i| format!("burst {i}")).collect();
    assert_eq!(got, want, "a prefix of the sends, in order, each whole");
    assert_eq!(
        numbers,
        (0..got.len() as u64).collect::<Vec<_>>(),
        "no number missing"
    );
    // The original went on; the copy is independent of it.
    assert_eq!(node.inbox(&["--as", "alice"]).len(), 150);
}

#[test]
fn restore_refuses_a_running_node_a_bad_backup_and_a_store_in_use() {
    let node = populated();
    let backup = node.home().join("b.bak");
    node.ok(["backup", backup.to_str().unwrap()]);
    let before = state(&node);

    // A running node: refused, nothing changed.
    let (code, err) = node.fail(["restore", backup.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("capstan stop"), "{err}");
    assert_eq!(state(&node), before);

    // A damaged backup: refused before any store is made.
    let mut bytes = std::fs::read(&backup).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let bad = node.home().join("bad.bak");
    std::fs::write(&bad, &bytes).unwrap();
    let fresh = Node::new();
    let (code, err) = fresh.fail(["restore", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a whole Capstan backup"), "{err}");
    assert!(
        !fresh.home().join("store.redb").exists(),
        "a refused restore made a store"
    );
    let (code, err) = fresh.fail(["restore", "/nonexistent/b.bak"]);
    assert_eq!(code, 1, "{err}");

    // A store that holds anything: refused, unchanged.
    let mut other = Node::started();
    other.ok(["store", "--text", "mine", "--name", "keep"]);
    other.stop();
    let (code, err) = other.fail(["restore", backup.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    other.start();
    assert_eq!(other.ok(["cat", "keep"]), "mine");
    assert!(
        other.fail(["cat", "v1"]).0 != 0,
        "nothing of the backup went in"
    );
}

#[test]
fn a_cluster_store_backed_up_through_a_node_restores_into_a_fresh_prefix() {
    let Ok(eps) = std::env::var("CAPSTAN_ETCD_ENDPOINTS") else {
        assert!(
            std::env::var("CAPSTAN_REQUIRE_ETCD").as_deref() != Ok("1"),
            "CAPSTAN_REQUIRE_ETCD=1 but CAPSTAN_ETCD_ENDPOINTS is not set"
        );
        eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let spec = format!("etcd://{}/capstan-e2e/backup-{nanos}", eps.trim());
    let fresh = format!("etcd://{}/capstan-e2e/restored-{nanos}", eps.trim());
    let mut n1 = Node::named("n1");
    n1.ok(["cluster", "init", "--store", &spec]);
    n1.start_with(&["--store", &spec, "--listen", "127.0.0.1:0"]);
    n1.ok(["mkguest", "alice"]);
    n1.ok(["store", "--text", "kept across stores", "--name", "doc"]);
    n1.ok(["send", "alice", "see @doc"]);
    let backup = n1.home().join("cluster.bak");
    let v = n1.json(["backup", backup.to_str().unwrap()]);
    assert!(v["store"].as_str().unwrap().contains("etcd"), "{v}");
    n1.stop();

    // Into a prefix holding something: refused.
    let (code, err) = n1.fail(["restore", backup.to_str().unwrap(), "--store", &spec]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not empty"), "{err}");

    let mut n2 = Node::named("n2");
    n2.ok(["restore", backup.to_str().unwrap(), "--store", &fresh]);
    // The restored store's secrets open only with the cluster's secrets key.
    let key = n1.home().join("identity").join("secrets.key");
    let (code, err) = n2.fail(["start", "--store", &fresh, "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--secrets-key"), "{err}");
    n2.start_with(&[
        "--store",
        &fresh,
        "--listen",
        "127.0.0.1:0",
        "--secrets-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(n2.ok(["cat", "doc"]), "kept across stores");
    let inbox = n2.inbox(&["--as", "alice"]);
    assert_eq!(texts(&inbox), vec!["see @doc".to_string()]);
}

/// Every entry under `dir` whose mode gives group or others any access.
fn shared_entries(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.permissions().mode() & 0o077 != 0 {
            out.push(format!(
                "{} {:o}",
                p.display(),
                m.permissions().mode() & 0o777
            ));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn the_home_and_everything_in_it_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = populated();
    let backup = node.home().join("b.bak");
    node.ok(["backup", backup.to_str().unwrap()]);
    assert_eq!(shared_entries(node.home()), Vec::<String>::new());

    // A home left world-readable (by an older version, or by hand) is
    // made private when a node starts on it.
    node.stop();
    let perm = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    perm(node.home(), 0o755);
    for f in ["store.redb", "capstan.log"] {
        perm(&node.home().join(f), 0o644);
    }
    node.start();
    assert_eq!(shared_entries(node.home()), Vec::<String>::new());
}
