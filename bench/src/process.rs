//! The bench's processes: a daemon child on a bench home ([`Daemon`]),
//! and what `/proc` says of a process (CPU ticks, resident memory, the
//! store's etcd members).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use capstan::client;
use capstan::home::Paths;

/// A daemon child process on the bench home.
pub(super) struct Daemon {
    pub(super) child: Child,
    paths: Paths,
}

impl Daemon {
    /// Spawns `capstan start --foreground` and waits for its first answer; returns the time
    /// from spawn to that answer.
    pub(super) async fn spawn(exe: &Path, paths: &Paths) -> anyhow::Result<(Daemon, Duration)> {
        Daemon::spawn_with(exe, paths, &[]).await
    }

    /// Like [`Daemon::spawn`], with extra `start` arguments (`--store`, `--listen`).
    pub(super) async fn spawn_with(
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
            // CAPSTAN_BENCH_LOG: the daemons' log filter (bench-daemon.log
            // in each home, kept with --dir), e.g. for the read trace.
            .env(
                "CAPSTAN_LOG",
                std::env::var("CAPSTAN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
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

    pub(super) fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }

    /// SIGKILL, then reap.
    pub(super) fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// A graceful stop.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
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
pub(super) fn etcd_pids(spec: &str) -> Vec<u32> {
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
pub(super) struct CpuMeter {
    nodes: Vec<u32>,
    etcd: Vec<u32>,
    start: [u64; 3],
}

impl CpuMeter {
    pub(super) fn start(nodes: Vec<u32>, etcd: Vec<u32>) -> CpuMeter {
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
    pub(super) fn per_op(&self, ops: usize) -> (String, serde_json::Value) {
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

impl CpuMeter {
    /// "nodes 1.2 %, store 0.8 % of a core" over `elapsed` since the start.
    pub(super) fn share(&self, elapsed: std::time::Duration) -> (String, serde_json::Value) {
        let hz = 100.0;
        let now = self.read();
        let pct = |i: usize| {
            (now[i].saturating_sub(self.start[i])) as f64 / hz / elapsed.as_secs_f64().max(1e-3)
                * 100.0
        };
        let (n, e) = (pct(0), pct(1));
        (
            format!("nodes {n:.1} %, store {e:.1} % of a core"),
            json!({"nodes_pct": n, "store_pct": e}),
        )
    }
}

/// Resident set size of a process, in KiB.
pub(super) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc status")
}
