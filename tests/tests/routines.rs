//! Routines and self-repair (issue 20), end to end: real daemons stopped,
//! started and killed with `kill -9`; a 3-node cluster on the shared etcd
//! (skipped without `CAPSTAN_ETCD_ENDPOINTS` unless `CAPSTAN_REQUIRE_ETCD=1`).
//!
//! Timing bounds are generous (a debug build on a loaded 2-core machine):
//! they catch a routine that does not fire, never one that fires late.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use capstan_tests::{Node, guest_wasm, texts};
use serde_json::Value;

/// How late a tick may land in the inbox and still count as on time.
const TOLERANCE_MS: i64 = 5000;
/// How long a test waits for something before failing.
const WAIT: Duration = Duration::from_secs(60);

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_utc(s: &str) -> i64 {
    let p = |a: usize, b: usize| s[a..b].parse::<i64>().expect("a number in the tick");
    let (y, m, d) = (p(0, 4), p(5, 7), p(8, 10));
    let (hh, mm, ss) = (p(11, 13), p(14, 16), p(17, 19));
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000
}

/// The ticks of routine `name` in `inbox`: (tick ms, date the message landed).
fn ticks(inbox: &[Value], name: &str) -> Vec<(i64, i64)> {
    let prefix = format!("[routine {name} tick ");
    inbox
        .iter()
        .filter_map(|m| {
            let t = m["text"].as_str()?;
            let rest = t.strip_prefix(&prefix)?;
            let tick = parse_utc(rest.get(..20)?);
            Some((tick, m["date_ms"].as_i64().unwrap_or(0)))
        })
        .collect()
}

/// Asserts no tick landed twice; returns the distinct ticks in order.
fn no_duplicates(ts: &[(i64, i64)]) -> Vec<i64> {
    let mut seen = BTreeMap::new();
    for (t, _) in ts {
        *seen.entry(*t).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "ticks delivered more than once: {twice:?}"
    );
    seen.into_keys().collect()
}

fn alice_ticks(node: &Node, name: &str) -> Vec<(i64, i64)> {
    ticks(&node.inbox(&["--as", "alice"]), name)
}

/// Waits until `name` has at least `n` ticks in alice's inbox.
fn wait_ticks(node: &Node, name: &str, n: usize) -> Vec<(i64, i64)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ts = alice_ticks(node, name);
        if ts.len() >= n {
            return ts;
        }
        assert!(
            Instant::now() < deadline,
            "routine {name}: {} ticks of {n} after {WAIT:?}: {ts:?}",
            ts.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn on_time(ts: &[(i64, i64)]) {
    for (tick, landed) in ts {
        assert!(
            landed - tick >= -1000 && landed - tick <= TOLERANCE_MS,
            "tick {tick} landed at {landed} ({} ms late)",
            landed - tick
        );
    }
}

/// A routine every second fires each tick once, on time, across `stop`
/// and `start` and across `kill -9`; missed ticks fire once on start;
/// removing it stops it.
#[test]
fn a_routine_fires_once_per_tick_across_restarts_and_stops_when_removed() {
    let mut node = Node::started();
    node.ok(["mkhost", "alice"]);
    let v = node.json([
        "routine", "add", "beat", "--to", "alice", "--every", "1s", "--text", "ping", "--json",
    ]);
    assert_eq!(v["name"], "beat", "{v}");
    assert_eq!(v["every_ms"], 1000, "{v}");
    assert_eq!(v["schedule"], "every 1s", "{v}");
    let ts = wait_ticks(&node, "beat", 3);
    on_time(&ts);
    let before = no_duplicates(&ts);
    // consecutive ticks, one second apart
    for w in before.windows(2) {
        assert_eq!(w[1] - w[0], 1000, "{before:?}");
    }

    // Stopped for a while: the ticks missed fire once, on start.
    node.stop();
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    node.start();
    let down_ms = stopped_at.elapsed().as_millis() as i64;
    let n = alice_ticks(&node, "beat").len();
    let ts = wait_ticks(&node, "beat", n + 3);
    let all = no_duplicates(&ts);
    let gaps: Vec<i64> = all.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().any(|g| *g >= 2000),
        "no gap in the ticks while it was stopped for {down_ms} ms: {all:?}"
    );
    assert!(
        gaps.iter().all(|g| *g <= down_ms + 2 * TOLERANCE_MS),
        "a gap larger than the downtime: {gaps:?}"
    );
    on_time(&ts[n..]);

    // kill -9 mid-stream, then start again.
    node.kill9();
    std::thread::sleep(Duration::from_millis(2500));
    node.start();
    let n = alice_ticks(&node, "beat").len();
    let ts = wait_ticks(&node, "beat", n + 3);
    no_duplicates(&ts);
    on_time(&ts[n..]);

    let list = node.json(["routine", "list", "--json"]);
    let r = &list[0];
    assert_eq!(r["name"], "beat", "{list}");
    assert_eq!(r["to"], "alice", "{list}");
    assert!(r["fired"].as_u64().unwrap() >= ts.len() as u64, "{list}");

    // Removed: nothing fires after the removal returned.
    node.ok(["routine", "remove", "beat"]);
    let n = alice_ticks(&node, "beat").len();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(alice_ticks(&node, "beat").len(), n, "a tick after removal");
    assert_eq!(
        node.json(["routine", "list", "--json"]),
        serde_json::json!([])
    );
    let (code, e) = node.fail(["routine", "remove", "beat"]);
    assert_eq!(code, 1, "{e}");
    assert!(e.contains("no routine \"beat\""), "{e}");
}

/// Bad specs are refused with a clear error and change nothing.
#[test]
fn bad_routine_specs_are_refused_and_change_nothing() {
    let node = Node::started();
    node.ok(["mkhost", "alice"]);
    node.ok(["store", "--text", "hello", "--name", "note"]);
    node.ok([
        "routine",
        "add",
        "ok",
        "--to",
        "alice",
        "--cron",
        "*/5 * * * *",
        "--text",
        "x",
    ]);
    let base = ["routine", "add", "r", "--to", "alice"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--every", "0s", "--text", "x"],
            "the shortest interval is 1s",
        ),
        (vec!["--every", "500ms", "--text", "x"], "invalid --every"),
        (vec!["--every", "5x", "--text", "x"], "invalid --every"),
        (vec!["--every", "10", "--text", "x"], "invalid --every"),
        (
            vec!["--every", "400d", "--text", "x"],
            "the longest interval",
        ),
        (
            vec!["--cron", "* * * *", "--text", "x"],
            "4 fields instead of 5",
        ),
        (vec!["--cron", "61 * * * *", "--text", "x"], "out of range"),
        (vec!["--cron", "* * 30 2 *", "--text", "x"], "never fires"),
        (
            vec!["--every", "1s", "--cron", "* * * * *", "--text", "x"],
            "cannot be used with",
        ),
        (vec!["--text", "x"], "--every"),
        (vec!["--every", "1s", "--text", "  "], "needs a --text"),
    ];
    for (extra, want) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter());
        let (code, e) = node.fail(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
    let (_, e) = node.fail([
        "routine", "add", "r", "--to", "nobody", "--every", "1s", "--text", "x",
    ]);
    assert!(e.contains("unknown name \"nobody\""), "{e}");
    let (_, e) = node.fail([
        "routine", "add", "r", "--to", "note", "--every", "1s", "--text", "x",
    ]);
    assert!(e.contains("not a agent") || e.contains("is a value"), "{e}");
    let (_, e) = node.fail([
        "routine", "add", "Bad!", "--to", "alice", "--every", "1s", "--text", "x",
    ]);
    assert!(e.contains("invalid name"), "{e}");
    let (_, e) = node.fail([
        "routine", "add", "ok", "--to", "alice", "--every", "1s", "--text", "x",
    ]);
    assert!(e.contains("exists already"), "{e}");
    let big = "x".repeat(20_000);
    let (_, e) = node.fail([
        "routine",
        "add",
        "r",
        "--to",
        "alice",
        "--every",
        "1s",
        "--text",
        big.as_str(),
    ]);
    assert!(e.contains("exceeds the limit"), "{e}");
    let list = node.json(["routine", "list", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["ok"], "{list}");
    assert_eq!(list[0]["cron"], "*/5 * * * *", "{list}");
}

/// A guest that fails on every message: its host hears of the first
/// failure and, once, that it keeps failing, whatever the number of
/// failing messages; the runner backs off between them and carries on.
#[test]
fn a_guest_that_keeps_failing_is_reported_once_per_episode() {
    let node = Node::started();
    let wasm = guest_wasm("panicker");
    node.ok(["install", wasm.as_str(), "--name", "panicker"]);
    node.ok(["mkguest", "bad", "--component", "panicker"]);
    let n = 6;
    for i in 0..n {
        node.ok(["send", "bad", &format!("m{i}")]);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let gs = node.json(["guests"]);
        let g = gs
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "bad")
            .cloned()
            .unwrap();
        if g["failures"].as_u64() == Some(n) {
            break;
        }
        assert!(Instant::now() < deadline, "not all messages failed: {g}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // the last failure's mail (if any) commits with its mark
    std::thread::sleep(Duration::from_millis(500));
    let from_bad: Vec<String> = node
        .inbox(&[])
        .iter()
        .filter(|m| m["from"] == "bad")
        .map(|m| texts(std::slice::from_ref(m)).concat())
        .collect();
    let stopped = from_bad
        .iter()
        .filter(|t| t.contains("guest stopped"))
        .count();
    let episode: Vec<&String> = from_bad
        .iter()
        .filter(|t| t.contains("keeps failing"))
        .collect();
    assert_eq!(stopped, 1, "{from_bad:#?}");
    assert_eq!(episode.len(), 1, "{from_bad:#?}");
    assert!(
        episode[0].starts_with("guest bad keeps failing: "),
        "{episode:?}"
    );
    assert!(episode[0].contains("it panicked"), "{episode:?}");
    assert!(episode[0].contains("retrying with backoff"), "{episode:?}");
    assert_eq!(from_bad.len(), 2, "{from_bad:#?}");
    node.ok(["ping"]);
}

// ---------------------------------------------------------------------------
// Cluster

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn wait_for(what: &str, f: impl Fn() -> Option<Value>) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three nodes on etcd: the routine fires once per tick; its owner is
/// killed with `kill -9` and a survivor takes it over (a gap is allowed;
/// no tick fires twice) and fires on time.
#[test]
fn a_routine_fires_once_per_tick_while_its_owner_is_killed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(spec) = capstan_tests::etcd_spec("routine") else {
        return;
    };
    let mut nodes = capstan_tests::start_cluster(&spec, 3, "5000");
    nodes[0].ok(["mkhost", "alice"]);
    nodes[0].ok([
        "routine", "add", "beat", "--to", "alice", "--every", "1s", "--text", "ping",
    ]);
    let ts = wait_ticks(&nodes[0], "beat", 3);
    no_duplicates(&ts);
    let owner = wait_for("the routine's owner", || {
        let l = nodes[1].json(["routine", "list", "--json"]);
        l[0]["owner"].as_str().map(|s| Value::from(s.to_string()))
    });
    let owner = owner.as_str().unwrap().to_string();
    let killed: usize = owner[1..].parse::<usize>().unwrap() - 1;
    let survivor = (killed + 1) % 3;
    let n_before = alice_ticks(&nodes[survivor], "beat").len();
    nodes[killed].kill9();
    // A survivor takes over (after the lease) and fires on: the ticks it
    // fires after the take-over's catch-up land on time.
    let ts = wait_ticks(&nodes[survivor], "beat", n_before + 8);
    let all = no_duplicates(&ts);
    on_time(&ts[ts.len() - 3..]);
    let new_owner = nodes[survivor].json(["routine", "list", "--json"])[0]["owner"].clone();
    assert_ne!(new_owner, Value::from(owner.clone()), "no take-over");
    // once per tick: every tick from the first to the last, or a gap
    // while nobody owned it, never one twice (checked above)
    for w in all.windows(2) {
        assert!(w[1] - w[0] >= 1000, "{all:?}");
    }
    // the inbox's numbers are unique too
    let inbox = nodes[survivor].inbox(&["--as", "alice"]);
    let ns: BTreeSet<u64> = inbox
        .iter()
        .map(|m| m["number"].as_u64().unwrap())
        .collect();
    assert_eq!(ns.len(), inbox.len());
    nodes[survivor].ok(["routine", "remove", "beat"]);
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != killed {
            n.stop();
        }
    }
}
