//! A phase of durable sends through a cluster, and what the cluster's
//! store did for it: the nodes' store counters read before and after, per
//! operation ([`store_cost`]), where the commits waited ([`commit_time`]),
//! and the CPU each part spent ([`Sends`]).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use capstan_proto::api_capnp::agent;
use serde_json::json;

use super::Row;
use super::calls::{Stats, concurrently, ms, send_traced, stats};
use super::process::CpuMeter;

/// The store counters of every node (`cluster status`: `store_stats`), and
/// the wake-ups and calls they sent each other (`wakeups_sent`,
/// `wake_calls`, `reserve_calls`), summed.
pub(super) async fn store_counters(
    hosts: &[agent::Client],
) -> anyhow::Result<BTreeMap<String, u64>> {
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
        for (key, at) in [
            ("wakeups_sent", "/wakeups/delivered_sent"),
            ("reserve_calls", "/link_calls/reserve"),
            ("wake_calls", "/link_calls/wake"),
            ("reserve_us", "/link_calls/reserve_us"),
        ] {
            if let Some(w) = v.pointer(at).and_then(|w| w.as_u64()) {
                *sum.entry(key.into()).or_insert(0) += w;
            }
        }
    }
    Ok(sum)
}

/// Two readings of [`store_counters`]: what a counter grew by between them.
struct Delta<'a> {
    before: &'a BTreeMap<String, u64>,
    after: &'a BTreeMap<String, u64>,
}

impl Delta<'_> {
    fn d(&self, k: &str) -> f64 {
        let get = |m: &BTreeMap<String, u64>| m.get(k).copied().unwrap_or(0) as f64;
        get(self.after) - get(self.before)
    }

    /// The mean of the µs counter `us` over the count `n`, in ms (none
    /// when nothing was counted).
    fn mean_ms(&self, us: &str, n: &str) -> Option<f64> {
        (self.d(n) > 0.0).then(|| self.d(us) / self.d(n) / 1e3)
    }
}

/// What the store did between two readings of [`store_counters`], per
/// operation: "14.0 reads (0.41 ms), 2 snapshots (1.0 revision reads),
/// 3.0 commits in 3.0 Txns (2.9 ms, 0.00 conflicts); 2.0 wake-ups to other
/// nodes".
pub(super) fn store_cost(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    ops: usize,
) -> (String, serde_json::Value) {
    let delta = Delta { before, after };
    let per = |k: &str| delta.d(k) / ops.max(1) as f64;
    let mean_ms = |us: &str, n: &str| delta.mean_ms(us, n).unwrap_or(0.0);
    let text = format!(
        "{:.1} snapshots ({:.1} revision reads), {:.1} reads in {:.1} requests ({:.2} ms), {:.1} commits ({:.1} puts, {:.1} deletions, {:.1} compares, {:.1} sent) in {:.2} Txns ({:.2} ms, {:.2} conflicts); {:.1} wake-ups to other nodes in {:.2} calls, {:.2} remote reservations, {:.2} numbers filled in by the relay; {:.2} groups relayed ({:.2} failed)",
        per("snapshots"),
        per("revision_reads"),
        per("reads"),
        per("read_rpcs"),
        mean_ms("read_us", "reads"),
        per("commits"),
        per("commit_puts"),
        per("commit_deletes"),
        per("commit_compares"),
        per("commit_compares") - per("compares_shared"),
        per("commit_txns"),
        mean_ms("commit_us", "commit_txns"),
        per("conflicts"),
        per("wakeups_sent"),
        per("wake_calls"),
        per("reserve_calls"),
        per("filled_in"),
        per("relayed_out"),
        per("relay_failures"),
    );
    let json = json!({
        "snapshots": per("snapshots"),
        "revision_reads": per("revision_reads"),
        "reads": per("reads"),
        "read_requests": per("read_rpcs"),
        "read_ms": mean_ms("read_us", "reads"),
        "commits": per("commits"),
        "puts": per("commit_puts"),
        "deletions": per("commit_deletes"),
        "compares": per("commit_compares"),
        "compares_sent": per("commit_compares") - per("compares_shared"),
        "conflicts": per("conflicts"),
        "commit_txns": per("commit_txns"),
        "commit_ms": mean_ms("commit_us", "commit_txns"),
        "wakeups_sent": per("wakeups_sent"),
        "wake_calls": per("wake_calls"),
        "reserve_calls": per("reserve_calls"),
        "filled_in": per("filled_in"),
        "relayed_groups": per("relayed_out"),
        "relay_failures": per("relay_failures"),
    });
    (text, json)
}

/// Where the commits between two readings of [`store_counters`] waited, on
/// average: from the committer to the outcome, etcd's answer to a Txn, a
/// relayed group's round trip and its time at the relay, and a remote
/// reservation's call ("a commit waits 10.3 ms: …").
pub(super) fn commit_time(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (String, serde_json::Value) {
    let delta = Delta { before, after };
    let mean_ms = |us: &str, n: &str| delta.mean_ms(us, n);
    let show = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.1} ms"));
    let (wait, txn, relay, at_relay, reserve) = (
        mean_ms("commit_wait_us", "commit_waits"),
        mean_ms("commit_us", "commit_txns"),
        mean_ms("relay_us", "relayed_out"),
        mean_ms("relayed_in_us", "relayed_in"),
        mean_ms("reserve_us", "reserve_calls"),
    );
    let text = format!(
        "a commit waits {} for its outcome; etcd answers a Txn in {}; a relayed group's round trip {}, {} of it at the relay; a remote reservation {}",
        show(wait),
        show(txn),
        show(relay),
        show(at_relay),
        show(reserve),
    );
    let json = json!({
        "commit_wait_ms": wait,
        "txn_ms": txn,
        "relay_round_trip_ms": relay,
        "at_relay_ms": at_relay,
        "reservation_ms": reserve,
    });
    (text, json)
}

/// One phase of durable sends: `total` sends, each sender (a client acting
/// as an agent) mailing its recipient, one send at a time per sender.
pub(super) struct Sends<'a> {
    pub hosts: &'a [agent::Client],
    pub total: usize,
    /// The nodes' and the store members' pids, for the CPU they spend.
    pub pids: &'a (Vec<u32>, Vec<u32>),
    /// Trace one send in so many (0: none): their ids are the phase's.
    pub trace_every: usize,
}

/// One send in so many is traced with `capstan bench --cluster … --trace`.
pub const TRACE_EVERY: usize = 500;

impl Sends<'_> {
    /// One phase: its rate and latencies, and what the store did, where
    /// the commits waited and the CPU spent, per send.
    pub(super) async fn phase(
        &self,
        senders: Rc<Vec<(agent::Client, String)>>,
    ) -> anyhow::Result<Phase> {
        let before = store_counters(self.hosts).await?;
        let cpu = CpuMeter::start(self.pids.0.clone(), self.pids.1.clone());
        let t = Instant::now();
        let c2 = senders.clone();
        let every = self.trace_every;
        let traced = Rc::new(std::cell::RefCell::new(Vec::new()));
        let t2 = traced.clone();
        let lat = concurrently(
            self.total,
            senders.len(),
            move |i| {
                let (a, to) = c2[i % c2.len()].clone();
                let id = if every > 0 && i % every == every / 2 {
                    let id = capstan_cluster::trace::new_id();
                    t2.borrow_mut().push(id);
                    id
                } else {
                    0
                };
                async move {
                    send_traced(&a, &to, &format!("burst {i}"), id)
                        .await
                        .map(drop)
                }
            },
            "cluster send",
        )
        .await?;
        let traced = traced.take();
        let rate = self.total as f64 / t.elapsed().as_secs_f64();
        let after = store_counters(self.hosts).await?;
        let store = store_cost(&before, &after, self.total);
        let waits = commit_time(&before, &after);
        let (mut text, mut cpu_json) = cpu.per_op(self.total);
        // What this machine could do at this cost with every core busy: the
        // ceiling sends meet here when nodes, store and clients share it.
        let all_us: f64 = ["nodes_us", "store_us", "clients_us"]
            .iter()
            .filter_map(|k| cpu_json[*k].as_f64())
            .sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if all_us > 0.0 {
            let ceiling = cores as f64 * 1e6 / all_us;
            text.push_str(&format!(
                "; at this cost all {cores} cores would make {ceiling:.0} sends/s"
            ));
            cpu_json["cores"] = json!(cores);
            cpu_json["ceiling_per_s"] = json!(ceiling);
        }
        Ok(Phase {
            rate,
            traced,
            latency: stats(lat),
            store,
            waits,
            cpu: (text, cpu_json),
        })
    }
}

/// What one phase of sends measured: each summary as its row's text and
/// JSON.
pub(super) struct Phase {
    pub rate: f64,
    /// The ids of the sends it traced.
    pub traced: Vec<u64>,
    pub latency: Stats,
    pub store: (String, serde_json::Value),
    pub waits: (String, serde_json::Value),
    pub cpu: (String, serde_json::Value),
}

impl Phase {
    /// The phase's rate row, `what` with `target` and `endo` (the figure
    /// compared), for `senders` senders on `nodes` nodes.
    pub(super) fn rate_row(
        &self,
        what: String,
        nodes: usize,
        senders: usize,
        target: &'static str,
        endo: &'static str,
    ) -> Row {
        let (rate, s) = (self.rate, &self.latency);
        Row {
            what,
            value: format!("{rate:.0} /s (p50 {}, p99 {})", ms(s.p50), ms(s.p99)),
            target,
            endo,
            json: json!({"per_s": rate, "p50_us": s.p50, "p99_us": s.p99, "nodes": nodes, "senders": senders, "store_per_send": self.store.1}),
        }
    }

    /// The rows after the phase's rate, named after `prefix`: the store's
    /// work per send, where a send's time goes, and the CPU per send.
    pub(super) fn rows(self, prefix: &str, rows: &mut Vec<Row>) {
        for (what, (text, json)) in [
            ("store work per send", (self.store.0, json!(null))),
            ("where a send's time goes", self.waits),
            ("CPU per send", self.cpu),
        ] {
            rows.push(Row {
                what: format!("{prefix} {what}"),
                value: text,
                target: "",
                endo: "",
                json,
            });
        }
    }
}

/// The spans of the traced sends `ids`, gathered through `host` (which asks
/// every member), written to `file` as a Chrome trace (one process per
/// node, one thread per send), and a row of each hop's median duration
/// and how many sends took it.
pub(super) async fn traced_hops(
    host: &agent::Client,
    ids: &[u64],
    file: &std::path::Path,
) -> anyhow::Result<Row> {
    let mut spans = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let mut r = host.cluster_request();
        r.get().set_command("trace");
        r.get()
            .set_arg(capstan_cluster::trace::format_id(*id).as_str());
        let answer = r.send().promise.await?;
        let v: serde_json::Value = serde_json::from_str(answer.get()?.get_json()?.to_str()?)?;
        for s in v["spans"].as_array().cloned().unwrap_or_default() {
            spans.push((n as u64 + 1, s));
        }
    }
    // each hop's durations, and the sends it appeared in
    let mut hops: BTreeMap<String, (Vec<u64>, std::collections::BTreeSet<u64>)> = BTreeMap::new();
    for (send, s) in &spans {
        let h = hops
            .entry(s["name"].as_str().unwrap_or("?").to_string())
            .or_default();
        h.0.push(s["dur_us"].as_u64().unwrap_or(0));
        h.1.insert(*send);
    }
    let chrome = capstan::net::traces::chrome_trace(spans.iter().map(|(n, s)| (*n, s)));
    std::fs::write(file, serde_json::to_vec(&chrome)?)?;
    let mut by_median: Vec<(String, u64, usize)> = hops
        .into_iter()
        .map(|(name, (mut d, sends))| {
            d.sort_unstable();
            (name, d[d.len() / 2], sends.len())
        })
        .collect();
    by_median.sort_by_key(|b| std::cmp::Reverse(b.1));
    let text = by_median
        .iter()
        .map(|(name, p50, n)| format!("{name} {} ({n})", ms(*p50 as f64)))
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Row {
        what: format!(
            "cluster: traced sends' hops, p50 (in how many of {} sends), spans in {}",
            ids.len(),
            file.display()
        ),
        value: text,
        target: "",
        endo: "",
        json: json!({
            "traced": ids.len(),
            "file": file.display().to_string(),
            "hops": by_median.iter().map(|(name, p50, n)| json!({"name": name, "p50_us": p50, "sends": n})).collect::<Vec<_>>(),
        }),
    })
}

/// Which node owns the host's inbox (the sends' figures depend on it: its
/// owner reserves the host's numbers locally, the relay fills them in for
/// the other nodes' sends, itself when it is the owner), as a row.
pub(super) async fn host_placement(host: &agent::Client) -> anyhow::Result<Row> {
    let json_of = |command: &'static str, arg: &'static str| async move {
        let mut r = host.cluster_request();
        r.get().set_command(command);
        r.get().set_arg(arg);
        let answer = r.send().promise.await?;
        let v: serde_json::Value = serde_json::from_str(answer.get()?.get_json()?.to_str()?)?;
        Ok::<_, anyhow::Error>(v)
    };
    let placement = json_of("placement", "HOST").await?;
    let status = json_of("status", "").await?;
    let owner = placement["node"].as_str().unwrap_or("nobody").to_string();
    let relay = status["commit_merger"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    // (the nodes inherit this process's environment)
    let filling = std::env::var("CAPSTAN_FILL_NUMBERS").map_or(true, |v| v != "0");
    let value = if !filling {
        format!(
            "{owner} (the relay is {relay}; the other nodes reserve the host's numbers at {owner}: CAPSTAN_FILL_NUMBERS=0 turned the relay's filling off)"
        )
    } else if owner == relay {
        format!("{owner}, the relay: it fills in the host's numbers of the other nodes' sends")
    } else {
        format!(
            "{owner}; the relay {relay} fills in the host's numbers of the other nodes' sends, reserving them at {owner} a group at a time"
        )
    };
    Ok(Row {
        what: "cluster: the host's inbox lives on".into(),
        value,
        target: "",
        endo: "",
        json: json!({"owner": owner, "relay": relay, "filling": filling}),
    })
}
