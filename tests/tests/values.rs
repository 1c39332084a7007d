//! Values round-trip byte for byte: bytes through `--stdin`/`--file`, text
//! through `--text`, JSON through `--json`, also across a restart.

use capstan_tests::Node;
use data_encoding::BASE64;
use serde_json::Value;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[test]
fn bytes_round_trip() {
    let mut node = Node::started();
    let all: Vec<u8> = (0..=255u8).collect();
    let r = node.run_stdin(["--json", "store", "--stdin", "--name", "all"], Some(&all));
    assert!(r.success(), "{r}");
    assert_eq!(node.ok_bytes(["cat", "all"]), all);
    let v = node.json(["cat", "all"]);
    assert_eq!(v["kind"], "bytes", "{v}");
    let b64 = v["base64"].as_str().expect("base64 field");
    assert_eq!(BASE64.decode(b64.as_bytes()).unwrap(), all);
    let shown = node.json(["show", "all"]);
    assert_eq!(shown["type"], "value");

    // Larger than one store record (chunked), from --stdin and from --file.
    let big = noise(1_500_000, 0x9e37_79b9_7f4a_7c15);
    let r = node.run_stdin(["store", "--stdin", "--name", "big"], Some(&big));
    assert!(r.success(), "{r}");
    let file = node.home().join("input.bin");
    let mid = noise(300_000, 42);
    std::fs::write(&file, &mid).unwrap();
    node.ok(["store", "--file", file.to_str().unwrap(), "--name", "mid"]);
    assert!(node.ok_bytes(["cat", "big"]) == big, "big value differs");
    assert!(node.ok_bytes(["cat", "mid"]) == mid, "file value differs");

    // Empty value.
    let r = node.run_stdin(["store", "--stdin", "--name", "empty"], Some(b""));
    assert!(r.success(), "{r}");
    assert_eq!(node.ok_bytes(["cat", "empty"]), b"");

    node.kill9();
    node.start();
    assert_eq!(node.ok_bytes(["cat", "all"]), all);
    assert!(
        node.ok_bytes(["cat", "big"]) == big,
        "big value differs after kill -9"
    );
    assert!(node.ok_bytes(["cat", "mid"]) == mid);
    assert_eq!(node.ok_bytes(["cat", "empty"]), b"");
}

#[test]
fn text_and_json_round_trip() {
    let mut node = Node::started();
    let texts = [
        "hello [world]",
        "unicode: héllo ✓ 日本語 🦀 \u{200b} \u{fffd}",
        "lines\nand\r\nmore\n\n",
        "quotes \"double\" 'single' `back` \\slash",
        "controls \u{1}\u{7}\u{8}\t\u{b}\u{c}\u{1b}[31m\u{1f}\u{7f} end",
        " leading and trailing spaces ",
        "@not-a-ref @@ $HOME %s {}",
    ];
    for (i, t) in texts.iter().enumerate() {
        let name = format!("t{i}");
        node.ok(["store", "--text", t, "--name", &name]);
        assert_eq!(
            node.ok_bytes(["cat", &name]),
            t.as_bytes(),
            "text {i}: {t:?}"
        );
        let v = node.json(["cat", &name]);
        assert_eq!(v["kind"], "text", "{v}");
        assert_eq!(v["text"], *t, "text {i}");
    }
    // The same text in a file is stored byte for byte.
    let file = node.home().join("t.txt");
    std::fs::write(&file, texts[1]).unwrap();
    node.ok([
        "store",
        "--file",
        file.to_str().unwrap(),
        "--name",
        "from-file",
    ]);
    assert_eq!(node.ok_bytes(["cat", "from-file"]), texts[1].as_bytes());

    // JSON: stored as given (validated), kind json.
    let j = r#"{"a": [1, 2.5, "ü", null, true], "b": {"c": "\n"}}"#;
    node.ok(["store", "--json", j, "--name", "j"]);
    let got = node.ok(["cat", "j"]);
    let parsed: Value = serde_json::from_str(&got).expect("cat of a JSON value is JSON");
    assert_eq!(parsed, serde_json::from_str::<Value>(j).unwrap());
    let v = node.json(["cat", "j"]);
    assert_eq!(v["kind"], "json");
    assert_eq!(
        serde_json::from_str::<Value>(v["text"].as_str().unwrap()).unwrap(),
        parsed
    );

    // Storing over a taken name replaces it: a new value, a new id (CLI.md).
    let id1 = node.json(["show", "t0"])["id"].clone();
    node.ok(["store", "--text", "replaced", "--name", "t0"]);
    assert_eq!(node.ok(["cat", "t0"]), "replaced");
    assert_ne!(node.json(["show", "t0"])["id"], id1);

    node.kill9();
    node.start();
    for (i, t) in texts.iter().enumerate().skip(1) {
        // (t0 was replaced above.)
        assert_eq!(node.ok_bytes(["cat", &format!("t{i}")]), t.as_bytes());
    }
    let parsed_after: Value = serde_json::from_str(&node.ok(["cat", "j"])).unwrap();
    assert_eq!(parsed_after, parsed);
}
