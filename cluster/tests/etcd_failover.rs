//! `kill -9` of the etcd leader during a burst of commits: every
//! acknowledged commit is there exactly once and commits go on through the
//! other members. A test binary of its own so that no other etcd check runs
//! while a member is down (cargo runs test binaries one at a time); it needs
//! the cluster started by `scripts/etcd-cluster` (same `CAPSTAN_ETCD_DIR`)
//! and restarts the member it killed. Skipped without
//! `CAPSTAN_ETCD_ENDPOINTS` unless `CAPSTAN_REQUIRE_ETCD=1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capstan_cluster::StoreError;
use capstan_cluster::conformance::runtime as rt;
use capstan_cluster::tuple::TupleKey;

fn endpoints() -> Option<String> {
    capstan_cluster::conformance::etcd_endpoints()
}

fn etcd_enabled() -> bool {
    endpoints().is_some()
}

fn spec_for(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "etcd://{}/capstan-test/{tag}-{}-{nanos}",
        endpoints().expect("endpoints"),
        std::process::id()
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-cluster")
}

fn run_script(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "scripts/etcd-cluster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Restarts the killed member when dropped (also when the test fails).
struct Restart(String);

impl Drop for Restart {
    fn drop(&mut self) {
        if let Err(e) = run_script(&["restart", &self.0]) {
            eprintln!("{e}");
        }
    }
}

/// `kill -9` of the raft leader during a burst of commits from 8 tasks: every
/// acknowledged commit is there exactly once, and commits go on through the
/// other members (ambiguous outcomes are resolved by their markers).
#[test]
fn member_killed_during_burst() {
    if !etcd_enabled() {
        return;
    }
    if run_script(&["status"]).is_err() {
        panic!(
            "member_killed_during_burst needs a cluster started by scripts/etcd-cluster (same CAPSTAN_ETCD_DIR): {:?}",
            run_script(&["status"])
        );
    }
    const TASKS: u64 = 8;
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for("kill"))
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ack_times = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let acked: Vec<Arc<AtomicU64>> = (0..TASKS).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (db, stop, acked) = (db.clone(), stop.clone(), acked[t as usize].clone());
            let ack_times = ack_times.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Each commit: counter(t) += 1 and log(t, counter) = i.
                    db.transact(move |tx| {
                        Box::pin(async move {
                            let ck = TupleKey::new().str("counter").u64(t).into_vec();
                            let n = match tx.get(&ck).await? {
                                Some(v) => u64::from_be_bytes(v.try_into().unwrap()),
                                None => 0,
                            };
                            tx.set(&ck, &(n + 1).to_be_bytes())?;
                            tx.set(
                                TupleKey::new().str("log").u64(t).u64(n + 1).as_bytes(),
                                &i.to_be_bytes(),
                            )
                        })
                    })
                    .await?;
                    i += 1;
                    acked.store(i, Ordering::Relaxed);
                    ack_times.lock().unwrap().push(Instant::now());
                }
                Ok::<u64, StoreError>(i)
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before_kill: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let leader = run_script(&["leader"]).unwrap().trim().to_string();
        let restart = {
            run_script(&["kill", &leader]).unwrap();
            Restart(leader.clone())
        };
        let killed_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after_kill: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap().expect("a commit failed during failover");
        }
        drop(restart);
        // The longest time without any acknowledged commit after the kill.
        let mut times: Vec<Instant> = ack_times
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|t| *t >= killed_at)
            .collect();
        times.sort();
        let stall = times
            .iter()
            .zip(times.iter().skip(1))
            .map(|(a, b)| *b - *a)
            .chain(times.first().map(|t| *t - killed_at))
            .max()
            .unwrap_or_default();
        eprintln!(
            "leader n{leader} killed: {before_kill} commits before, {} in the 5 s after; longest stall without a commit {stall:?}",
            after_kill - before_kill
        );
        assert!(before_kill > 0, "no commit before the kill");
        assert!(
            after_kill > before_kill + 10,
            "commits did not go on after the kill: {before_kill} -> {after_kill}"
        );
        // Exactly once: counter(t) = acknowledged commits of t, and log(t, 1..=n)
        // holds 0..n in order (a commit applied twice would leave a duplicate).
        let mut seen = 0;
        for t in 0..TASKS {
            let (counter, log) = db
                .read(move |tx| {
                    Box::pin(async move {
                        let c = tx
                            .get(TupleKey::new().str("counter").u64(t).as_bytes())
                            .await?;
                        let log = tx
                            .get_prefix(TupleKey::new().str("log").u64(t).as_bytes(), 0, false)
                            .await?;
                        Ok::<_, StoreError>((c, log))
                    })
                })
                .await
                .unwrap();
            let n = u64::from_be_bytes(counter.unwrap().try_into().unwrap());
            let acked_t = acked[t as usize].load(Ordering::Relaxed);
            assert_eq!(n, acked_t, "task {t}: counter vs acknowledged commits");
            let values: Vec<u64> = log
                .iter()
                .map(|(_, v)| u64::from_be_bytes(v.clone().try_into().unwrap()))
                .collect();
            assert_eq!(values, (0..n).collect::<Vec<_>>(), "task {t}: log");
            seen += n;
        }
        assert_eq!(seen, total);
    });
}
