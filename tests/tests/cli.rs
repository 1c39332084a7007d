//! The shapes of `--json` output and `--help`, per `nodes/CLI.md`.

use std::path::Path;

use capstan_tests::{Node, capstan_bin, is_formula_id};
use serde_json::{Value, json};

const SUBCOMMANDS: &[&str] = &[
    "start", "run", "stop", "ping", "where", "status", "du", "demo", "list", "show", "cat",
    "store", "remove", "move", "copy", "mkdir", "mkhost", "mkguest", "send", "request", "resolve",
    "reject", "adopt", "dismiss", "reply", "inbox", "install", "guests", "ls", "rm", "mv", "cp",
];

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

fn check_entry(e: &Value) {
    assert_eq!(keys(e), sorted(&["name", "id", "type", "detail"]), "{e}");
    assert!(e["name"].is_string() && e["detail"].is_string(), "{e}");
    let ty = e["type"].as_str().unwrap();
    let special = e["name"]
        .as_str()
        .unwrap()
        .chars()
        .all(|c| c.is_ascii_uppercase());
    assert!(
        special || ["host", "guest", "directory", "value", "promise"].contains(&ty),
        "type {ty:?} in {e}"
    );
    assert!(is_formula_id(&e["id"]), "id in {e}");
}

#[test]
fn help_for_every_subcommand() {
    let node = Node::new();
    let top = node.run(["--help"]);
    assert!(top.success(), "{top}");
    let top = top.stdout_str();
    for sub in SUBCOMMANDS {
        let r = node.run([sub, "--help"]);
        assert!(r.success(), "capstan {sub} --help: {r}");
        assert!(!r.stdout.is_empty(), "capstan {sub} --help printed nothing");
        if !["ls", "rm", "mv", "cp"].contains(sub) {
            assert!(
                top.contains(sub),
                "capstan --help does not list {sub}:\n{top}"
            );
        }
    }
}

#[test]
fn json_shapes() {
    let mut node = Node::new();
    let home = node.home().canonicalize().unwrap();

    // where (no daemon needed)
    let w = node.json(["where"]);
    assert_eq!(
        keys(&w),
        sorted(&["home", "socket", "store", "log", "pid_file"]),
        "{w}"
    );
    assert_eq!(
        Path::new(w["home"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        home
    );
    for k in ["store", "log", "pid_file"] {
        assert!(
            Path::new(w[k].as_str().unwrap()).starts_with(w["home"].as_str().unwrap()),
            "{k} outside the home: {w}"
        );
    }
    assert!(w["store"].as_str().unwrap().ends_with("store.redb"));
    assert!(w["pid_file"].as_str().unwrap().ends_with("capstan.pid"));
    assert!(w["log"].as_str().unwrap().ends_with("capstan.log"));
    assert!(w["socket"].as_str().unwrap().ends_with(".sock"));
    let human = node.ok(["where"]);
    assert!(human.contains(w["socket"].as_str().unwrap()), "{human}");

    // start
    let s = node.json(["start"]);
    assert_eq!(keys(&s), sorted(&["pid", "home", "socket"]), "{s}");
    assert!(s["pid"].as_u64().unwrap() > 0);
    assert_eq!(s["socket"], w["socket"]);
    assert_eq!(
        Path::new(s["home"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        home
    );
    // (the Node helper stops this daemon: its pid file names it)
    let pid = s["pid"].clone();
    assert!(Path::new(w["socket"].as_str().unwrap()).exists());
    assert!(Path::new(w["pid_file"].as_str().unwrap()).exists());

    // ping
    let p = node.json(["ping"]);
    assert_eq!(keys(&p), sorted(&["pid", "version", "uptime_ms"]), "{p}");
    assert_eq!(p["pid"], pid);
    assert!(p["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(p["uptime_ms"].is_u64());

    // status
    let st = node.json(["status"]);
    assert_eq!(
        keys(&st),
        sorted(&[
            "pid",
            "uptime_ms",
            "store",
            "incarnations",
            "connections",
            "rss_bytes",
            "store_cache_bytes",
            "root_host"
        ]),
        "{st}"
    );
    assert!(
        st["rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20),
        "a running daemon's resident memory: {st}"
    );
    assert_eq!(
        st["store_cache_bytes"], 33_554_432,
        "redb's default cache budget (32 MiB): {st}"
    );
    assert_eq!(st["pid"], pid);
    assert_eq!(st["connections"], 0, "a node that talked to no one: {st}");
    assert!(
        st["uptime_ms"].is_u64() && st["incarnations"].is_u64(),
        "{st}"
    );
    assert!(st["store"].is_string());
    assert!(is_formula_id(&st["root_host"]), "{st}");
    assert!(!node.ok(["status"]).is_empty());

    // list / show, with every type
    node.json(["mkguest", "alice"]);
    node.json(["mkhost", "bob"]);
    node.json(["mkdir", "dir"]);
    node.json(["store", "--text", "twelve bytes", "--name", "val"]);
    let list = node.json(["list"]);
    let entries = list.as_array().expect("list --json is an array");
    for e in entries {
        check_entry(e);
    }
    let by_name = |n: &str| {
        entries
            .iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {list}"))
            .clone()
    };
    assert_eq!(by_name("alice")["type"], "guest");
    assert_eq!(by_name("bob")["type"], "host");
    assert_eq!(by_name("dir")["type"], "directory");
    assert_eq!(by_name("val")["type"], "value");
    assert_eq!(by_name("SELF")["id"], st["root_host"]);
    assert_eq!(by_name("SELF")["type"], "host");
    by_name("HOST");
    // A host's special names that name no value are listed too (CLI.md).
    for special in ["MAIL", "NONE"] {
        let e = by_name(special);
        assert_eq!(e["type"], "special", "{e}");
        assert_eq!(e["id"], "0".repeat(64), "{e}");
        assert!(e["detail"].as_str().unwrap().contains("not a value"), "{e}");
    }
    for e in entries {
        let shown = node.json(["show", e["name"].as_str().unwrap()]);
        assert_eq!(&shown, e, "show agrees with list");
    }
    let (code, err) = node.fail(["cat", "MAIL"]);
    assert_eq!(code, 1);
    assert!(err.contains("MAIL"), "{err}");
    let human = node.ok(["list"]);
    assert!(human.contains("MAIL") && human.contains("NONE"), "{human}");
    let dir = node.json(["list", "dir"]);
    assert_eq!(dir, json!([]), "a new directory is empty");

    // the guest's specials
    let alice = node.json(["list", "--as", "alice"]);
    for e in alice.as_array().unwrap() {
        check_entry(e);
    }
    let alice_names: Vec<&str> = alice
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        alice_names.contains(&"SELF") && alice_names.contains(&"HOST"),
        "{alice}"
    );
    assert!(
        !alice_names.contains(&"MAIL") && !alice_names.contains(&"NONE"),
        "a guest has no MAIL or NONE: {alice}"
    );

    // cat --json of a text value
    let c = node.json(["cat", "val"]);
    assert_eq!(c, json!({"kind": "text", "text": "twelve bytes"}));

    // mail shapes
    let sent = node.json(["send", "alice", "hi @val"]);
    assert!(sent["number"].is_u64(), "{sent}");
    assert_eq!(keys(&sent), sorted(&["number"]));
    let req = node.json(["request", "HOST", "x", "--name", "prom", "--as", "alice"]);
    assert_eq!(keys(&req), sorted(&["number", "promise"]), "{req}");
    let prom = node.json(["show", "prom", "--as", "alice"]);
    check_entry(&prom);
    assert_eq!(prom["type"], "promise");
    assert_eq!(prom["detail"], "pending");
    assert_eq!(prom["id"], req["promise"]);
    let adopted = node.json(["adopt", "0", "val", "--name", "v", "--as", "alice"]);
    assert_eq!(keys(&adopted), sorted(&["id"]));
    let inbox = node.json(["inbox"]);
    for m in inbox.as_array().unwrap() {
        for k in [
            "number",
            "message_id",
            "reply_to",
            "from",
            "to",
            "date_ms",
            "type",
        ] {
            assert!(m.get(k).is_some(), "message lacks {k}: {m}");
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let date = m["date_ms"].as_u64().unwrap();
        assert!(
            date <= now_ms + 1000 && date + 600_000 > now_ms,
            "date_ms: {m}"
        );
    }

    // stop
    node.stop();
    let (code, _) = node.fail(["ping"]);
    assert_eq!(code, 2);
}

#[test]
fn global_options_go_before_or_after() {
    let node = Node::started();
    node.ok(["mkguest", "alice"]);
    let a = node.ok(["--as", "alice", "--json", "list"]);
    let b = node.ok(["list", "--as", "alice", "--json"]);
    assert_eq!(a, b);
    // CAPSTAN_HOME works like --home.
    let out = std::process::Command::new(capstan_bin())
        .args(["--json", "list"])
        .env("CAPSTAN_HOME", node.home())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        node.ok(["--json", "list"])
    );
}

/// `capstan demo` (the README's first command) runs to the end: the tour on
/// one node, then a second node reading a value of the first over QUIC
/// until it is revoked; both daemons stopped and both homes removed.
#[test]
fn demo_runs_and_shows_the_network_part() {
    let tmp = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(capstan_bin())
        .arg("demo")
        .env_remove("CAPSTAN_HOME")
        .env("TMPDIR", tmp.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let r = capstan_tests::wait_child(child, std::time::Duration::from_secs(240), "capstan demo");
    assert!(r.success(), "{r}");
    let out = r.stdout_str();
    // The remote read: B adopts A's locator and reads the greeting.
    let adopt = out
        .find("adopt-locator \"capstan://")
        .unwrap_or_else(|| panic!("no adopt-locator step:\n{out}"));
    let after = &out[adopt..];
    assert!(after.contains("checked with that cluster"), "{out}");
    let cat = after
        .find("cat greeting-from-a\nhello [world]")
        .unwrap_or_else(|| panic!("no remote read of the greeting:\n{out}"));
    // Then A cancels, and B's read fails saying it was revoked.
    let revoked = &after[cat..];
    assert!(revoked.contains("cancel greeting"), "{out}");
    assert!(
        revoked.contains("capstan: the remote node refused: revoked"),
        "{out}"
    );
    assert!(revoked.contains("it failed, as it should"), "{out}");
    assert!(out.contains("Done:"), "{out}");
    // Nothing left behind: the homes (under TMPDIR) are gone, and with them
    // the daemons (each held its home's lock).
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for pid in out
        .split("(pid ")
        .skip(1)
        .filter_map(|s| s.split(')').next()?.parse::<i32>().ok())
    {
        capstan_tests::wait_gone(pid, capstan_tests::EXIT_TIMEOUT);
    }
}

/// `capstan bench` runs `capstan-bench` from beside the binary, naming the
/// binary with `--capstan` (its flags are the benchmark's); without one
/// beside it or on `PATH` it exits 1 saying how to build it.
#[test]
fn bench_forwards_to_the_benchmark_binary_or_says_how_to_build_it() {
    let bin = capstan_bin();
    let dir = bin.parent().unwrap();
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "capstan-bench",
            "--bin",
            "capstan-bench",
        ])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .env("CARGO_TARGET_DIR", dir.parent().unwrap());
    if profile == "release" {
        build.arg("--release");
    }
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = std::process::Command::new(bin)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage: capstan bench"), "{text}");
    assert!(text.contains("--cluster <SPEC>"), "{text}");
    let bad = std::process::Command::new(bin)
        .args(["bench", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");

    // The binary alone, with nothing beside it and an empty PATH: a hard
    // link in a folder of its own inside the target directory (a debug
    // binary is hundreds of MB; a copy of it in /tmp once filled a CI
    // machine's disk), copied only where the link cannot be made.
    let tmp = tempfile::Builder::new()
        .prefix("lone-capstan-")
        .tempdir_in(dir.parent().unwrap_or(dir))
        .unwrap();
    let lone = tmp.path().join("capstan");
    if std::fs::hard_link(bin, &lone).is_err() {
        std::fs::copy(bin, &lone).unwrap();
    }
    let r = std::process::Command::new(&lone)
        .args(["bench", "--quick"])
        .env("PATH", tmp.path())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("cargo build --release -p capstan-bench"),
        "{err}"
    );
    assert!(r.stdout.is_empty(), "{r:?}");
}
