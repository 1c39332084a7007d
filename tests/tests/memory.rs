//! The daemon's memory budget (issue 18): the store's page cache is bounded
//! (`start --store-cache-bytes`, default 32 MiB), and `status` shows the
//! daemon's resident memory and that budget.

use capstan_tests::Node;

#[test]
fn status_shows_memory_and_the_store_cache_budget() {
    let mut node = Node::started();
    let v = node.json(["status"]);
    let rss = v["rss_bytes"].as_u64().expect("rss_bytes");
    assert!(rss > 1 << 20 && rss < 1 << 30, "{v}");
    assert_eq!(v["store_cache_bytes"], 32u64 << 20, "{v}");
    let human = node.ok(["status"]);
    assert!(human.contains("MiB resident"), "{human}");
    assert!(human.contains("store cache   32.0 MiB budget"), "{human}");

    node.stop();
    node.start_with(&["--store-cache-bytes", "8388608"]);
    let v = node.json(["status"]);
    assert_eq!(v["store_cache_bytes"], 8u64 << 20, "{v}");
    // below the floor: refused before anything starts
    node.stop();
    let (code, err) = node.fail(["start", "--store-cache-bytes", "1000"]);
    assert_ne!(code, 0);
    assert!(err.contains("store-cache-bytes"), "{err}");
}
