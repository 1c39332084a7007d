//! The etcd store compacts etcd's history it no longer needs
//! (`capstan_cluster::etcd_store::compact`), against a real etcd cluster.
//!
//! Compaction is etcd-wide, so these checks live in a test binary of their
//! own (cargo runs test binaries one at a time): a short history here must
//! not take away the revisions another binary's checks read at.
//!
//! Needs `CAPSTAN_ETCD_ENDPOINTS` like `etcd_conformance.rs` (skipped
//! without it unless `CAPSTAN_REQUIRE_ETCD=1`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capstan_cluster::conformance::{get, runtime as rt, set, unique};
use capstan_cluster::etcd_rpc::{ConnectOptions, EtcdClient, RangeRequest};
use capstan_cluster::etcd_store::EtcdStore;
use capstan_cluster::{Db, Store};

const HISTORY_MS: u64 = 600;

fn endpoints() -> Option<String> {
    capstan_cluster::conformance::etcd_endpoints()
}

fn client() -> EtcdClient {
    let first = endpoints().expect("endpoints");
    let first = first.split(',').next().expect("an endpoint").to_string();
    let url = if first.starts_with("http") {
        first
    } else {
        format!("http://{first}")
    };
    EtcdClient::new(
        &url,
        &ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            max_decoding_bytes: 16 << 20,
            tls: None,
            user: None,
        },
    )
    .expect("a client")
}

fn stat(s: &EtcdStore, name: &str) -> u64 {
    s.stats()
        .into_iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .unwrap_or(0)
}

/// Two clients of one store (two nodes, say) with a short history, and a
/// writer that keeps the revision moving: revisions older than the history
/// are compacted away (a read at one is refused by etcd), the clients take
/// turns rather than each compacting every time, and a transaction whose
/// snapshot was compacted under it runs again on a fresh one and commits
/// the right thing. A store with `history-ms=0` compacts nothing.
#[test]
fn old_history_is_compacted_and_a_transaction_reading_through_it_runs_again() {
    if endpoints().is_none() {
        return;
    }
    rt().block_on(async {
        let prefix = format!("capstan-test/compact-{}", unique("c"));
        let spec = format!(
            "etcd://{}/{prefix}?history-ms={HISTORY_MS}",
            endpoints().unwrap()
        );
        let a = Arc::new(EtcdStore::open(&spec).await.unwrap());
        let b = Arc::new(EtcdStore::open(&spec).await.unwrap());
        let off = Arc::new(
            EtcdStore::open(&spec.replace(&format!("history-ms={HISTORY_MS}"), "history-ms=0"))
                .await
                .unwrap(),
        );
        let (da, db) = (Db::new(a.clone()), Db::new(b.clone()));
        let doff = Db::new(off.clone());

        // The first value, and the revision it was written at.
        set(&da, b"k", b"first").await.unwrap();
        let etcd = client();
        let key = format!("{prefix}/d/k").into_bytes();
        let first = etcd
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let first_rev = first.kvs.first().expect("k was written").mod_revision;

        // A writer on both clients (and on the one that does not compact),
        // so every client sees the revision move.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (da, db, doff, stop) = (da.clone(), db.clone(), doff.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let d = [&da, &db, &doff][(i % 3) as usize];
                    set(d, b"tick", &i.to_be_bytes()).await.unwrap();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                i
            })
        };

        // A transaction that reads, waits out the history (so its snapshot
        // is compacted under it), lists another key and writes: its second
        // read is refused, it runs again, and the second run commits.
        // Nothing else conflicts with it: "other" is written before it
        // starts and seen by its client, and only it writes "k"
        // (uncompacted, it commits on its first run).
        set(&da, b"other", b"o").await.unwrap();
        // (b's next transaction starts from a revision b saw: one with it)
        assert_eq!(get(&db, b"other").await.unwrap(), Some(b"o".to_vec()));
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let started = Instant::now();
        let seen = db
            .transact(move |tx| {
                let r = r.clone();
                Box::pin(async move {
                    let run = r.fetch_add(1, Ordering::SeqCst);
                    let v = tx.get(b"k").await?;
                    if run == 0 {
                        tokio::time::sleep(Duration::from_millis(HISTORY_MS * 3)).await;
                    }
                    // a listing: read from etcd at the snapshot (a single
                    // key may be answered from the client's cache)
                    let o = tx
                        .get_prefix(b"other", 0, false)
                        .await?
                        .pop()
                        .map(|(_, v)| v);
                    tx.set(b"k", b"second")?;
                    Ok::<_, capstan_cluster::StoreError>((v, o))
                })
            })
            .await
            .unwrap();
        assert_eq!(seen, (Some(b"first".to_vec()), Some(b"o".to_vec())));
        assert!(
            runs.load(Ordering::SeqCst) >= 2,
            "the transaction read at a compacted revision, yet ran only once"
        );

        // Long enough for several turns.
        let until = started + Duration::from_millis(HISTORY_MS * 6);
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        stop.store(true, Ordering::Relaxed);
        let ticks = writer.await.unwrap();
        assert!(ticks > 100, "the writer made only {ticks} commits");
        assert_eq!(get(&da, b"k").await.unwrap(), Some(b"second".to_vec()));

        // The first revision is gone: etcd refuses to read at it.
        let old = etcd
            .range(RangeRequest {
                key: key.clone(),
                revision: first_rev,
                ..Default::default()
            })
            .await;
        match old {
            Err(e) => assert!(
                e.to_string().contains("compacted"),
                "a read at the first revision failed for another reason: {e}"
            ),
            Ok(_) => panic!("revision {first_rev} was still readable after 6 histories"),
        }

        // Turns: one compaction per tenth of the history at most, between
        // the two clients (each alone would make one per tenth).
        let (ca, cb) = (stat(&a, "compactions"), stat(&b, "compactions"));
        let elapsed = started.elapsed().as_millis() as u64;
        let turns = elapsed / (HISTORY_MS / 10 * 9 / 10) + 2;
        assert!(ca + cb >= 1, "nobody compacted");
        assert!(
            ca + cb <= turns,
            "{ca} + {cb} compactions in {elapsed} ms: the clients did not take turns (at most {turns})"
        );
        assert!(stat(&a, "compacted_to").max(stat(&b, "compacted_to")) > first_rev as u64);
        assert_eq!(stat(&off, "compactions"), 0, "history-ms=0 compacted");
    });
}

/// Single-key reads at different revisions share one etcd request. One at
/// a revision compacted away fails that request as a whole: the reads in it
/// at live revisions are answered all the same, and only the old one fails
/// (every read of the request was told "conflict").
#[test]
fn a_read_at_a_compacted_revision_fails_only_itself() {
    if endpoints().is_none() {
        return;
    }
    rt().block_on(async {
        let prefix = format!("capstan-test/compact-{}", unique("batch"));
        // (no compaction of its own: the test compacts)
        let spec = format!("etcd://{}/{prefix}?history-ms=0", endpoints().unwrap());
        let store = Arc::new(EtcdStore::open(&spec).await.unwrap());
        let db = Db::new(store.clone());
        set(&db, b"k", b"v").await.unwrap();
        let old = store.snapshot().await.unwrap();
        set(&db, b"k", b"w").await.unwrap();
        let latest = store.snapshot().await.unwrap().version();
        client()
            .compact(i64::try_from(latest).unwrap())
            .await
            .expect("compacted");
        for round in 0..5 {
            let mut fresh = Vec::new();
            for _ in 0..20 {
                fresh.push(store.snapshot().await.unwrap());
            }
            let reads = fresh.iter().map(|s| s.get(b"k"));
            let (fresh_answers, old_answer) =
                tokio::join!(futures::future::join_all(reads), old.get(b"k"));
            assert!(old_answer.is_err(), "round {round}: {old_answer:?}");
            for a in fresh_answers {
                assert_eq!(a, Ok(Some(b"w".to_vec())), "round {round}");
            }
        }
        assert!(
            stat(&store, "read_rpcs") < stat(&store, "reads"),
            "the reads never shared a request, so this test checked nothing"
        );
    });
}
