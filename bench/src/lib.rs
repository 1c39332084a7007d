//! `capstan-bench` (run as `capstan bench`): the issue-2 benchmark table,
//! measured end to end.
//!
//! Every figure goes through the real path a user's command takes: a daemon
//! process (`capstan start --foreground`, the `capstan` binary given by
//! `--capstan`, or the one beside this executable) on a temporary home with
//! the embedded store, driven over its control socket with Cap'n Proto RPC.
//! Sends, requests and resolves are acknowledged only after their store
//! transaction committed (fsync), so every write figure is a durable one.
//!
//! The benchmark is a crate of its own (issue 14): its process manager, its
//! calls and its model server do not ship in the production binary, which
//! only forwards `capstan bench ARGS` here. It reuses the node library's
//! client, home layout and network, and the end-to-end tests' model server
//! (`capstan_tests::llm_server`).
//!
//! Timing targets live here and in `../shared/ANCHORS.md`, never in tests.
//!
//! # Layout
//!
//! - this module: [`run`] (the single-node rows, then each section) and the
//!   table ([`Sizes`], its rows, `print_rows`); [`capstan_exe`], the binary
//!   measured;
//! - `main.rs`: the command line (`capstan-bench --help`);
//! - `process`: the daemon child processes, and CPU and memory from `/proc`;
//! - `calls`: the calls the rows make, run `concurrently` and timed;
//! - `search`, `guests`, `agents` (the evaluator and the LLM agent, with a
//!   model server on loopback), `network` (two nodes, federation),
//!   `cluster` (`--cluster`), `spread` (the cluster's guests made and
//!   mailed through one node, under each placement policy): the sections;
//! - `sends`: a phase of durable sends through a cluster, and what the
//!   nodes' store counters, the commits' waits and the CPU say it cost;
//! - `soak`: `--soak` and `--gc-formulas`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, bail};
use capstan_proto::RequestId;
use serde_json::json;

use capstan::client;
use capstan::home::Paths;
use capstan::output::print_json;

mod agents;
mod calls;
mod cluster;
mod guests;
mod network;
mod process;
mod search;
mod sends;
mod soak;
mod spread;

use agents::agent_rows;
use calls::{
    as_agent, concurrently, host, inbox_len, last_inbox_number, list_len, mkguest, ms, remove,
    send, stats, store_text,
};
use cluster::cluster_rows;
use guests::guest_rows;
use network::{federation_rows, net_rows};
use process::Daemon;
use search::search_rows;
pub use soak::{gc_row, soak};

static CAPSTAN: OnceLock<PathBuf> = OnceLock::new();

/// Sets the `capstan` binary whose daemons are measured (`--capstan`);
/// the first call wins.
pub fn set_capstan_exe(path: PathBuf) {
    let _ = CAPSTAN.set(path);
}

/// The `capstan` binary measured: the one set by [`set_capstan_exe`], else
/// `capstan` beside this executable (both are built into the same target
/// directory).
pub fn capstan_exe() -> anyhow::Result<PathBuf> {
    if let Some(p) = CAPSTAN.get() {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot find this executable")?;
    let beside = me.with_file_name("capstan");
    if !beside.exists() {
        bail!(
            "no capstan binary beside {}: build it (`cargo build --release -p capstan`) or name one with --capstan PATH",
            me.display()
        );
    }
    Ok(beside)
}

/// Sizes of a run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub sends: usize,
    pub senders: usize,
    /// With a cluster: trace one send in `sends::TRACE_EVERY` of the host's
    /// sends phase and write their spans here as a Chrome trace.
    pub trace: Option<PathBuf>,
    pub round_trips: usize,
    pub names: usize,
    pub messages: usize,
    pub guests: usize,
    pub net: bool,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            sends: 2000,
            senders: 64,
            trace: None,
            round_trips: 300,
            names: 10_000,
            messages: 10_000,
            // the guest memory target is stated for 10,000 guest agents:
            // measure that many (fixed costs, e.g. the instance pool, are
            // then spread as they are in use)
            guests: 10_000,
            net: true,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            sends: 200,
            senders: 16,
            trace: None,
            round_trips: 30,
            names: 500,
            messages: 500,
            guests: 100,
            net: true,
        }
    }
}

/// One line of the table.
struct Row {
    what: String,
    value: String,
    target: &'static str,
    endo: &'static str,
    json: serde_json::Value,
}

fn step(quiet: bool, what: &str) {
    if !quiet {
        eprintln!("bench: {what}…");
    }
}

/// Runs every benchmark; prints the table (or one JSON object).
#[allow(clippy::too_many_arguments)] // one per `bench` flag
pub async fn run(
    sizes: Sizes,
    dir: Option<PathBuf>,
    guests: PathBuf,
    cluster: Option<String>,
    nodes: usize,
    only: Option<String>,
    embed_model: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    if embed_model.is_some() && only.as_deref() != Some("search") {
        bail!("--embed-model measures the search section: add --only search");
    }
    match (only.as_deref(), cluster.is_some()) {
        (Some("search"), true) => bail!("--only search is a single-node section: drop --cluster"),
        (Some(o), false) if o != "search" => {
            bail!("--only {o} is a cluster section: add --cluster etcd://HOST:PORT,...")
        }
        _ => {}
    }
    let exe = crate::capstan_exe()?;
    let tmp;
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("capstan-bench").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut rows = Vec::new();
    let quiet = false;
    if let Some(spec) = cluster {
        cluster_rows(
            &exe,
            &base,
            &spec,
            &guests,
            nodes,
            &sizes,
            only.as_deref(),
            &mut rows,
        )
        .await?;
        print_rows(
            &rows,
            json,
            &format!(
                "{nodes} node{} on a replicated etcd store",
                if nodes == 1 { "" } else { "s" }
            ),
        );
        return Ok(());
    }

    if only.as_deref() == Some("search") {
        let paths = Paths::resolve(Some(base.join("search")))?;
        let model = embed_model
            .as_ref()
            .map(|d| d.to_string_lossy().to_string());
        let extra: Vec<&str> = match &model {
            Some(m) => vec!["--embed-model", m],
            None => vec![],
        };
        let (d, _) = Daemon::spawn_with(&exe, &paths, &extra).await?;
        let h = host(&paths).await?;
        let mut conns = Vec::new();
        for _ in 0..sizes.senders {
            conns.push(host(&paths).await?);
        }
        search_rows(&h, &conns, &sizes, quiet, &mut rows).await?;
        drop((h, conns));
        d.stop().await?;
        print_rows(&rows, json, "embedded redb store with fsync");
        return Ok(());
    }

    // 1. Cold start to first answer (fresh home each time), and its memory.
    step(quiet, "cold start");
    let mut starts = Vec::new();
    let mut rss0 = 0;
    for i in 0..5 {
        let paths = Paths::resolve(Some(base.join(format!("cold-{i}"))))?;
        let (d, t) = Daemon::spawn(&exe, &paths).await?;
        starts.push(t);
        rss0 = d.rss_kib()?;
        d.stop().await?;
    }
    let s = stats(starts);
    rows.push(Row {
        what: "cold start to first answer (fresh home)".into(),
        value: ms(s.p50),
        target: "< 50 ms",
        endo: "~1.2 s",
        json: json!({"p50_us": s.p50}),
    });
    rows.push(Row {
        what: "daemon memory after start (RSS)".into(),
        value: format!("{:.1} MiB", rss0 as f64 / 1024.0),
        target: "< 30 MB",
        endo: "64 MB + 60 MB worker",
        json: json!({"rss_kib": rss0}),
    });

    let paths = Paths::resolve(Some(base.join("main")))?;
    let (d, _) = Daemon::spawn(&exe, &paths).await?;
    let h = host(&paths).await?;
    mkguest(&h, "g0").await?;

    // 2. Durable sends, one sender: latency of each acknowledged send.
    step(quiet, "sends, 1 sender");
    let t = Instant::now();
    let hh = h.clone();
    let lat = concurrently(
        sizes.sends,
        1,
        move |i| {
            let hh = hh.clone();
            async move { send(&hh, "g0", &format!("message {i}")).await.map(drop) }
        },
        "send",
    )
    .await?;
    let rate1 = sizes.sends as f64 / t.elapsed().as_secs_f64();
    let s = stats(lat);
    rows.push(Row {
        what: "host → guest send, durable, 1 sender (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "< 1 ms",
        endo: "41–57 ms",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "per_s": rate1}),
    });

    // 3. Durable sends, N senders on their own connections.
    step(quiet, &format!("sends, {} senders", sizes.senders));
    let mut conns = Vec::new();
    for _ in 0..sizes.senders {
        conns.push(host(&paths).await?);
    }
    let conns = Rc::new(conns);
    let total = sizes.sends * 4;
    let t = Instant::now();
    let c2 = conns.clone();
    let lat = concurrently(
        total,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { send(&a, "g0", &format!("burst {i}")).await.map(drop) }
        },
        "concurrent send",
    )
    .await?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let s = stats(lat);
    rows.push(Row {
        what: format!("sends per second, durable, {} senders", sizes.senders),
        value: format!("{rate:.0} /s (p50 {})", ms(s.p50)),
        target: "> 5,000 /s",
        endo: "9–35 /s",
        json: json!({"per_s": rate, "p50_us": s.p50, "p99_us": s.p99, "senders": sizes.senders}),
    });
    rows.push(Row {
        what: "sends per second, durable, 1 sender".into(),
        value: format!("{rate1:.0} /s"),
        target: "",
        endo: "",
        json: json!({"per_s": rate1}),
    });

    // 4. request → resolve → the requester sees it.
    step(quiet, "request/resolve round trips");
    store_text(&h, "answer", "42").await?;
    let g = as_agent(&h, "g0");
    let mut host_next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let mut lat = Vec::new();
    for i in 0..sizes.round_trips {
        let t = Instant::now();
        let mut r = g.request_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_to("HOST");
        r.get().set_description("need the answer");
        r.get().set_result_name(format!("doc-{i}").as_str());
        let number = r.send().promise.await?.get()?.get_number();
        let mut r = h.resolve_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_number(host_next);
        r.get().set_path("answer");
        r.send()
            .promise
            .await
            .with_context(|| format!("resolving host message {host_next}"))?;
        let mut w = g.wait_request_request();
        w.get().set_number(number);
        let state = w.send().promise.await?;
        let state = state.get()?.get_state()?.to_string()?;
        if state != "resolved" {
            bail!("request {number} ended {state:?}, expected resolved");
        }
        lat.push(t.elapsed());
        host_next += 1;
    }
    let s = stats(lat);
    rows.push(Row {
        what: "request → resolve → requester sees it, durable (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "< 2 ms",
        endo: "86–100 ms",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    // 5. list names with N entries.
    step(quiet, &format!("storing {} names", sizes.names));
    let c2 = conns.clone();
    concurrently(
        sizes.names,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { store_text(&a, &format!("v-{i}"), "x").await }
        },
        "store",
    )
    .await?;
    step(quiet, "list");
    let mut lat = Vec::new();
    let mut n = 0;
    for _ in 0..20 {
        let t = Instant::now();
        n = list_len(&h).await?;
        lat.push(t.elapsed());
    }
    if (n as usize) < sizes.names {
        bail!("list returned {n} names, expected at least {}", sizes.names);
    }
    let s = stats(lat);
    rows.push(Row {
        what: format!("list names, {n} entries (socket API)"),
        value: ms(s.p50),
        target: "< 0.5 ms (Endo's lists are small)",
        endo: "11–38 ms",
        json: json!({"p50_us": s.p50, "entries": n}),
    });
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let _ = list_len(&as_agent(&h, "g0")).await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "list names, a guest's few entries (socket API)".into(),
        value: ms(s.p50),
        target: "< 0.5 ms",
        endo: "11–38 ms",
        json: json!({"p50_us": s.p50}),
    });

    // 5a. Search over N values (issue 20): full text, in-memory index.
    search_rows(&h, &conns, &sizes, quiet, &mut rows).await?;

    // 5b. A garbage-collection pass freeing the N values just listed.
    step(quiet, &format!("removing {} names, then gc", sizes.names));
    let c2 = conns.clone();
    concurrently(
        sizes.names,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { remove(&a, &format!("v-{i}")).await }
        },
        "remove",
    )
    .await?;
    let t = Instant::now();
    let report = capstan::client::gc(&paths, 86_400_000).await?;
    let took = t.elapsed();
    let freed = report
        .iter()
        .find(|(k, _)| *k == "formulas")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(0);
    rows.push(Row {
        what: format!("gc pass freeing {freed} removed values"),
        value: format!("{:.0} ms", took.as_secs_f64() * 1000.0),
        target: "",
        endo: "",
        json: json!({"ms": took.as_secs_f64() * 1000.0, "freed": freed}),
    });

    // 6. One CLI command, as a process.
    step(quiet, "CLI commands");
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let out = Command::new(&exe)
            .args(["ping", "--home"])
            .arg(&paths.home)
            .env_remove("CAPSTAN_HOME")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "capstan ping failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "one CLI command (`capstan ping`, whole process)".into(),
        value: ms(s.p50),
        target: "< 20 ms",
        endo: "0.6–1.5 s",
        json: json!({"p50_us": s.p50}),
    });

    // 7. Memory per idle incarnated guest.
    step(quiet, &format!("{} guests", sizes.guests));
    let c2 = conns.clone();
    concurrently(
        sizes.guests,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { mkguest(&a, &format!("guest-{i}")).await }
        },
        "mkguest",
    )
    .await?;
    let before_inc = client::ping(&paths).await?.incarnations;
    let before = d.rss_kib()?;
    let c2 = conns.clone();
    concurrently(
        sizes.guests,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { send(&a, &format!("guest-{i}"), "wake up").await.map(drop) }
        },
        "wake guests",
    )
    .await?;
    let after = d.rss_kib()?;
    let after_inc = client::ping(&paths).await?.incarnations;
    let woken = after_inc.saturating_sub(before_inc).max(1);
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / woken as f64;
    rows.push(Row {
        what: format!("memory per idle incarnated guest ({woken} woken, RSS delta)"),
        value: format!("{:.1} KiB", per / 1024.0),
        target: "< 100 KB",
        endo: "a 60 MB process",
        json: json!({"bytes": per, "woken": woken}),
    });

    // 8. Restart with many messages in an inbox: kill -9, start, first answers.
    let have = inbox_len(&g).await? as usize;
    if have < sizes.messages {
        step(quiet, &format!("filling g0's inbox to {}", sizes.messages));
        let c2 = conns.clone();
        concurrently(
            sizes.messages - have,
            sizes.senders,
            move |i| {
                let a = c2[i % c2.len()].clone();
                async move { send(&a, "g0", &format!("fill {i}")).await.map(drop) }
            },
            "fill",
        )
        .await?;
    }
    drop(conns);
    drop(g);
    drop(h);
    step(quiet, "kill -9 and restart");
    d.kill9()?;
    let (d, first) = Daemon::spawn(&exe, &paths).await?;
    let h = host(&paths).await?;
    let t = Instant::now();
    let n = inbox_len(&as_agent(&h, "g0")).await?;
    let inbox_t = t.elapsed();
    rows.push(Row {
        what: format!("restart after kill -9 to first answer ({n} messages in g0's inbox)"),
        value: ms(first.as_secs_f64() * 1e6),
        target: "< 100 ms",
        endo: "2.3–2.7 s (1k msgs)",
        json: json!({"first_answer_us": first.as_secs_f64() * 1e6, "messages": n}),
    });
    rows.push(Row {
        what: format!("then read the whole inbox ({n} messages)"),
        value: ms(inbox_t.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": inbox_t.as_secs_f64() * 1e6}),
    });
    drop(h);
    d.stop().await?;

    guest_rows(&exe, &base, &guests, &sizes, &mut rows).await?;
    agent_rows(&exe, &base, &guests, &sizes, &mut rows).await?;

    if sizes.net {
        net_rows(&exe, &base, &sizes, &mut rows).await?;
        federation_rows(&exe, &base, &mut rows).await?;
    }

    print_rows(&rows, json, "embedded redb store with fsync");
    Ok(())
}

fn print_rows(rows: &[Row], json: bool, store: &str) {
    if json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| (r.what.clone(), r.json.clone()))
            .collect();
        print_json(&serde_json::Value::Object(obj));
    } else {
        let w = rows
            .iter()
            .map(|r| r.what.chars().count())
            .max()
            .unwrap_or(0);
        let v = rows
            .iter()
            .map(|r| r.value.chars().count())
            .max()
            .unwrap_or(0);
        println!(
            "{:w$}  {:v$}  {:12}  Endo (quoted, not measured here)",
            "measure", "Capstan", "target"
        );
        for r in rows {
            println!("{:w$}  {:v$}  {:12}  {}", r.what, r.value, r.target, r.endo);
        }
        println!(
            "\nThe Endo column quotes figures measured for Endo's daemon (Node.js, on a\n\
             machine like this one: the project's ANCHORS.md); this run did not measure\n\
             Endo, so compare orders of magnitude, not digits."
        );
        println!(
            "\n({store}; {} build; every write acknowledged after commit)",
            if cfg!(debug_assertions) {
                "DEBUG — `cargo build --release -p capstan -p capstan-bench` for real figures"
            } else {
                "release"
            }
        );
    }
}
