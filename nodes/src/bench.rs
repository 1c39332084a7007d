//! `capstan bench`: the issue-2 benchmark table, measured end to end.
//!
//! Every figure goes through the real path a user's command takes: a daemon
//! process (`capstan start --foreground`, this very binary) on a temporary home with the
//! embedded store, driven over its control socket with Cap'n Proto RPC.
//! Sends, requests and resolves are acknowledged only after their store
//! transaction committed (fsync), so every write figure is a durable one.
//!
//! Timing targets live here and in `../shared/ANCHORS.md`, never in tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capnp::Error as CapError;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::{agent, node};
use serde_json::json;

use crate::client;
use crate::home::Paths;
use crate::output::print_json;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub sends: usize,
    pub senders: usize,
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

/// A daemon child process on the bench home.
struct Daemon {
    child: Child,
    paths: Paths,
}

impl Daemon {
    /// Spawns `capstan start --foreground` and waits for its first answer; returns the time
    /// from spawn to that answer.
    async fn spawn(exe: &Path, paths: &Paths) -> anyhow::Result<(Daemon, Duration)> {
        Daemon::spawn_with(exe, paths, &[]).await
    }

    /// Like [`Daemon::spawn`], with extra `start` arguments (`--store`, `--listen`).
    async fn spawn_with(
        exe: &Path,
        paths: &Paths,
        extra: &[&str],
    ) -> anyhow::Result<(Daemon, Duration)> {
        std::fs::create_dir_all(&paths.home)
            .with_context(|| format!("cannot create {}", paths.home.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.home.join("bench-daemon.log"))
            .context("cannot open the bench daemon's log")?;
        let t0 = Instant::now();
        let child = Command::new(exe)
            .arg("start")
            .arg("--foreground")
            .arg("--home")
            .arg(&paths.home)
            .args(extra)
            .env_remove("CAPSTAN_HOME")
            .env("CAPSTAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        let mut d = Daemon {
            child,
            paths: paths.clone(),
        };
        loop {
            if client::ping(paths).await.is_ok() {
                return Ok((d, t0.elapsed()));
            }
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "the bench daemon exited ({status}) before answering; see {}",
                    paths.home.join("bench-daemon.log").display()
                );
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the bench daemon did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }

    /// SIGKILL, then reap.
    fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// A graceful stop.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = client::stop(&self.paths).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident set size of a process, in KiB.
/// CPU time (user + system) a process used so far, in clock ticks
/// (`/proc/PID/stat` fields 14 and 15); 0 when it cannot be read (gone).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // rest starts at field 3 (state): utime is field 14, stime 15.
    field(11) + field(12)
}

/// Pids of the etcd members serving `spec`'s endpoints (an `etcd` process
/// whose command line names one of them): the bench's store, not any other
/// etcd on the machine.
fn etcd_pids(spec: &str) -> Vec<u32> {
    let hosts = spec.trim_start_matches("etcd://");
    let hosts = hosts.split(['/', '?']).next().unwrap_or("");
    let endpoints: Vec<&str> = hosts.split(',').filter(|e| !e.is_empty()).collect();
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "etcd" {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if endpoints.iter().any(|ep| cmd.contains(ep)) {
            pids.push(pid);
        }
    }
    pids
}

/// CPU used by the nodes, the store's members and this process (the
/// clients) over a stretch of the bench: per operation it says where the
/// work goes, and unlike a rate it holds on a machine busy with other work.
struct CpuMeter {
    nodes: Vec<u32>,
    etcd: Vec<u32>,
    start: [u64; 3],
}

impl CpuMeter {
    fn start(nodes: Vec<u32>, etcd: Vec<u32>) -> CpuMeter {
        let mut m = CpuMeter {
            nodes,
            etcd,
            start: [0; 3],
        };
        m.start = m.read();
        m
    }

    fn read(&self) -> [u64; 3] {
        [
            self.nodes.iter().map(|p| cpu_ticks(*p)).sum(),
            self.etcd.iter().map(|p| cpu_ticks(*p)).sum(),
            cpu_ticks(std::process::id()),
        ]
    }

    /// "nodes 210 µs, store 480 µs, clients 60 µs" of CPU per operation.
    fn per_op(&self, ops: usize) -> (String, serde_json::Value) {
        // /proc reports clock ticks of USER_HZ, 100 on every Linux port.
        let hz = 100.0;
        let now = self.read();
        let us =
            |i: usize| (now[i].saturating_sub(self.start[i])) as f64 / hz * 1e6 / ops.max(1) as f64;
        let (n, e, c) = (us(0), us(1), us(2));
        let text = if self.etcd.is_empty() {
            format!("nodes {n:.0} µs, clients {c:.0} µs (store members not found)")
        } else {
            format!(
                "nodes {n:.0} µs, store {e:.0} µs ({} members), clients {c:.0} µs",
                self.etcd.len()
            )
        };
        (text, json!({"nodes_us": n, "store_us": e, "clients_us": c}))
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc status")
}

/// Percentiles of a sample, in microseconds.
struct Stats {
    p50: f64,
    p99: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    Stats {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn ms(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{:.0} µs", us)
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// A connection acting as the root host (pipelined: no extra round trip).
async fn host(paths: &Paths) -> anyhow::Result<agent::Client> {
    let node: node::Client = client::connect(&paths.socket).await?;
    Ok(node.host_request().send().pipeline.get_agent())
}

fn as_agent(host: &agent::Client, path: &str) -> agent::Client {
    let mut r = host.agent_request();
    r.get().set_path(path);
    r.send().pipeline.get_agent()
}

async fn send(a: &agent::Client, to: &str, text: &str) -> Result<u64, CapError> {
    let mut r = a.send_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_to(to);
    p.reborrow().init_strings(1).set(0, text);
    p.reborrow().init_refs(0);
    Ok(r.send().promise.await?.get()?.get_number())
}

async fn mkguest(a: &agent::Client, path: &str) -> Result<(), CapError> {
    let mut r = a.mkguest_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path(path);
    r.send().promise.await?;
    Ok(())
}

async fn store_text(a: &agent::Client, path: &str, text: &str) -> Result<(), CapError> {
    let mut r = a.store_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_path(path);
    p.set_kind(capstan_proto::api_capnp::ValueKind::Text);
    p.set_data(text.as_bytes());
    r.send().promise.await?;
    Ok(())
}

async fn remove(a: &agent::Client, path: &str) -> Result<(), CapError> {
    let mut r = a.remove_request();
    let mut p = r.get();
    p.set_req_id(&RequestId::random().0);
    p.set_path(path);
    r.send().promise.await?;
    Ok(())
}

async fn list_len(a: &agent::Client) -> Result<u32, CapError> {
    let mut r = a.list_request();
    r.get().set_path("");
    Ok(r.send().promise.await?.get()?.get_entries()?.len())
}

/// The number of messages and the highest message number of `a`'s inbox,
/// read a page of 10000 at a time.
async fn inbox_scan(a: &agent::Client) -> Result<(u32, Option<u64>), CapError> {
    let (mut count, mut last, mut from) = (0u32, None, 0u64);
    loop {
        let mut r = a.inbox_request();
        r.get().set_from(from);
        r.get().set_limit(10_000);
        let answer = r.send().promise.await?;
        let answer = answer.get()?;
        let messages = answer.get_messages()?;
        count += messages.len();
        if let Some(n) = messages.iter().map(|m| m.get_number()).max() {
            last = Some(n);
            from = n + 1;
        }
        if !answer.get_more() {
            return Ok((count, last));
        }
    }
}

async fn inbox_len(a: &agent::Client) -> Result<u32, CapError> {
    Ok(inbox_scan(a).await?.0)
}

async fn last_inbox_number(a: &agent::Client) -> Result<Option<u64>, CapError> {
    Ok(inbox_scan(a).await?.1)
}

/// Commits/s of blind 3-key transactions (a send writes two message records
/// and an exactly-once record) from `writers` concurrent writers straight
/// through the store layer, with its batching; and their p50 latency (µs).
async fn store_ceiling(
    spec: &str,
    writers: usize,
    total: usize,
    reads: bool,
) -> anyhow::Result<(f64, f64)> {
    let db = capstan_cluster::open(spec).await?;
    let t = Instant::now();
    let lat = concurrently(
        total,
        writers,
        move |i| {
            let db = db.clone();
            let key = move |j: u64| {
                capstan_cluster::tuple::TupleKey::new()
                    .str("bench-ceiling")
                    .u64(i as u64)
                    .u64(j)
                    .into_vec()
            };
            let (a, b, c) = (key(0), key(1), key(2));
            async move {
                db.transact(move |tx| {
                    let (a, b, c) = (a.clone(), b.clone(), c.clone());
                    Box::pin(async move {
                        if reads {
                            // a send's shape: its keys, and as many again
                            // that it only reads
                            let more: Vec<Vec<u8>> = [&a, &b, &c]
                                .iter()
                                .map(|k| [k.as_slice(), b"r"].concat())
                                .collect();
                            let all = [a.clone(), b.clone(), c.clone()]
                                .into_iter()
                                .chain(more)
                                .collect::<Vec<_>>();
                            tx.prefetch(&all).await?;
                            for k in &all {
                                tx.get(k).await?;
                            }
                        }
                        tx.set(&a, &[7u8; 200])?;
                        tx.set(&b, &[7u8; 200])?;
                        tx.set(&c, &[7u8; 48])?;
                        Ok::<_, capstan_cluster::StoreError>(())
                    })
                })
                .await
                .map_err(|e| CapError::failed(e.to_string()))
            }
        },
        "store alone",
    )
    .await?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    Ok((rate, stats(lat).p50))
}

/// Runs `jobs` futures made by `make(i)` with at most `width` in flight;
/// returns each one's latency.
async fn concurrently<F, Fut>(
    jobs: usize,
    width: usize,
    make: F,
    progress: &str,
) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(usize) -> Fut + 'static,
    Fut: std::future::Future<Output = Result<(), CapError>> + 'static,
{
    let make = Rc::new(make);
    let next = Rc::new(std::cell::Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..width.max(1) {
        let make = make.clone();
        let next = next.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.get();
                if i >= jobs {
                    break;
                }
                next.set(i + 1);
                let t = Instant::now();
                make(i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, CapError>(lat)
        }));
    }
    let mut all = Vec::with_capacity(jobs);
    for t in tasks {
        all.extend(t.await?.with_context(|| format!("{progress} failed"))?);
    }
    Ok(all)
}

fn step(quiet: bool, what: &str) {
    if !quiet {
        eprintln!("bench: {what}…");
    }
}

/// Runs every benchmark; prints the table (or one JSON object).
pub async fn run(
    sizes: Sizes,
    dir: Option<PathBuf>,
    guests: PathBuf,
    cluster: Option<String>,
    nodes: usize,
    only: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
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
        cluster_rows(&exe, &base, &spec, &guests, nodes, &sizes, &mut rows).await?;
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
        let (d, _) = Daemon::spawn(&exe, &paths).await?;
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
    let report = crate::client::gc(&paths, 86_400_000).await?;
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

/// Words for the search corpus: each value is a few of them and a number.
const SEARCH_WORDS: [&str; 24] = [
    "invoice",
    "weather",
    "flight",
    "recipe",
    "doctor",
    "engine",
    "guitar",
    "apartment",
    "budget",
    "meeting",
    "garden",
    "server",
    "report",
    "ticket",
    "coffee",
    "library",
    "market",
    "river",
    "planet",
    "window",
    "letter",
    "camera",
    "bridge",
    "forest",
];

/// `capstan search` latency over `sizes.names` values (a search capability
/// over a directory of them, full text): p50 and p99 of searches after the
/// first (which builds the index; its time is reported apart).
async fn search_rows(
    h: &agent::Client,
    conns: &[agent::Client],
    sizes: &Sizes,
    quiet: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    step(quiet, &format!("storing {} values to search", sizes.names));
    let mut r = h.mkdir_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path("corpus");
    r.send().promise.await?;
    let c2 = conns.to_vec();
    concurrently(
        sizes.names,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            let w = |k: usize| SEARCH_WORDS[(i / k + k) % SEARCH_WORDS.len()];
            let text = format!(
                "note {i}: {} {} and {} for order ORD-{i:06} filed by the team",
                w(1),
                w(7),
                w(31)
            );
            async move { store_text(&a, &format!("corpus.n-{i}"), &text).await }
        },
        "store",
    )
    .await?;
    let search = |cmd: &'static str, args: serde_json::Value| {
        let h = h.clone();
        async move {
            let mut r = h.search_request();
            r.get().set_req_id(&RequestId::random().0);
            r.get().set_command(cmd);
            r.get().set_args(args.to_string().as_str());
            let a = r.send().promise.await?;
            let v: serde_json::Value = serde_json::from_str(a.get()?.get_json()?.to_str()?)?;
            anyhow::Ok(v)
        }
    };
    search("make", json!({"name": "corpus-search", "over": "corpus"})).await?;
    step(quiet, "search (first: builds the index)");
    let t = Instant::now();
    let first = search(
        "query",
        json!({"name": "corpus-search", "query": "invoice", "k": 10}),
    )
    .await?;
    let build = t.elapsed();
    let indexed = first["indexed"].as_u64().unwrap_or(0);
    if (indexed as usize) < sizes.names {
        bail!(
            "the search index holds {indexed} values, expected {}",
            sizes.names
        );
    }
    let mut lat = Vec::new();
    let (mut refresh, mut rank) = (Vec::new(), Vec::new());
    for i in 0..200usize {
        let q = if i % 2 == 0 {
            format!(
                "{} {}",
                SEARCH_WORDS[i % SEARCH_WORDS.len()],
                SEARCH_WORDS[(i * 7) % SEARCH_WORDS.len()]
            )
        } else {
            format!("ORD-{:06}", (i * 37) % sizes.names)
        };
        let t = Instant::now();
        let v = search(
            "query",
            json!({"name": "corpus-search", "query": q, "k": 10}),
        )
        .await?;
        lat.push(t.elapsed());
        if v["hits"].as_array().is_none_or(|a| a.is_empty()) {
            bail!("search {q:?} found nothing");
        }
        refresh.push(Duration::from_micros(v["refresh_us"].as_u64().unwrap_or(0)));
        rank.push(Duration::from_micros(v["rank_us"].as_u64().unwrap_or(0)));
    }
    let s = stats(lat);
    let (refresh, rank) = (stats(refresh), stats(rank));
    rows.push(Row {
        what: format!("search over {indexed} values, full text, k = 10 (p50 / p99)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "p50 < 10 ms",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "values": indexed,
            "refresh_p50_us": refresh.p50, "rank_p50_us": rank.p50}),
    });
    rows.push(Row {
        what: "  of which: check the directory for changes / rank (p50)".into(),
        value: format!("{} / {}", ms(refresh.p50), ms(rank.p50)),
        target: "",
        endo: "",
        json: json!({"refresh_p50_us": refresh.p50, "rank_p50_us": rank.p50}),
    });
    // Right after a write: the store changed, so the search reads the
    // directory's change log and indexes the new value (the write is not
    // timed).
    let mut lat = Vec::new();
    let mut refresh = Vec::new();
    for i in 0..50usize {
        store_text(
            h,
            &format!("corpus.late-{i}"),
            &format!("late note {i} about a garden"),
        )
        .await?;
        let q = format!("late note {i}");
        let t = Instant::now();
        let v = search(
            "query",
            json!({"name": "corpus-search", "query": q, "k": 10}),
        )
        .await?;
        lat.push(t.elapsed());
        refresh.push(Duration::from_micros(v["refresh_us"].as_u64().unwrap_or(0)));
        if v["hits"][0]["name"] != format!("late-{i}") {
            bail!("the search after storing corpus.late-{i} did not find it first: {v}");
        }
    }
    let s = stats(lat);
    let refresh = stats(refresh);
    rows.push(Row {
        what: format!("search right after a store, over {indexed} values (p50 / p99)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "p50 < 10 ms",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "refresh_p50_us": refresh.p50}),
    });
    rows.push(Row {
        what: "  of which: catch up with the write (p50)".into(),
        value: ms(refresh.p50),
        target: "",
        endo: "",
        json: json!({"refresh_p50_us": refresh.p50}),
    });
    rows.push(Row {
        what: format!("first search: builds the index of {indexed} values"),
        value: ms(build.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": build.as_secs_f64() * 1e6, "values": indexed}),
    });
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
                "DEBUG — use `cargo run --release -- bench` for real figures"
            } else {
                "release"
            }
        );
    }
}

/// The store counters of every node (`cluster status`: `store_stats`), summed.
async fn store_counters(hosts: &[agent::Client]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut sum = BTreeMap::new();
    for h in hosts {
        let mut r = h.cluster_request();
        r.get().set_command("status");
        r.get().set_arg("");
        let answer = r.send().promise.await?;
        let v: serde_json::Value = serde_json::from_str(answer.get()?.get_json()?.to_str()?)?;
        if let Some(m) = v.get("store_stats").and_then(|s| s.as_object()) {
            for (k, v) in m {
                *sum.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
            }
        }
    }
    Ok(sum)
}

/// What the store did between two readings of [`store_counters`], per
/// operation: "14.0 reads (0.41 ms), 2 snapshots (1.0 revision reads),
/// 3.0 commits in 3.0 Txns (2.9 ms)".
fn store_cost(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    ops: usize,
) -> (String, serde_json::Value) {
    let d = |k: &str| {
        after.get(k).copied().unwrap_or(0) as f64 - before.get(k).copied().unwrap_or(0) as f64
    };
    let per = |k: &str| d(k) / ops.max(1) as f64;
    let mean_ms = |us: &str, n: &str| {
        if d(n) > 0.0 { d(us) / d(n) / 1e3 } else { 0.0 }
    };
    let text = format!(
        "{:.1} snapshots ({:.1} revision reads), {:.1} reads in {:.1} requests ({:.2} ms), {:.1} commits in {:.1} Txns ({:.2} ms)",
        per("snapshots"),
        per("revision_reads"),
        per("reads"),
        per("read_rpcs"),
        mean_ms("read_us", "reads"),
        per("commits"),
        per("commit_txns"),
        mean_ms("commit_us", "commit_txns"),
    );
    let json = json!({
        "snapshots": per("snapshots"),
        "revision_reads": per("revision_reads"),
        "reads": per("reads"),
        "read_requests": per("read_rpcs"),
        "read_ms": mean_ms("read_us", "reads"),
        "commits": per("commits"),
        "conflicts": per("conflicts"),
        "commit_txns": per("commit_txns"),
        "commit_ms": mean_ms("commit_us", "commit_txns"),
    });
    (text, json)
}

/// The cluster section (`capstan bench --cluster etcd://… [--nodes N]`): N
/// daemons on the replicated store, measured end to end over their control
/// sockets.
async fn cluster_rows(
    exe: &Path,
    base: &Path,
    spec: &str,
    wasm: &Path,
    n: usize,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let nanos = crate::cluster::now_ms();
    // A fresh key prefix, so runs never see each other's state.
    let (base_spec, query) = match spec.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (spec, String::new()),
    };
    let spec = if base_spec.trim_start_matches("etcd://").contains('/') {
        format!("{base_spec}-bench-{nanos}{query}")
    } else {
        format!("{base_spec}/capstan-bench-{nanos}{query}")
    };
    step(false, &format!("cluster: init and {n} nodes"));
    let key_file = base.join("secrets.key");
    crate::cluster::init(&spec, &key_file).await?;
    let key_file = key_file.to_string_lossy().to_string();
    // What the store alone sustains, before any node runs: the ceiling of
    // durable sends on this machine.
    step(false, "cluster: the store alone");
    let cpu = CpuMeter::start(Vec::new(), etcd_pids(&spec));
    let (rate, p50) = store_ceiling(&spec, sizes.senders, sizes.sends * 2, false).await?;
    let (cpu_text, cpu_json) = cpu.per_op(sizes.sends * 2);
    let cpu = CpuMeter::start(Vec::new(), etcd_pids(&spec));
    let (rrate, rp50) = store_ceiling(&spec, sizes.senders, sizes.sends * 2, true).await?;
    let (rcpu_text, rcpu_json) = cpu.per_op(sizes.sends * 2);
    rows.push(Row {
        what: format!(
            "cluster: the store alone, commits/s of a send's 3 keys, {} writers (no reads: a ceiling for sends)",
            sizes.senders
        ),
        value: format!("{rate:.0} /s (p50 {}; CPU per commit: {cpu_text})", ms(p50)),
        target: "",
        endo: "",
        json: json!({"per_s": rate, "p50_us": p50, "cpu": cpu_json}),
    });
    rows.push(Row {
        what: "cluster: … the same commits after 6 point reads (a send's shape)".into(),
        value: format!(
            "{rrate:.0} /s (p50 {}; CPU per commit: {rcpu_text})",
            ms(rp50)
        ),
        target: "",
        endo: "",
        json: json!({"per_s": rrate, "p50_us": rp50, "cpu": rcpu_json}),
    });
    let mut daemons = Vec::new();
    let mut paths = Vec::new();
    for i in 1..=n {
        let p = Paths::resolve(Some(base.join(format!("n{i}"))))?;
        let (d, _) = Daemon::spawn_with(
            exe,
            &p,
            &[
                "--store",
                &spec,
                "--listen",
                "127.0.0.1:0",
                "--secrets-key",
                &key_file,
            ],
        )
        .await?;
        daemons.push(Some(d));
        paths.push(p);
    }
    let mut hosts = Vec::new();
    for p in &paths {
        hosts.push(host(p).await?);
    }
    for i in 0..n {
        mkguest(&hosts[0], &format!("g{i}")).await?;
    }

    // Durable sends across the nodes: each node's senders mail its own
    // guest (owned there after the first send); the host's inbox has one
    // owner, so (n-1)/n of the sends reserve its numbers over QUIC.
    let per_node = (sizes.senders / n).max(1);
    step(
        false,
        &format!("cluster: sends, {} senders on {n} nodes", per_node * n),
    );
    let mut conns = Vec::new();
    for i in 0..per_node * n {
        conns.push((i % n, host(&paths[i % n]).await?));
    }
    let conns = Rc::new(conns);
    let total = sizes.sends * 2;
    let before = store_counters(&hosts).await?;
    let node_pids: Vec<u32> = daemons.iter().flatten().map(|d| d.child.id()).collect();
    let cpu = CpuMeter::start(node_pids.clone(), etcd_pids(&spec));
    let t = Instant::now();
    let c2 = conns.clone();
    let lat = concurrently(
        total,
        conns.len(),
        move |i| {
            let (node, a) = c2[i % c2.len()].clone();
            async move {
                send(&a, &format!("g{node}"), &format!("burst {i}"))
                    .await
                    .map(drop)
            }
        },
        "cluster send",
    )
    .await?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let (cost, cost_json) = store_cost(&before, &store_counters(&hosts).await?, total);
    let s = stats(lat);
    rows.push(Row {
        what: format!(
            "cluster: durable sends/s, {n} nodes, {} senders",
            conns.len()
        ),
        value: format!("{rate:.0} /s (p50 {}, p99 {})", ms(s.p50), ms(s.p99)),
        target: "≥ 5,000 /s",
        endo: "9–92 /s (1 node, quoted: ANCHORS.md)",
        json: json!({"per_s": rate, "p50_us": s.p50, "p99_us": s.p99, "nodes": n, "senders": conns.len(), "store_per_send": cost_json}),
    });
    rows.push(Row {
        what: "cluster: store work per send".into(),
        value: cost,
        target: "",
        endo: "",
        json: json!(null),
    });
    let (text, cpu_json) = cpu.per_op(total);
    rows.push(Row {
        what: "cluster: CPU per send".into(),
        value: text,
        target: "",
        endo: "",
        json: cpu_json,
    });

    // Request round trip: g0 asks the host through node 2, the host answers
    // through node 3 (with fewer nodes, through what there is); each step
    // timed on its own.
    step(false, "cluster: request/resolve round trips");
    store_text(&hosts[0], "answer", "42").await?;
    let (asker_node, resolver_node) = (1 % n, 2 % n);
    let g = as_agent(&hosts[asker_node], "g0");
    let mut lat = Vec::new();
    let mut legs: [Vec<Duration>; 4] = Default::default();
    let rounds = sizes.round_trips.min(200);
    // The host follows its inbox on the resolver's node, as a person's
    // console would: each round adds one message there, the request.
    let mut expect = last_inbox_number(&hosts[resolver_node])
        .await?
        .map(|n| n + 1)
        .unwrap_or(0);
    let seen = follow_inbox(&hosts[resolver_node], expect);
    let before = store_counters(&hosts).await?;
    for i in 0..rounds {
        let t = Instant::now();
        let mut r = g.request_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_to("HOST");
        r.get().set_description("need the answer");
        r.get().set_result_name(format!("doc-{i}").as_str());
        let number = r.send().promise.await?.get()?.get_number();
        let t1 = Instant::now();
        // The resolver's node pushes the request to the host's follower.
        let host_number = expect;
        wait_inbox(&seen, &hosts[resolver_node], host_number).await?;
        expect += 1;
        let t2 = Instant::now();
        let mut r = hosts[resolver_node].resolve_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_number(host_number);
        r.get().set_path("answer");
        r.send().promise.await?;
        let t3 = Instant::now();
        let mut w = g.wait_request_request();
        w.get().set_number(number);
        let state = w.send().promise.await?;
        if state.get()?.get_state()?.to_string()? != "resolved" {
            bail!("request {number} did not resolve");
        }
        let t4 = Instant::now();
        legs[0].push(t1 - t);
        legs[1].push(t2 - t1);
        legs[2].push(t3 - t2);
        legs[3].push(t4 - t3);
        lat.push(t.elapsed());
    }
    let (cost, cost_json) = store_cost(&before, &store_counters(&hosts).await?, rounds);
    let s = stats(lat);
    rows.push(Row {
        what: "cluster: request → resolve → seen, across nodes (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "≤ 10 / 30 ms",
        endo: "86–100 ms (1 node, quoted: ANCHORS.md)",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "store_per_round_trip": cost_json}),
    });
    let leg = |i: usize| stats(legs[i].clone());
    let (l0, l1, l2, l3) = (leg(0), leg(1), leg(2), leg(3));
    rows.push(Row {
        what: "cluster: … its steps (p50): request / pushed to the host's follower / resolve / seen by the asker".into(),
        value: format!(
            "{} / {} / {} / {}",
            ms(l0.p50),
            ms(l1.p50),
            ms(l2.p50),
            ms(l3.p50)
        ),
        target: "",
        endo: "",
        json: json!({"request_us": l0.p50, "inbox_us": l1.p50, "resolve_us": l2.p50, "seen_us": l3.p50}),
    });
    rows.push(Row {
        what: "cluster: … store work per round trip".into(),
        value: cost,
        target: "",
        endo: "",
        json: json!(null),
    });

    // Guest components across the cluster: counters spread over the nodes
    // (each owned where its first message went), increments sent through
    // every node at once; done when the nodes' guest stats have handled them
    // all.
    let counter = wasm.join("counter.wasm");
    if counter.exists() {
        step(false, "cluster: guest component messages");
        install(&hosts[0], &counter, "counter", &[]).await?;
        let guests = 8 * n;
        for i in 0..guests {
            mkguest_component(&hosts[0], &format!("k{i}"), "counter").await?;
            // owned by node i % n from its first message on
            send(&hosts[i % n], &format!("k{i}"), "get").await?;
        }
        // One `guests` call per node (each lists every guest with what that
        // node handled), not one per guest: the poll itself loads the nodes.
        let names: std::collections::HashSet<String> =
            (0..guests).map(|i| format!("k{i}")).collect();
        let handled = |hosts: Vec<agent::Client>| {
            let names = names.clone();
            async move {
                let mut sum = 0;
                for h in &hosts {
                    let answer = h.guests_request().send().promise.await?;
                    for g in answer.get()?.get_guests()?.iter() {
                        if names.contains(g.get_name()?.to_str()?) {
                            sum += g.get_handled();
                        }
                    }
                }
                Ok::<u64, CapError>(sum)
            }
        };
        let start = handled(hosts.clone()).await?;
        let total = sizes.sends / 2;
        let before = store_counters(&hosts).await?;
        let cpu = CpuMeter::start(node_pids.clone(), etcd_pids(&spec));
        let t = Instant::now();
        let c2 = conns.clone();
        concurrently(
            total,
            conns.len(),
            move |i| {
                let (node, a) = c2[i % c2.len()].clone();
                // a node's senders mail the counters that node owns
                let k = (i / c2.len() * n + node) % guests;
                async move { send(&a, &format!("k{k}"), "increment").await.map(drop) }
            },
            "cluster increment",
        )
        .await?;
        loop {
            let done = handled(hosts.clone()).await?.saturating_sub(start);
            if done >= total as u64 {
                break;
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the counters handled {done} of {total} increments within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rate = total as f64 / t.elapsed().as_secs_f64();
        let (cost, cost_json) = store_cost(&before, &store_counters(&hosts).await?, total);
        rows.push(Row {
            what: format!("cluster: guest component messages handled /s ({guests} counters on {n} nodes)"),
            value: format!("{rate:.0} /s"),
            target: "≥ 1,000 /s",
            endo: "n/a",
            json: json!({"per_s": rate, "guests": guests, "messages": total, "store_per_message": cost_json}),
        });
        rows.push(Row {
            what: "cluster: … store work per message (send, handler, reply)".into(),
            value: cost,
            target: "",
            endo: "",
            json: json!(null),
        });
        let (text, cpu_json) = cpu.per_op(total);
        rows.push(Row {
            what: "cluster: … CPU per message".into(),
            value: text,
            target: "",
            endo: "",
            json: cpu_json,
        });
    } else {
        eprintln!(
            "bench: cluster guest row skipped: no {} (scripts/build-guests, or --guests DIR)",
            counter.display()
        );
    }

    if n < 2 {
        for d in daemons.into_iter().flatten() {
            d.stop().await?;
        }
        return Ok(());
    }

    // Failover: kill -9 the owner of an agent; time until a survivor's send
    // to it succeeds (the owner's lease lapses, the survivor claims it).
    let trials = if sizes.sends >= 1000 { 3 } else { 1 };
    let mut times = Vec::new();
    let mut resumes = Vec::new();
    for trial in 0..trials {
        step(false, &format!("cluster: failover {}/{trials}", trial + 1));
        let owner = trial % n;
        let survivor = (owner + 1) % n;
        let name = format!("fo{trial}");
        mkguest(&hosts[survivor], &name).await?;
        send(&hosts[owner], &name, "owned").await?;
        // A second guest, owned by the same node, with a request pending
        // at its host (the approval the anchor speaks of).
        let asker = format!("pa{trial}");
        mkguest(&hosts[survivor], &asker).await?;
        send(&hosts[owner], &asker, "owned").await?;
        let mut r = as_agent(&hosts[owner], &asker).request_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_to("HOST");
        r.get().set_description("approve?");
        let pending = r.send().promise.await?.get()?.get_number();
        let host_number = last_inbox_number(&hosts[survivor])
            .await?
            .context("the request is not in the host's inbox")?;
        if let Some(d) = daemons[owner].take() {
            d.kill9()?;
        }
        let t = Instant::now();
        let fresh = host(&paths[survivor]).await?;
        loop {
            match send(&fresh, &name, "after the failure").await {
                Ok(_) => break,
                Err(e) if t.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!("failover send: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => bail!("no send succeeded within 30 s of the failure: {e}"),
            }
        }
        times.push(t.elapsed());
        // The host approves through the survivor; the asker sees the answer
        // there and takes new mail there (its inbox moved).
        let mut resolved = false;
        loop {
            let step = async {
                if !resolved {
                    let mut r = fresh.resolve_request();
                    r.get().set_req_id(&RequestId::random().0);
                    r.get().set_number(host_number);
                    r.get().set_path(asker.as_str());
                    r.send().promise.await?;
                    resolved = true;
                }
                let mut w = as_agent(&fresh, &asker).wait_request_request();
                w.get().set_number(pending);
                let state = w.send().promise.await?;
                let state = state.get()?.get_state()?.to_string()?;
                send(&fresh, &asker, "after the approval").await?;
                Ok::<_, CapError>(state)
            };
            match step.await {
                Ok(state) if state == "resolved" => break,
                Ok(state) => bail!("the pending request ended {state}, not resolved"),
                Err(e) if t.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!("failover resume: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => bail!("the pending request did not resume within 30 s: {e}"),
            }
        }
        resumes.push(t.elapsed());
        let (d, _) = Daemon::spawn_with(exe, &paths[owner], &[]).await?;
        daemons[owner] = Some(d);
        hosts[owner] = host(&paths[owner]).await?;
    }
    let lease_ms = std::env::var("CAPSTAN_LEASE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(capstan_actors::cluster::DEFAULT_LEASE.as_millis() as u64);
    let s = stats(times);
    rows.push(Row {
        what: format!("cluster: kill -9 of an owner → first call served by a survivor ({trials} trials, p50 / max)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "≤ 1.5 s / 2.5 s",
        endo: "n/a (Orleans ~15 s, wasmCloud ~2 min)",
        json: json!({"p50_us": s.p50, "max_us": s.p99, "lease_ms": lease_ms}),
    });
    let s = stats(resumes);
    rows.push(Row {
        what: format!("cluster: kill -9 → a pending request answered through a survivor, seen by its guest ({trials} trials, p50 / max)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "< 3 s",
        endo: "n/a",
        json: json!({"p50_us": s.p50, "max_us": s.p99, "lease_ms": lease_ms}),
    });
    for d in daemons.into_iter().flatten() {
        d.stop().await?;
    }
    Ok(())
}

/// Calls across QUIC, side by side with the same calls over the local socket.
///
/// Node A is a daemon process listening on loopback; the bench process is
/// node B: its own identity (a separate cluster) and endpoint, dialling A
/// exactly as a daemon does, so the figures are the network path alone.
/// `inviter` invites `invitee` (names it `as_invitee`); `invitee` accepts
/// (names the inviter `as_inviter`).
async fn pair(
    inviter: &agent::Client,
    as_invitee: &str,
    invitee: &agent::Client,
    as_inviter: &str,
) -> anyhow::Result<()> {
    let mut r = inviter.invite_request();
    r.get().set_name(as_invitee);
    r.get().set_req_id(&RequestId::random().0);
    let answer = r.send().promise.await?;
    let invitation = answer.get()?.get_invitation()?.to_string()?;
    let mut r = invitee.accept_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_invitation(invitation.as_str());
    r.get().set_name(as_inviter);
    r.send().promise.await?;
    Ok(())
}

/// Federated mail to a live peer while another peer is dead with a backlog:
/// node A mails C once with an empty outbox, then again after 300 messages
/// to a stopped B queued ahead of it; each time, how long until C has it.
async fn federation_rows(exe: &Path, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    step(false, "federation: a dead peer's backlog and a live peer");
    let mut nodes = Vec::new();
    for n in ["fed-a", "fed-b", "fed-c"] {
        let p = Paths::resolve(Some(base.join(n)))?;
        std::fs::create_dir_all(&p.home)?;
        std::fs::write(p.home.join("listen"), "127.0.0.1:0\n")?;
        let (d, _) = Daemon::spawn(exe, &p).await?;
        let h = host(&p).await?;
        nodes.push((d, p, h));
    }
    let (a, b, c) = (nodes[0].2.clone(), nodes[1].2.clone(), nodes[2].2.clone());
    let (a, c) = (&a, &c);
    pair(a, "bob", &b, "alice").await?;
    pair(a, "carol", c, "alice").await?;
    // Time from A's send to C's inbox having it.
    let to_c = |text: String| async move {
        let before = inbox_len(c).await?;
        let t = Instant::now();
        send(a, "carol", &text).await?;
        while inbox_len(c).await? <= before {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("carol's message did not arrive within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, anyhow::Error>(t.elapsed())
    };
    let quiet = to_c("no backlog".into()).await?;
    let backlog = 300;
    let b_daemon = nodes.remove(1).0;
    b_daemon.kill9()?;
    for i in 0..backlog {
        send(a, "bob", &format!("queued {i}")).await?;
    }
    let behind = to_c("behind a dead peer's backlog".into()).await?;
    rows.push(Row {
        what: format!(
            "federation: A → live peer C, empty outbox / behind {backlog} messages for a dead peer B"
        ),
        value: format!(
            "{} / {}",
            ms(quiet.as_secs_f64() * 1e6),
            ms(behind.as_secs_f64() * 1e6)
        ),
        target: "unaffected",
        endo: "",
        json: json!({
            "empty_outbox_us": quiet.as_secs_f64() * 1e6,
            "behind_backlog_us": behind.as_secs_f64() * 1e6,
            "backlog": backlog,
        }),
    });
    for (d, _, _) in nodes {
        d.stop().await?;
    }
    Ok(())
}

async fn net_rows(
    exe: &Path,
    base: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use crate::net::Net;
    use crate::net::identity::Identity;
    step(false, "network: two nodes on loopback");
    let pa = Paths::resolve(Some(base.join("net-a")))?;
    std::fs::create_dir_all(&pa.home)?;
    std::fs::write(pa.home.join("listen"), "127.0.0.1:0\n")?;
    let (a, _) = Daemon::spawn(exe, &pa).await?;
    let h = host(&pa).await?;
    store_text(&h, "small", "0123456789abcdef").await?;
    let big = "x".repeat(1 << 20);
    store_text(&h, "big", &big).await?;
    let locate = |name: &'static str| {
        let h = h.clone();
        async move {
            let mut r = h.locate_request();
            r.get().set_path(name);
            let answer = r.send().promise.await?;
            let l: capstan_proto::Locator = answer.get()?.get_locator()?.to_str()?.parse()?;
            Ok::<_, anyhow::Error>(capstan_actors::RemoteRec {
                cluster: l.cluster,
                swiss: l.swiss,
                addrs: l.addrs,
            })
        }
    };
    step(false, "network: locating");
    let small = locate("small").await?;
    let bigref = locate("big").await?;

    // Node B: a runtime on its own store, and its own endpoint.
    let home_b = base.join("net-b");
    std::fs::create_dir_all(&home_b)?;
    let db = capstan_cluster::open(&home_b.join("store.redb").to_string_lossy()).await?;
    let rt = capstan_actors::Runtime::open(db, capstan_actors::RuntimeOptions::default()).await?;
    let id_b = || Identity::load_or_create(&home_b);
    let net = Net::bind(rt.clone(), id_b()?, None, None)?;

    step(false, "network: round trips");
    // Round trips, 16-byte payload.
    let n = sizes.round_trips * 10;
    let payload = [7u8; 16];
    net.ping(&small, &payload)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        net.ping(&small, &payload)
            .await
            .map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: Gateway.ping round trip, 16 B (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "< 120 µs",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        net.cat(&small).await.map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: cat of a 16 B remote value, live capability (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut r = h.cat_request();
        r.get().set_path("small");
        r.send().promise.await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "local socket: cat of the same value on A (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    // Throughput: 64 calls in flight on one connection.
    let g = net.gateway(&small).await.map_err(anyhow::Error::msg)?;
    let total = n * 10;
    let t = Instant::now();
    let g2 = g.clone();
    concurrently(
        total,
        64,
        move |_| {
            let g = g2.clone();
            async move {
                let mut r = g.ping_request();
                r.get().set_payload(&[7u8; 16]);
                r.send().promise.await.map(drop)
            }
        },
        "ping",
    )
    .await?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: "QUIC: calls per second, 64 in flight, one connection".into(),
        value: format!("{rate:.0} /s"),
        target: "> 50,000 /s",
        endo: "",
        json: json!({"per_s": rate}),
    });

    // Pipelining: restore(swiss).cat() in one round trip, versus two.
    let mut piped = Vec::new();
    let mut seq = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let mut r = g.restore_request();
        r.get().set_swiss(&small.swiss);
        let o = r.send().pipeline.get_object();
        o.cat_request().send().promise.await?;
        piped.push(t.elapsed());
        let t = Instant::now();
        let mut r = g.restore_request();
        r.get().set_swiss(&small.swiss);
        let o = r.send().promise.await?.get()?.get_object()?;
        o.cat_request().send().promise.await?;
        seq.push(t.elapsed());
    }
    let (p, q) = (stats(piped), stats(seq));
    rows.push(Row {
        what: "QUIC: restore(swiss).cat() pipelined vs two round trips (p50)".into(),
        value: format!("{} vs {}", ms(p.p50), ms(q.p50)),
        target: "one round trip",
        endo: "",
        json: json!({"pipelined_p50_us": p.p50, "sequential_p50_us": q.p50}),
    });

    // 1 MiB value.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (_, data) = net.cat(&bigref).await.map_err(anyhow::Error::msg)?;
        if data.len() != big.len() {
            bail!("1 MiB cat returned {} bytes", data.len());
        }
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: cat of a 1 MiB remote value (p50)".into(),
        value: format!("{} ({:.0} MiB/s)", ms(s.p50), 1e6 / s.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50}),
    });
    net.close().await;

    // Connect + TLS 1.3 + first call, with a fresh endpoint each time.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let fresh = Net::bind(rt.clone(), id_b()?, None, None)?;
        let t = Instant::now();
        fresh
            .ping(&small, &payload)
            .await
            .map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
        fresh.close().await;
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: connect + TLS 1.3 (mutual, cluster check) + first call (p50)".into(),
        value: ms(s.p50),
        target: "~1.7 ms floor",
        endo: "",
        json: json!({"p50_us": s.p50}),
    });
    drop(h);
    rt.shutdown().await;
    a.stop().await?;
    Ok(())
}

/// Installs the component `file` under `name` (grants none).
async fn install(
    a: &agent::Client,
    file: &Path,
    name: &str,
    grants: &[(&str, &str)],
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut r = a.install_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_name(name);
    r.get().set_component(&bytes);
    let mut gl = r.get().init_grants(grants.len() as u32);
    for (i, (slot, path)) in grants.iter().enumerate() {
        let mut g = gl.reborrow().get(i as u32);
        g.set_slot(*slot);
        g.set_path(*path);
    }
    r.send()
        .promise
        .await
        .with_context(|| format!("installing {}", file.display()))?;
    Ok(())
}

async fn mkguest_component(a: &agent::Client, path: &str, component: &str) -> anyhow::Result<()> {
    let mut r = a.mkguest_component_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path(path);
    r.get().set_component(component);
    r.send().promise.await?;
    Ok(())
}

async fn run_tool(a: &agent::Client, name: &str, input: &str) -> Result<String, CapError> {
    let mut r = a.run_tool_request();
    r.get().set_name(name);
    r.get().set_input(input);
    Ok(r.send().promise.await?.get()?.get_output()?.to_string()?)
}

/// What the node's guest stats say of the guest `name`.
struct GuestStat {
    handled: u64,
    failures: u64,
    /// Nanoseconds to make the instance for its last message.
    instantiate_ns: u64,
    /// Nanoseconds its last call ran.
    call_ns: u64,
}

async fn guest_stat(a: &agent::Client, name: &str) -> Result<GuestStat, CapError> {
    let answer = a.guests_request().send().promise.await?;
    for g in answer.get()?.get_guests()?.iter() {
        if g.get_name()?.to_str()? == name {
            return Ok(GuestStat {
                handled: g.get_handled(),
                failures: g.get_failures(),
                instantiate_ns: g.get_instantiate_ns_last(),
                call_ns: g.get_call_ns_last(),
            });
        }
    }
    Err(CapError::failed(format!("guest {name} is not listed")))
}

/// Sends `text` to the guest `name` and waits until it handled it; the
/// nanoseconds its handler ran (the node's guest stats).
async fn probe_call(a: &agent::Client, name: &str, text: &str) -> anyhow::Result<u64> {
    let before = guest_stat(a, name).await?;
    send(a, name, text).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = guest_stat(a, name).await?;
        if now.failures > before.failures {
            bail!("the probe guest failed on {text:?}; see `capstan guests`");
        }
        if now.handled > before.handled {
            return Ok(now.call_ns);
        }
        if Instant::now() > deadline {
            bail!("the probe guest did not handle {text:?} within 60 s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The highest message number the node pushed to a follower (`follow`).
struct Seen(Rc<std::cell::Cell<Option<u64>>>);

impl capstan_proto::api_capnp::message_sink::Server for Seen {
    async fn push(
        self: Rc<Self>,
        params: capstan_proto::api_capnp::message_sink::PushParams,
        _: capstan_proto::api_capnp::message_sink::PushResults,
    ) -> Result<(), CapError> {
        let n = params.get()?.get_message()?.get_number();
        if self.0.get().is_none_or(|m| n > m) {
            self.0.set(Some(n));
        }
        Ok(())
    }
}

/// Follows `a`'s inbox for as long as the connection lives: the waits
/// below then cost no call (polling `inbox` would read the whole inbox,
/// and that grows with every round trip measured).
fn follow_inbox(a: &agent::Client, after: u64) -> Rc<std::cell::Cell<Option<u64>>> {
    let cell = Rc::new(std::cell::Cell::new(None));
    let sink: capstan_proto::api_capnp::message_sink::Client =
        capnp_rpc::new_client(Seen(cell.clone()));
    let mut r = a.follow_request();
    r.get().set_after(after);
    r.get().set_sink(sink);
    tokio::task::spawn_local(async move {
        let _ = r.send().promise.await;
    });
    cell
}

/// Waits until the followed inbox has a message numbered `number` or later
/// (asking the node itself every 100 ms, should the follower have been
/// dropped for falling behind).
async fn wait_inbox(
    seen: &Rc<std::cell::Cell<Option<u64>>>,
    a: &agent::Client,
    number: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut asked = Instant::now();
    loop {
        if seen.get().is_some_and(|n| n >= number) {
            return Ok(());
        }
        if asked.elapsed() > Duration::from_millis(5000) {
            asked = Instant::now();
            if last_inbox_number(a).await?.is_some_and(|n| n >= number) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("no guest answer within 60 s (message {number} of the host's inbox)");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Guests as WebAssembly components, through the daemon: install (validate
/// and compile), a tool call over the socket, a message to a guest agent
/// and its answer by mail, what the node measured inside (instantiate and
/// handler), messages per second, the first message after a restart
/// (compiled code from the disk cache), and memory per guest agent.
async fn guest_rows(
    exe: &Path,
    base: &Path,
    wasm: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (echo, counter) = (wasm.join("echo-tool.wasm"), wasm.join("counter.wasm"));
    if !echo.exists() || !counter.exists() {
        eprintln!(
            "bench: guest section skipped: no {} (build the guests with scripts/build-guests, or pass --guests DIR)",
            counter.display()
        );
        return Ok(());
    }
    let quiet = false;
    step(quiet, "guests: install");
    let paths = Paths::resolve(Some(base.join("guests")))?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let seen = follow_inbox(&h, 0);
    let t = Instant::now();
    install(&h, &echo, "echo-tool", &[]).await?;
    let cold = t.elapsed();
    install(&h, &counter, "counter", &[]).await?;
    rows.push(Row {
        what: "guest: install a component (validate, cold compile, store)".into(),
        value: ms(cold.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": cold.as_secs_f64() * 1e6}),
    });

    step(quiet, "guests: tool calls");
    let mut lat = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let out = run_tool(&h, "echo-tool", r#"{"text":"bench"}"#).await?;
        lat.push(t.elapsed());
        if !out.contains("\"bench\"") {
            bail!("echo-tool answered {out:?}");
        }
    }
    let s = stats(lat);
    rows.push(Row {
        what: "guest: `run` a tool over the socket (fresh instance + execute)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    step(quiet, "guests: messages to a guest agent");
    mkguest_component(&h, "bot", "counter").await?;
    let mut next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let (mut rtt, mut inst, mut call) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        send(&h, "bot", "get").await?;
        // our copy of what we sent, then the guest's answer
        next += 2;
        wait_inbox(&seen, &h, next - 1).await?;
        rtt.push(t.elapsed());
        let g = guest_stat(&h, "bot").await?;
        inst.push(Duration::from_nanos(g.instantiate_ns));
        call.push(Duration::from_nanos(g.call_ns));
    }
    let (s, si, sc) = (stats(rtt), stats(inst), stats(call));
    rows.push(Row {
        what: "guest: message → guest handler → answer in the host's inbox (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    rows.push(Row {
        what: "guest: instantiate for a message (pooled, pre-instantiated; p50)".into(),
        value: ms(si.p50),
        target: "< 20 µs",
        endo: "",
        json: json!({"p50_us": si.p50, "p99_us": si.p99}),
    });
    rows.push(Row {
        what: "guest: handler run incl. its host calls (read, reply: durable; p50)".into(),
        value: ms(sc.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": sc.p50, "p99_us": sc.p99}),
    });

    let probe = wasm.join("probe.wasm");
    if probe.exists() {
        step(quiet, "guests: call paths (probe guest)");
        store_text(&h, "probe-doc", "a small stored value").await?;
        install(&h, &probe, "probe", &[("doc", "probe-doc")]).await?;
        mkguest_component(&h, "prober", "probe").await?;
        probe_call(&h, "prober", "noop").await?; // warm
        let (kind_n, read_n) = (10_000u32, 1_000u32);
        let (mut noop, mut kind, mut read) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..sizes.round_trips.min(100) {
            noop.push(probe_call(&h, "prober", "noop").await?);
            kind.push(probe_call(&h, "prober", &format!("kind {kind_n}")).await?);
            read.push(probe_call(&h, "prober", &format!("read {read_n}")).await?);
        }
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2] as f64 / 1000.0
        };
        let (noop, kind, read) = (median(noop), median(kind), median(read));
        rows.push(Row {
            what: "guest: host → guest call on the message's fresh instance (first call: lazy init, first page touches; p50)".into(),
            value: ms(noop),
            target: "< 2 µs",
            endo: "",
            json: json!({"p50_us": noop}),
        });
        let per_kind = (kind - noop).max(0.0) / kind_n as f64;
        rows.push(Row {
            what: format!("guest: guest → capability call, handle table (capability.kind(), {kind_n} in a handler)"),
            value: ms(per_kind),
            target: "< 10 µs",
            endo: "",
            json: json!({"us": per_kind}),
        });
        let per_read = (read - noop).max(0.0) / read_n as f64;
        rows.push(Row {
            what: format!("guest: guest → capability call reading a stored value (capability.read(), {read_n} in a handler)"),
            value: ms(per_read),
            target: "< 10 µs",
            endo: "",
            json: json!({"us": per_read}),
        });
        // the probe's mail added our copies to the inbox
        next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    }
    let poller = wasm.join("probe-channel.wasm");
    if poller.exists() {
        step(quiet, "guests: a warm instance (probe channel)");
        install(&h, &poller, "probe-channel", &[]).await?;
        mkguest_component(&h, "poller", "probe-channel").await?;
        // each poll (every 100 ms) is timed by the node; the first one
        // (right after on-start) is left out
        let (mut samples, mut seen) = (Vec::new(), 1u64);
        let deadline = Instant::now() + Duration::from_secs(20);
        while samples.len() < 30 && Instant::now() < deadline {
            let g = guest_stat(&h, "poller").await?;
            if g.handled > seen {
                seen = g.handled;
                samples.push(g.call_ns);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if samples.is_empty() {
            bail!("the probe channel was never polled");
        }
        samples.sort_unstable();
        let warm = samples[samples.len() / 2] as f64 / 1000.0;
        rows.push(Row {
            what: "guest: host → guest call on a live instance, one every 100 ms in the node (cold caches; `cargo bench --bench callpath`: back to back; p50)"
                .into(),
            value: ms(warm),
            target: "< 2 µs",
            endo: "",
            json: json!({"p50_us": warm, "samples": samples.len()}),
        });
    }

    step(quiet, "guests: messages per second");
    let n = sizes.round_trips * 4;
    let t = Instant::now();
    for _ in 0..n {
        send(&h, "bot", "get").await?;
    }
    next += 2 * n as u64;
    wait_inbox(&seen, &h, next - 1).await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: format!("guest: messages handled per second, one guest agent ({n})"),
        value: format!("{rate:.0} /s"),
        target: "",
        endo: "",
        json: json!({"per_s": rate, "messages": n}),
    });

    step(quiet, "guests: first message after a restart");
    drop(h);
    d.stop().await?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let seen = follow_inbox(&h, next);
    // the follower is registered before the clock starts
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    send(&h, "bot", "get").await?;
    wait_inbox(&seen, &h, next + 1).await?;
    let warm = t.elapsed();
    rows.push(Row {
        what: "guest: first message after a restart (compiled code from the disk cache)".into(),
        value: ms(warm.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": warm.as_secs_f64() * 1e6}),
    });

    let n = sizes.guests;
    step(quiet, &format!("guests: {n} guest agents"));
    let conns = Rc::new({
        let mut v = Vec::new();
        for _ in 0..sizes.senders.min(16) {
            v.push(host(&paths).await?);
        }
        v
    });
    let c2 = conns.clone();
    concurrently(
        n,
        conns.len(),
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move {
                let mut r = a.mkguest_component_request();
                r.get().set_req_id(&RequestId::random().0);
                r.get().set_path(format!("bot-{i}").as_str());
                r.get().set_component("counter");
                r.send().promise.await?;
                Ok(())
            }
        },
        "mkguest --component",
    )
    .await?;
    let before = d.rss_kib()?;
    let next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let c2 = conns.clone();
    concurrently(
        n,
        conns.len(),
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { send(&a, &format!("bot-{i}"), "get").await.map(drop) }
        },
        "wake guest agents",
    )
    .await?;
    wait_inbox(&seen, &h, next + 2 * n as u64 - 1).await?;
    let after = d.rss_kib()?;
    let per = after.saturating_sub(before) as f64 * 1024.0 / n as f64;
    rows.push(Row {
        what: format!("guest: memory per guest agent that handled a message ({n}, RSS delta)"),
        value: format!(
            "{:.1} KiB ({:.0} MB for {n})",
            per / 1024.0,
            per * n as f64 / 1e6
        ),
        target: "< 20 KB (10k in 200 MB)",
        endo: "",
        json: json!({"bytes": per, "guests": n}),
    });
    drop(conns);
    drop(h);
    d.stop().await?;
    Ok(())
}

/// `eval` over the socket: the node's JSON answer.
async fn eval(
    a: &agent::Client,
    source: &str,
    bindings: &[(&str, &str)],
) -> anyhow::Result<serde_json::Value> {
    let mut r = a.evaluate_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_evaluator("evaluator");
    r.get().set_source(source);
    let mut gl = r.get().init_bindings(bindings.len() as u32);
    for (i, (slot, path)) in bindings.iter().enumerate() {
        let mut g = gl.reborrow().get(i as u32);
        g.set_slot(*slot);
        g.set_path(*path);
    }
    let answer = r.send().promise.await?;
    let text = answer.get()?.get_json()?.to_string()?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(e) = v.get("error") {
        bail!("eval failed: {e}");
    }
    Ok(v)
}

/// A model on loopback that answers every Ollama chat request at once
/// with "ok": the LLM agent's turn is then all Capstan. Ends with the task.
async fn instant_model() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // the head, then as many body bytes as content-length says
                let body_start = loop {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    if buf.len() > 1 << 20 {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while buf.len() < body_start + len {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = json!({"model": "instant", "message": {"role": "assistant", "content": "ok"},
                                  "done": true, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 1})
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((addr, task))
}

/// The evaluator (a JavaScript engine as a guest) and the LLM agent:
/// evaluator start and a small script, a script using a bound capability,
/// and one agent turn against a model that answers at once (the agent's
/// own overhead per turn: mail in, checkpointed conversation, the model
/// call through the node, the reply).
async fn agent_rows(
    exe: &Path,
    base: &Path,
    wasm: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (evaluator, llm_agent) = (wasm.join("evaluator.wasm"), wasm.join("llm-agent.wasm"));
    if !evaluator.exists() || !llm_agent.exists() {
        eprintln!(
            "bench: evaluator and LLM agent section skipped: no {} (scripts/build-guests)",
            evaluator.display()
        );
        return Ok(());
    }
    let quiet = false;
    step(quiet, "evaluator: install");
    let paths = Paths::resolve(Some(base.join("agents")))?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let seen = follow_inbox(&h, 0);
    let t = Instant::now();
    install(&h, &evaluator, "evaluator", &[]).await?;
    let cold = t.elapsed();
    rows.push(Row {
        what: format!(
            "evaluator: install (Boa, {} KB component; cold compile)",
            std::fs::metadata(&evaluator)?.len() / 1000
        ),
        value: ms(cold.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": cold.as_secs_f64() * 1e6}),
    });

    step(quiet, "evaluator: small scripts");
    store_text(&h, "doc", "the quick brown fox jumps over the lazy dog").await?;
    let script = "[1, 2, 3, 4].map(x => x * x).reduce((a, b) => a + b, 0)";
    let (mut e2e, mut inst, mut run) = (Vec::new(), Vec::new(), Vec::new());
    let mut fuel = 0;
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let v = eval(&h, script, &[]).await?;
        e2e.push(t.elapsed());
        inst.push(Duration::from_nanos(
            v["instantiate_ns"].as_u64().unwrap_or(0),
        ));
        run.push(Duration::from_nanos(v["run_ns"].as_u64().unwrap_or(0)));
        fuel = v["fuel"].as_u64().unwrap_or(0);
    }
    let (s, si, sr) = (stats(e2e), stats(inst), stats(run));
    rows.push(Row {
        what: "evaluator: `eval` of a small script over the socket (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    rows.push(Row {
        what: "evaluator: start (fresh instance of the engine; p50)".into(),
        value: ms(si.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": si.p50, "p99_us": si.p99}),
    });
    rows.push(Row {
        what: format!("evaluator: engine setup + the script's run (p50; {fuel} fuel)"),
        value: ms(sr.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": sr.p50, "p99_us": sr.p99, "fuel": fuel}),
    });
    let mut lat = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        eval(&h, "doc.text().split(' ').length", &[("doc", "doc")]).await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "evaluator: script calling a bound capability (value.text()) (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    step(quiet, "llm agent: turns against an instant model");
    let (addr, model) = instant_model().await?;
    {
        let mut r = h.llm_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_command("add");
        r.get().set_args(
            json!({"name": "local", "provider": "ollama", "url": format!("http://{addr}")})
                .to_string()
                .as_str(),
        );
        r.send().promise.await?;
    }
    install(&h, &llm_agent, "llm-agent", &[("llm", "local")]).await?;
    mkguest_component(&h, "helper", "llm-agent").await?;
    let mut next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let mut lat = Vec::new();
    for i in 0..sizes.round_trips {
        let t = Instant::now();
        send(&h, "helper", &format!("question {i}")).await?;
        next += 2;
        wait_inbox(&seen, &h, next - 1).await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "llm agent: one turn, model excluded (mail → checkpointed conversation → model call → reply; p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    model.abort();
    drop(h);
    d.stop().await?;
    Ok(())
}

async fn dismiss(a: &agent::Client, number: u64) -> Result<(), CapError> {
    let mut r = a.dismiss_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_number(number);
    r.send().promise.await?;
    Ok(())
}

/// The numbers of every message in `a`'s inbox, a page at a time.
async fn inbox_numbers(a: &agent::Client) -> Result<Vec<u64>, CapError> {
    let (mut out, mut from) = (Vec::new(), 0u64);
    loop {
        let mut r = a.inbox_request();
        r.get().set_from(from);
        r.get().set_limit(10_000);
        let answer = r.send().promise.await?;
        let answer = answer.get()?;
        for m in answer.get_messages()?.iter() {
            out.push(m.get_number());
            from = from.max(m.get_number() + 1);
        }
        if !answer.get_more() {
            return Ok(out);
        }
    }
}

/// Keys and bytes the store holds (the `du` scan).
async fn store_size(paths: &Paths) -> anyhow::Result<(u64, u64)> {
    let (mut keys, mut bytes, mut start) = (0, 0, Vec::new());
    loop {
        let (kinds, next) = client::usage_page(paths, &start, 100_000).await?;
        for (_, k, b) in kinds {
            keys += k;
            bytes += b;
        }
        match next {
            Some(n) => start = n,
            None => return Ok((keys, bytes)),
        }
    }
}

/// Dismisses every message of `who`'s inbox, `width` at a time.
async fn dismiss_all(who: &agent::Client, width: usize) -> anyhow::Result<usize> {
    let numbers = Rc::new(inbox_numbers(who).await?);
    let n = numbers.len();
    let who = who.clone();
    concurrently(
        n,
        width,
        move |i| {
            let (who, numbers) = (who.clone(), numbers.clone());
            async move { dismiss(&who, numbers[i]).await }
        },
        "dismiss",
    )
    .await?;
    Ok(n)
}

/// `capstan bench --soak N`: N sends from 16 connections into one guest's
/// inbox, in 20 rounds; after each round (unless `keep`) every message is
/// dismissed (the guest's and the host's copies) and a gc pass runs
/// (dropping exactly-once answers). Prints the store's size and the
/// daemon's resident memory after each round: with dismissals and gc both
/// stay flat; with `keep` (no dismissals, no gc) the memory shows what the
/// daemon holds per stored message.
pub async fn soak(
    dir: Option<PathBuf>,
    total: usize,
    keep: bool,
    store_cache_bytes: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
    let tmp;
    let base = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("capstan-soak").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let paths = Paths::resolve(Some(base.join("soak")))?;
    let cache = store_cache_bytes.map(|n| n.to_string());
    let mut extra = vec![];
    if let Some(c) = &cache {
        extra.extend(["--store-cache-bytes", c.as_str()]);
    }
    let (d, _) = Daemon::spawn_with(&exe, &paths, &extra).await?;
    let h = host(&paths).await?;
    mkguest(&h, "g0").await?;
    let g = as_agent(&h, "g0");
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(host(&paths).await?);
    }
    let rounds = 20usize;
    let per = total.div_ceil(rounds).max(1);
    let rss_start = d.rss_kib()?;
    let (keys0, bytes0) = store_size(&paths).await?;
    let mut lines = Vec::new();
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut max_send = Duration::ZERO;
    while sent < total {
        let n = per.min(total - sent);
        let c = conns.clone();
        let base_i = sent;
        let lat = concurrently(
            n,
            16,
            move |i| {
                let a = c[i % c.len()].clone();
                async move {
                    send(&a, "g0", &format!("soak message {}", base_i + i))
                        .await
                        .map(drop)
                }
            },
            "send",
        )
        .await?;
        max_send = max_send.max(lat.iter().copied().max().unwrap_or_default());
        sent += n;
        if !keep {
            dismiss_all(&g, 16).await?;
            dismiss_all(&h, 16).await?;
            client::gc(&paths, 0).await?;
        }
        let (keys, bytes) = store_size(&paths).await?;
        let rss = d.rss_kib()?;
        let file = std::fs::metadata(paths.home.join("store.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        let line = json!({
            "sent": sent,
            "secs": t0.elapsed().as_secs_f64(),
            "store_keys": keys,
            "store_bytes": bytes,
            "store_file_bytes": file,
            "rss_kib": rss,
        });
        if !json {
            eprintln!(
                "soak: {sent:>9} sent  {:>7.1} s  store {keys:>8} keys {:>9.1} MiB live, file {:>7.1} MiB  rss {:>7.1} MiB",
                t0.elapsed().as_secs_f64(),
                bytes as f64 / 1048576.0,
                file as f64 / 1048576.0,
                rss as f64 / 1024.0
            );
        }
        lines.push(line);
    }
    let last = lines.last().cloned().unwrap_or_default();
    let keys1 = last["store_keys"].as_u64().unwrap_or(0);
    let rss1 = last["rss_kib"].as_u64().unwrap_or(0);
    let summary = json!({
        "sends": total,
        "keep": keep,
        "secs": t0.elapsed().as_secs_f64(),
        "per_s": total as f64 / t0.elapsed().as_secs_f64(),
        "max_send_ms": max_send.as_secs_f64() * 1000.0,
        "store_keys_before": keys0,
        "store_bytes_before": bytes0,
        "store_keys_after": keys1,
        "rss_kib_start": rss_start,
        "rss_kib_end": rss1,
        "rss_bytes_per_send": (rss1 as f64 - rss_start as f64) * 1024.0 / total as f64,
        "rounds": lines,
    });
    d.stop().await?;
    if json {
        print_json(&summary);
    } else {
        println!(
            "soak of {total} sends ({}): store {keys0} → {keys1} keys; rss {:.1} → {:.1} MiB ({:.0} bytes per send); {:.0} sends/s; slowest send {:.1} ms",
            if keep {
                "messages kept"
            } else {
                "dismissed, gc after each round"
            },
            rss_start as f64 / 1024.0,
            rss1 as f64 / 1024.0,
            summary["rss_bytes_per_send"].as_f64().unwrap_or(0.0),
            summary["per_s"].as_f64().unwrap_or(0.0),
            max_send.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// `capstan bench --gc-formulas N`: N values stored in one directory, the
/// directory removed (all N unreachable), then one gc pass timed while one
/// sender sends back to back; the slowest send during the pass is the
/// longest stall gc caused (targets: pass < 2 s for 100,000, stall ≤ 50 ms).
pub async fn gc_row(dir: Option<PathBuf>, formulas: usize, json: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
    let tmp;
    let base = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new()
                .prefix("capstan-gcbench")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let paths = Paths::resolve(Some(base.join("gc")))?;
    let (d, _) = Daemon::spawn(&exe, &paths).await?;
    let h = host(&paths).await?;
    mkguest(&h, "g0").await?;
    let mut r = h.mkdir_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path("d");
    r.send().promise.await?;
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(host(&paths).await?);
    }
    step(false, &format!("storing {formulas} values"));
    let c = conns.clone();
    concurrently(
        formulas,
        16,
        move |i| {
            let a = c[i % c.len()].clone();
            async move { store_text(&a, &format!("d.v-{i}"), "x").await }
        },
        "store",
    )
    .await?;
    remove(&h, "d").await?;
    // Sends before the pass: the baseline latency.
    let mut before = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        send(&h, "g0", &format!("before {i}")).await?;
        before.push(t.elapsed());
    }
    step(false, "gc pass with a concurrent sender");
    let done = Rc::new(std::cell::Cell::new(false));
    let (d2, h2) = (done.clone(), h.clone());
    let sender = tokio::task::spawn_local(async move {
        let mut lat = Vec::new();
        let mut i = 0u64;
        while !d2.get() {
            let t = Instant::now();
            send(&h2, "g0", &format!("during {i}")).await?;
            lat.push(t.elapsed());
            i += 1;
        }
        Ok::<_, CapError>(lat)
    });
    let t = Instant::now();
    let report = client::gc(&paths, 86_400_000).await?;
    let took = t.elapsed();
    done.set(true);
    let during = sender.await??;
    let freed = report
        .iter()
        .find(|(k, _)| *k == "formulas")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(0);
    let max_during = during.iter().copied().max().unwrap_or_default();
    let sb = stats(before);
    let sd = stats(during.clone());
    d.stop().await?;
    let rows = vec![
        Row {
            what: format!("gc pass over {formulas} unreachable formulas (freed {freed})"),
            value: format!("{:.0} ms", took.as_secs_f64() * 1000.0),
            target: "< 2 s",
            endo: "",
            json: json!({"ms": took.as_secs_f64() * 1000.0, "freed": freed, "formulas": formulas}),
        },
        Row {
            what: format!(
                "slowest send during it ({} sends; p50 {} / p99 {}; before: p50 {})",
                during.len(),
                ms(sd.p50),
                ms(sd.p99),
                ms(sb.p50)
            ),
            value: format!("{:.1} ms", max_during.as_secs_f64() * 1000.0),
            target: "≤ 50 ms",
            endo: "",
            json: json!({"max_ms": max_during.as_secs_f64() * 1000.0, "sends": during.len(), "p50_us": sd.p50, "p99_us": sd.p99, "before_p50_us": sb.p50}),
        },
    ];
    print_rows(&rows, json, "redb, one node");
    Ok(())
}
