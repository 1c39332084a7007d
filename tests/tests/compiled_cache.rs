//! The compiled-component cache (`$CAPSTAN_HOME/compiled`) is bounded by
//! size, least recently used first (`start --compiled-cache-bytes`, issue
//! 18); an evicted component is compiled again when next needed.

use std::time::{Duration, Instant};

use capstan_tests::{Node, guest_wasm, texts};

fn cached(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(node.home().join("compiled"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".cwasm"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_small_cap_evicts_the_older_component_and_the_guest_still_runs() {
    let (counter, echo) = (guest_wasm("counter"), guest_wasm("echo-tool"));
    let mut node = Node::new();
    // one byte: each compile evicts every other entry
    node.start_with(&["--compiled-cache-bytes", "1"]);
    let c = node.json(["install", &counter, "--name", "counter"]);
    let counter_hash = c["hash"].as_str().unwrap().to_string();
    node.ok(["mkguest", "bot", "--component", "counter"]);
    assert_eq!(cached(&node).len(), 1);
    assert!(cached(&node)[0].starts_with(&counter_hash));
    let e = node.json(["install", &echo, "--name", "echo"]);
    let echo_hash = e["hash"].as_str().unwrap().to_string();
    let files = cached(&node);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with(&echo_hash),
        "the older one went: {files:?}"
    );

    // after a restart (no compiled code in memory) the guest of the evicted
    // component still runs: compiled again
    node.kill9();
    node.start_with(&["--compiled-cache-bytes", "1"]);
    node.ok(["send", "bot", "increment"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !texts(&node.inbox(&[]))
        .iter()
        .any(|t| t.contains("count = 1"))
    {
        assert!(Instant::now() < deadline, "bot never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let files = cached(&node);
    assert!(
        files.iter().any(|f| f.starts_with(&counter_hash)),
        "{files:?}"
    );
}
