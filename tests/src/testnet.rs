//! Hosts as network namespaces (issue 17): a test gets a private network
//! of "hosts", each a network namespace with its own loopback and one
//! address in 10.77.0.0/24, joined by a bridge; it runs etcd members and
//! Capstan nodes inside them and cuts links between them.
//!
//! # Layout
//!
//! A [`Testnet`] named `cst-<pid>-<n>` (the test process and a counter, so
//! tests may run in parallel) owns the namespaces `cst-<pid>-<n>-sw` (the
//! switch: a bridge `br0` and the host side `v<LABEL>` of each host's veth
//! pair) and `cst-<pid>-<n>-<LABEL>` for each host (`eth0`, `lo`). Nothing
//! is made in the machine's own namespace, and each testnet is its own
//! layer-2 network, so every testnet uses the same addresses: the k-th host
//! (from 0) is 10.77.0.(k+1).
//!
//! # Partitions
//!
//! - [`Testnet::link_down`]: the switch side of a host's veth goes down: the
//!   host reaches nobody and nobody reaches it.
//! - [`Testnet::cut`]: blackhole routes in both directions between two
//!   groups of hosts (the packets vanish silently, as on a broken path);
//!   other pairs keep talking.
//! - [`Testnet::heal`]: every link up and every cut removed.
//!
//! # Cleanup
//!
//! Dropping the testnet deletes its namespaces, which deletes the veths and
//! the bridge with them; processes started inside must be ended first (by
//! their owners: [`crate::Node`], [`Etcd`]). A testnet made while a test
//! process that was killed left namespaces behind removes those first
//! (`cst-<pid>-…` whose pid is gone); `scripts/testnet down --stale` does
//! the same by hand.
//!
//! Needs root and `ip netns`: without them [`Testnet::up`] panics with what
//! is missing, unless `CAPSTAN_SKIP_TESTNET=1` is set (then it returns
//! `None` and the test is skipped, saying so).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{kill, pid_alive};

/// The private range every testnet uses (inside its own namespaces only).
pub const SUBNET: &str = "10.77.0";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One host: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub label: String,
    pub ns: String,
    pub ip: String,
}

/// A private network of hosts; see the module documentation.
pub struct Testnet {
    pub prefix: String,
    switch: String,
    hosts: Vec<Host>,
    /// Blackholed (from, to) address pairs, to heal.
    cuts: Mutex<BTreeSet<(usize, usize)>>,
    /// Hosts whose switch port is down.
    down: Mutex<BTreeSet<usize>>,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"))
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Why namespaces cannot be made here, if they cannot.
fn missing() -> Option<String> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!(
            "network namespaces need root (running as uid {euid})"
        ));
    }
    // Make (and remove) a namespace: root in a container without
    // CAP_SYS_ADMIN can list namespaces but not make them.
    let probe = format!("cst-{}-probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Ok(o) => Some(format!(
            "cannot make a network namespace (`ip netns add`: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip` (iproute2): {e}")),
    }
}

/// Namespaces of test processes that are gone (`cst-<pid>-…`).
fn remove_stale() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("cst-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !pid_alive(pid) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Testnet {
    /// Makes a network of hosts called `labels` (short: at most 12
    /// characters, `[a-z0-9]`), each up with loopback and its address.
    /// `None` (skipped, printed) only with `CAPSTAN_SKIP_TESTNET=1` where
    /// namespaces cannot be made; otherwise that is a panic saying why.
    pub fn up(labels: &[&str]) -> Option<Testnet> {
        static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if let Some(why) = MISSING.get_or_init(missing) {
            if std::env::var("CAPSTAN_SKIP_TESTNET").as_deref() == Ok("1") {
                eprintln!("skipped (CAPSTAN_SKIP_TESTNET=1): {why}");
                return None;
            }
            panic!(
                "{why}: the partition tests run nodes in network namespaces; run them as root \
                 with iproute2, or set CAPSTAN_SKIP_TESTNET=1 to skip them"
            );
        }
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(remove_stale);
        assert!(labels.len() < 250, "at most 249 hosts");
        let prefix = format!(
            "cst-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}-sw");
        let hosts: Vec<Host> = labels
            .iter()
            .enumerate()
            .map(|(k, l)| {
                assert!(
                    !l.is_empty()
                        && l.len() <= 12
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                    "bad host label {l:?}"
                );
                Host {
                    label: l.to_string(),
                    ns: format!("{prefix}-{l}"),
                    ip: format!("{SUBNET}.{}", k + 1),
                }
            })
            .collect();
        // From here on, Drop cleans up whatever was made.
        let net = Testnet {
            prefix,
            switch,
            hosts,
            cuts: Mutex::new(BTreeSet::new()),
            down: Mutex::new(BTreeSet::new()),
        };
        let sw = net.switch.as_str();
        ip_ok(&["netns", "add", sw]);
        ip_ok(&["-n", sw, "link", "set", "lo", "up"]);
        ip_ok(&["-n", sw, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", sw, "link", "set", "br0", "up"]);
        for h in &net.hosts {
            let port = format!("v{}", h.label);
            ip_ok(&["netns", "add", &h.ns]);
            ip_ok(&["-n", &h.ns, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &h.ns,
            ]);
            ip_ok(&["-n", sw, "link", "set", &port, "master", "br0"]);
            ip_ok(&["-n", sw, "link", "set", &port, "up"]);
            ip_ok(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                "eth0",
            ]);
            ip_ok(&["-n", &h.ns, "link", "set", "eth0", "up"]);
        }
        Some(net)
    }

    fn index(&self, label: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.label == label)
            .unwrap_or_else(|| panic!("no host {label:?} in this testnet"))
    }

    pub fn host(&self, label: &str) -> &Host {
        &self.hosts[self.index(label)]
    }

    /// The host's address.
    pub fn ip(&self, label: &str) -> &str {
        &self.host(label).ip
    }

    /// The host's namespace.
    pub fn ns(&self, label: &str) -> &str {
        &self.host(label).ns
    }

    /// `program` to be run inside the host (`ip netns exec NS program`).
    pub fn command(&self, label: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(label), program]);
        c
    }

    /// Runs `argv` inside the host to completion.
    pub fn exec(&self, label: &str, argv: &[&str]) -> Output {
        self.command(label, argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?} in {label}: {e}"))
    }

    /// An HTTP GET of `http://127.0.0.1:PORT/PATH` from inside the host
    /// (the body; empty when nothing answered within 5 s).
    pub fn http_get(&self, label: &str, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; \
             printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             timeout 5 cat <&3"
        );
        let out = self.exec(label, &["bash", "-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_string(),
            None => String::new(),
        }
    }

    /// The host reaches nobody and nobody reaches it (its switch port goes down).
    pub fn link_down(&self, label: &str) {
        let k = self.index(label);
        ip_ok(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("v{label}"),
            "down",
        ]);
        self.down.lock().unwrap().insert(k);
    }

    /// The host's switch port comes back.
    pub fn link_up(&self, label: &str) {
        let k = self.index(label);
        ip_ok(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("v{label}"),
            "up",
        ]);
        self.down.lock().unwrap().remove(&k);
    }

    /// Cuts every path between a host of `a` and a host of `b`, both ways
    /// (blackhole routes: packets vanish). Hosts inside a group keep talking.
    pub fn cut(&self, a: &[&str], b: &[&str]) {
        let mut cuts = self.cuts.lock().unwrap();
        for x in a {
            for y in b {
                let (i, j) = (self.index(x), self.index(y));
                for (from, to) in [(i, j), (j, i)] {
                    if cuts.insert((from, to)) {
                        ip_ok(&[
                            "-n",
                            &self.hosts[from].ns,
                            "route",
                            "add",
                            "blackhole",
                            &format!("{}/32", self.hosts[to].ip),
                        ]);
                    }
                }
            }
        }
    }

    /// Every cut removed and every link up.
    pub fn heal(&self) {
        let cuts: Vec<(usize, usize)> = std::mem::take(&mut *self.cuts.lock().unwrap())
            .into_iter()
            .collect();
        for (from, to) in cuts {
            ip_ok(&[
                "-n",
                &self.hosts[from].ns,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.hosts[to].ip),
            ]);
        }
        let down: Vec<usize> = self.down.lock().unwrap().iter().copied().collect();
        for k in down {
            let label = self.hosts[k].label.clone();
            self.link_up(&label);
        }
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// Members of a real etcd cluster, one per host, started by this test
/// (client port 2379, peer port 2380 on each host's address), with their
/// data in a temporary directory. Dropping it kills the members (by pid,
/// checking each is still an etcd).
pub struct Etcd {
    pub hosts: Vec<String>,
    /// Client endpoints, `10.77.0.k:2379,…`.
    pub endpoints: String,
    ips: Vec<String>,
    pids: Vec<Option<i32>>,
    dir: tempfile::TempDir,
}

fn is_etcd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "etcd")
        .unwrap_or(false)
}

impl Etcd {
    /// Starts one member on each of `hosts` and waits until all are healthy.
    pub fn start(net: &Testnet, hosts: &[&str]) -> Etcd {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "/usr/bin/etcd is missing: scripts/etcd-cluster start installs it"
        );
        let dir = tempfile::Builder::new()
            .prefix("capstan-testnet-etcd-")
            .tempdir()
            .expect("etcd data dir");
        let ips: Vec<String> = hosts.iter().map(|h| net.ip(h).to_string()).collect();
        let initial: Vec<String> = hosts
            .iter()
            .zip(&ips)
            .map(|(h, ip)| format!("{h}=http://{ip}:2380"))
            .collect();
        let initial = initial.join(",");
        let mut pids = Vec::new();
        for (h, ip) in hosts.iter().zip(&ips) {
            let log = std::fs::File::create(dir.path().join(format!("{h}.log"))).expect("log");
            let child = net
                .command(h, "/usr/bin/etcd")
                .args([
                    "--name",
                    h,
                    "--data-dir",
                    &dir.path().join(format!("{h}.data")).display().to_string(),
                    "--listen-client-urls",
                    &format!("http://{ip}:2379"),
                    "--advertise-client-urls",
                    &format!("http://{ip}:2379"),
                    "--listen-peer-urls",
                    &format!("http://{ip}:2380"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{ip}:2380"),
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-token",
                    &net.prefix,
                    "--initial-cluster-state",
                    "new",
                    "--max-request-bytes",
                    "16777216",
                    "--heartbeat-interval",
                    "100",
                    "--election-timeout",
                    "1000",
                    // An isolated member (a partitioned leader) campaigns
                    // with ever higher terms; without pre-vote its return
                    // deposes the majority's leader and the whole cluster
                    // is without a store for longer than a lease (every
                    // node stepped down at the heal). etcd 3.5 defaults to
                    // it; Debian's 3.4 does not.
                    "--pre-vote",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            // `ip netns exec` execs etcd: the child is the member. Reaped by
            // a thread so that a killed member leaves no zombie.
            pids.push(Some(child.id() as i32));
            std::thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
        }
        let etcd = Etcd {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            endpoints: ips
                .iter()
                .map(|ip| format!("{ip}:2379"))
                .collect::<Vec<_>>()
                .join(","),
            ips,
            pids,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let healthy = (0..etcd.hosts.len()).all(|i| etcd.healthy(net, i));
            if healthy {
                break;
            }
            for (i, p) in etcd.pids.iter().enumerate() {
                if let Some(p) = p {
                    assert!(
                        pid_alive(*p),
                        "etcd member {} exited: {}",
                        etcd.hosts[i],
                        etcd.log(i)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 60 s: {}",
                etcd.log(0)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        etcd
    }

    /// The log of member `i` (its last lines).
    pub fn log(&self, i: usize) -> String {
        let p: PathBuf = self.dir.path().join(format!("{}.log", self.hosts[i]));
        let t = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    fn etcdctl(&self, net: &Testnet, i: usize, args: &[&str]) -> Output {
        let ep = format!("{}:2379", self.ips[i]);
        let mut argv = vec![
            "etcdctl",
            "--endpoints",
            &ep,
            "--dial-timeout=1s",
            "--command-timeout=2s",
        ];
        argv.extend_from_slice(args);
        net.command(&self.hosts[i], "env")
            .arg("ETCDCTL_API=3")
            .args(&argv)
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl")
    }

    fn healthy(&self, net: &Testnet, i: usize) -> bool {
        self.etcdctl(net, i, &["endpoint", "health"])
            .status
            .success()
    }

    /// The host of the member that is the raft leader now, as its own
    /// member reports (asked from inside each host).
    pub fn leader(&self, net: &Testnet) -> Option<String> {
        let all: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        self.leader_among(net, &all)
    }

    /// The leader as the members on `hosts` see it: one of them that
    /// reports itself leader (an isolated old leader is not asked).
    pub fn leader_among(&self, net: &Testnet, hosts: &[&str]) -> Option<String> {
        for i in 0..self.hosts.len() {
            if !hosts.contains(&self.hosts[i].as_str()) {
                continue;
            }
            let out = self.etcdctl(net, i, &["endpoint", "status", "-w", "json"]);
            if !out.status.success() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let s = &v[0]["Status"];
            let id = s["header"]["member_id"].as_u64();
            if id.is_some() && id == s["leader"].as_u64() {
                return Some(self.hosts[i].clone());
            }
        }
        None
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for p in self.pids.iter_mut() {
            if let Some(pid) = p.take()
                && pid_alive(pid)
                && is_etcd(pid)
            {
                kill(pid, libc::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(10);
                while pid_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}
