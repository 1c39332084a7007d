//! A cluster across real hosts (issue 17): etcd members and Capstan nodes
//! each in their own network namespace (tests/src/testnet.rs), with links
//! cut under a running workload whose history is checked afterwards
//! (tests/src/history.rs).
//!
//! Needs root and `ip netns` (CI runs as root); fails saying so elsewhere,
//! unless `CAPSTAN_SKIP_TESTNET=1`. Each test has its own namespaces and
//! etcd; they run one at a time (they time leases on a small machine).
//! Figures (time to fence, to fail over, mail delayed and delivered after
//! the heal) are printed with `--nocapture`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use capstan_tests::history::{History, Outcome};
use capstan_tests::testnet::{Etcd, Testnet};
use capstan_tests::Node;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

/// The nodes' lease (short, for a quick test; long enough that a loaded
/// 2-core machine does not lose leases by itself).
const LEASE_MS: u64 = 3000;
const QUIC_PORT: u16 = 7401;
const METRICS_PORT: u16 = 9101;
/// One workload command; longer means the command hung on a cut link.
const OP_TIMEOUT: Duration = Duration::from_secs(8);
/// The most any awaited event may take: a safety net, not a timing check.
const PATIENCE: Duration = Duration::from_secs(60);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `f` gives `Some`, at most [`PATIENCE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Capstan node on host `label`, listening on all its addresses and
/// advertising its host's, serving metrics on its host's loopback.
fn node_on(net: &Testnet, label: &str) -> Node {
    Node::named(label)
        .in_netns(net.ns(label))
        .with_env("CAPSTAN_LEASE_MS", &LEASE_MS.to_string())
}

fn start_args(net: &Testnet, label: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("0.0.0.0:{QUIC_PORT}"),
        "--advertise".into(),
        format!("{}:{QUIC_PORT}", net.ip(label)),
        "--metrics".into(),
        format!("127.0.0.1:{METRICS_PORT}"),
    ]
}

/// A metric of the node on `label` (read from inside its host), if it answered.
fn metric(net: &Testnet, label: &str, name: &str) -> Option<f64> {
    let body = net.http_get(label, METRICS_PORT, "/metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
}

/// Three etcd hosts e1..e3 and Capstan nodes on n1..nN, one cluster.
/// Fields drop in order: nodes, then etcd, then the namespaces.
struct Site {
    nodes: Vec<Node>,
    etcd: Etcd,
    net: Testnet,
}

impl Site {
    fn up(extra_hosts: &[&str], n: usize) -> Option<Site> {
        let mut labels = vec!["e1", "e2", "e3"];
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        labels.extend(names.iter().map(String::as_str));
        labels.extend_from_slice(extra_hosts);
        let net = Testnet::up(&labels)?;
        let t = Instant::now();
        let etcd = Etcd::start(&net, &["e1", "e2", "e3"]);
        let spec = format!("etcd://{}/capstan-testnet", etcd.endpoints);
        let mut nodes = Vec::new();
        for name in &names {
            let mut node = node_on(&net, name);
            if nodes.is_empty() {
                let v = node.json(["cluster", "init", "--store", &spec]);
                assert_eq!(v["created"], true, "{v}");
            }
            let mut args = vec!["--store".to_string(), spec.clone()];
            args.extend(start_args(&net, name));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node.start_with(&args);
            nodes.push(node);
        }
        let site = Site { nodes, etcd, net };
        wait_for("every member live", || {
            let v = site.n(1).json(["cluster", "members"]);
            let live = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["state"] == "live")
                .count();
            (live == n).then_some(())
        });
        eprintln!(
            "testnet {}: etcd on e1..e3 ({}), {n} nodes up in {:.1?}",
            site.net.prefix,
            site.etcd.endpoints,
            t.elapsed()
        );
        Some(site)
    }

    /// Node `i` (1-based, as its name nI).
    fn n(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    fn owner(&self, via: usize, name: &str) -> Value {
        self.n(via).json(["cluster", "placement", name])["node"].clone()
    }
}

/// A client sending `PREFIX-k` to `to` through `node` until `stop`, one
/// command at a time; returns how many it sent.
fn client(h: &History, node: &Node, via: &str, to: &str, prefix: &str, stop: &AtomicBool) -> usize {
    let mut k = 0;
    while !stop.load(Ordering::Acquire) {
        h.send(node, via, to, &format!("{prefix}-{k}"), &[], OP_TIMEOUT);
        k += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    k
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn print_ops(h: &History, via: &str, from: Duration, to: Duration) {
    for o in h
        .ops()
        .iter()
        .filter(|o| o.via == via && o.end >= from && o.start <= to)
    {
        eprintln!("  {o}");
    }
}

/// (1) The owner of an agent loses every etcd member but not its peers.
#[test]
fn an_owner_cut_off_from_etcd_is_fenced_and_a_survivor_takes_over() {
    let _g = serial();
    let Some(site) = Site::up(&[], 3) else { return };
    let net = &site.net;
    site.n(1).ok(["mkguest", "alice"]);
    site.n(1).ok(["send", "alice", "before"]);
    assert_eq!(site.owner(2, "alice"), "n1");
    assert_eq!(metric(net, "n1", "capstan_cluster_serving"), Some(1.0));

    let h = History::new();
    let stop = AtomicBool::new(false);
    let (t_cut, t_heal, fence, failover) = std::thread::scope(|s| {
        s.spawn(|| client(&h, site.n(1), "n1", "alice", "via-n1", &stop));
        s.spawn(|| client(&h, site.n(2), "n2", "alice", "via-n2", &stop));
        std::thread::sleep(Duration::from_secs(2));
        let t_cut = h.now();
        net.cut(&["n1"], &["e1", "e2", "e3"]);
        // n1 stops serving (drops alice) on its own clock.
        let mut unserving = None;
        let fence = wait_for("n1 to stop serving", || {
            let serving = metric(net, "n1", "capstan_cluster_serving")?;
            let inc = metric(net, "n1", "capstan_incarnations")?;
            if serving == 0.0 && unserving.is_none() {
                unserving = Some(h.now() - t_cut);
            }
            (serving == 0.0 && inc == 0.0).then(|| h.now() - t_cut)
        });
        eprintln!(
            "n1 not serving after {}, its incarnations dropped after {}",
            secs(unserving.unwrap_or(fence)),
            secs(fence)
        );
        // A survivor takes alice over: a send through n2, begun after the cut, succeeds.
        let failover = wait_for("a send through n2 after the cut", || {
            h.ops()
                .iter()
                .find(|o| o.via == "n2" && o.start > t_cut && o.outcome == Outcome::Ok)
                .map(|o| o.end - t_cut)
        });
        std::thread::sleep(Duration::from_secs(3));
        let t_heal = h.now();
        net.heal();
        // n1 re-registers and serves again (through alice's new owner).
        wait_for("n1 serving again", || {
            (metric(net, "n1", "capstan_cluster_serving")? == 1.0).then_some(())
        });
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Release);
        (t_cut, t_heal, fence, failover)
    });
    let owner = site.owner(3, "alice");
    assert!(owner == "n2" || owner == "n3", "alice's owner now: {owner}");

    // No send through n1 is acknowledged between its lease's lapse and the heal.
    let lapse = t_cut + Duration::from_millis(LEASE_MS);
    let late: Vec<_> = h
        .ops()
        .into_iter()
        .filter(|o| o.via == "n1" && o.outcome == Outcome::Ok)
        .filter(|o| o.start > lapse && o.end < t_heal)
        .collect();
    assert!(
        late.is_empty(),
        "n1 acknowledged sends while cut off from etcd past its lease: {late:#?}"
    );
    let inbox = site.n(3).inbox(&["--as", "alice"]);
    let summary = h.check_inbox("alice", &inbox, |t| t.starts_with("via-"));
    let stats = site.n(1).json(["cluster", "status"]);
    eprintln!(
        "figures (lease {LEASE_MS} ms): time to fence n1 {}, time to fail over to {owner} {}, \
         partition {}, n1 stepdowns {}; history: {summary}",
        secs(fence),
        secs(failover),
        secs(t_heal - t_cut),
        stats["stepdowns"]
    );
    eprintln!("sends through n1 from the cut on:");
    print_ops(&h, "n1", t_cut, t_heal + Duration::from_secs(1));
    eprintln!("sends through n2 around the cut:");
    print_ops(&h, "n2", t_cut - Duration::from_millis(500), t_cut + failover + Duration::from_secs(1));
    assert!(
        fence < Duration::from_millis(LEASE_MS) + Duration::from_secs(15),
        "n1 took {fence:?} to stop serving"
    );
    assert!(summary.ok > 0);
}
