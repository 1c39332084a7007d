//! The backend conformance suite against a real etcd cluster, plus etcd-specific
//! checks: deletions are conflicts, read sets beyond 128 compares, the request
//! size limit, endpoint rotation, and a clear error when no endpoint answers.
//! (`kill -9` of the etcd leader during a burst is in `etcd_failover.rs`, a
//! test binary of its own: cargo runs test binaries one at a time, so no
//! other check shares the cluster while a member is down.)
//!
//! Needs `CAPSTAN_ETCD_ENDPOINTS` (comma-separated `HOST:PORT`, as printed by
//! `scripts/etcd-cluster start`). Without it every test passes as skipped,
//! unless `CAPSTAN_REQUIRE_ETCD=1`, which makes it fail. Each check uses a fresh
//! key prefix, so tests share one cluster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capstan_cluster::conformance::{get, runtime as rt, set, unique};
use capstan_cluster::etcd_store::DEFAULT_MAX_REQUEST_BYTES;
use capstan_cluster::tuple::TupleKey;
use capstan_cluster::{CommitRequest, Db, Mutation, StoreError, Transaction, TxFuture};

/// The `--max-request-bytes` of the cluster (scripts/etcd-cluster: 16 MiB).
const MAX_REQUEST_ENV: &str = "CAPSTAN_ETCD_MAX_REQUEST_BYTES";

/// The endpoints, or `None` (test skipped) when unset; panics if etcd is required.
fn endpoints() -> Option<String> {
    capstan_cluster::conformance::etcd_endpoints()
}

fn etcd_enabled() -> bool {
    endpoints().is_some()
}

fn max_request_bytes() -> usize {
    std::env::var(MAX_REQUEST_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16 * 1024 * 1024)
}

/// A store spec with a prefix of its own, derived from `tag`.
fn spec_for(tag: &str) -> String {
    format!(
        "etcd://{}/capstan-test/{tag}?max-request-bytes={}",
        endpoints().expect("endpoints"),
        max_request_bytes()
    )
}

async fn open_etcd(dir: PathBuf) -> Result<Db, StoreError> {
    let tag = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("scratch")
        .to_string();
    capstan_cluster::open(&spec_for(&tag)).await
}

capstan_cluster::conformance_tests!(open_etcd, enabled: etcd_enabled);

/// A key deleted after a transaction read it (by a range read or a get) makes
/// the transaction conflict: the case a range compare on mod revisions misses.
#[test]
fn deletions_after_the_read_conflict() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("del")))
            .await
            .unwrap();
        for k in [b"r/a", b"r/b", b"r/c"] {
            set(&db, k, b"1").await.unwrap();
        }
        // A range read, then a concurrent delete inside the range.
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        assert_eq!(tx.get_prefix(b"r/", 0, false).await.unwrap().len(), 3);
        tx.set(b"out", b"x").unwrap();
        db.transact(|t| {
            Box::pin(async move {
                t.clear(b"r/b");
                Ok::<_, StoreError>(())
            })
        })
        .await
        .unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict), "delete inside a read range");
        // A get, then a concurrent delete of that key.
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        assert!(tx.get(b"r/a").await.unwrap().is_some());
        tx.set(b"out", b"y").unwrap();
        set(&db, b"unrelated", b"1").await.unwrap();
        let mut other = Transaction::new(db.store().snapshot().await.unwrap());
        other.clear(b"r/a");
        db.store()
            .commit(other.into_commit_request().unwrap())
            .await
            .unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict), "delete of a key read");
        // An insert into a read range, and no conflict for an unrelated write.
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        tx.get_prefix(b"r/", 0, false).await.unwrap();
        tx.set(b"out", b"z").unwrap();
        set(&db, b"s/elsewhere", b"1").await.unwrap();
        db.store()
            .commit(tx.into_commit_request().unwrap())
            .await
            .expect("no conflict with a write outside the read set");
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        tx.get_prefix(b"r/", 0, false).await.unwrap();
        tx.set(b"out", b"w").unwrap();
        set(&db, b"r/new", b"1").await.unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict), "insert inside a read range");
        assert_eq!(get(&db, b"out").await.unwrap(), Some(b"z".to_vec()));
    });
}

/// Reads the 400 keys of `w` and 300 absent `single` keys, writes 100 `copy` keys.
fn wide(tx: &mut Transaction) -> TxFuture<'_, usize, StoreError> {
    Box::pin(async move {
        let rows = tx
            .get_prefix(TupleKey::new().str("w").as_bytes(), 0, false)
            .await?;
        for i in 0..300u64 {
            tx.get(TupleKey::new().str("single").u64(i).as_bytes())
                .await?;
            if i % 3 == 0 {
                tx.set(TupleKey::new().str("copy").u64(i).as_bytes(), b"c")?;
            }
        }
        Ok(rows.len())
    })
}

/// A read set of a 400-key range and 300 single keys: more than 128 compares,
/// so coarsened (range compares + the deletion guard); a concurrent delete or
/// write in it still conflicts. More than 128 writes are refused clearly.
#[test]
fn read_sets_beyond_128_compares() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        // The limit stated in the spec (a cluster started with a larger
        // --max-txn-ops takes it too): the client holds to it.
        let spec = format!("{}&max-txn-ops=128", spec_for(&unique("wide")));
        let db = capstan_cluster::open(&spec).await.unwrap();
        for batch in 0..4u64 {
            db.transact(move |tx| {
                Box::pin(async move {
                    for i in batch * 100..(batch + 1) * 100 {
                        tx.set(TupleKey::new().str("w").u64(i).as_bytes(), b"0")?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .await
            .unwrap();
        }
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        assert_eq!(wide(&mut tx).await.unwrap(), 400);
        // The last key of the range is deleted concurrently: a conflict.
        db.transact(|t| {
            Box::pin(async move {
                t.clear(TupleKey::new().str("w").u64(399).as_bytes());
                Ok::<_, StoreError>(())
            })
        })
        .await
        .unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict));
        // The last single key is written concurrently: a conflict.
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        wide(&mut tx).await.unwrap();
        set(&db, TupleKey::new().str("single").u64(299).as_bytes(), b"1")
            .await
            .unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict));
        // Undisturbed, it commits.
        let n = db.transact(wide).await.unwrap();
        assert_eq!(n, 399);
        let copies = db
            .read(|tx| {
                Box::pin(async move {
                    tx.get_prefix(TupleKey::new().str("copy").as_bytes(), 0, false)
                        .await
                })
            })
            .await
            .unwrap();
        assert_eq!(copies.len(), 100);
        // Writes are not split: more than etcd's 128 operations are refused.
        let r: Result<(), StoreError> = db
            .transact(|tx| {
                Box::pin(async move {
                    for i in 0..200u64 {
                        tx.set(TupleKey::new().str("many").u64(i).as_bytes(), b"m")?;
                    }
                    Ok(())
                })
            })
            .await;
        assert_eq!(r, Err(StoreError::TooManyWrites { len: 201, max: 128 }));
    });
}

/// Writes 200 `many` keys.
fn many(tx: &mut Transaction) -> TxFuture<'_, (), StoreError> {
    Box::pin(async move {
        for i in 0..200u64 {
            tx.set(TupleKey::new().str("many").u64(i).as_bytes(), b"m")?;
        }
        Ok(())
    })
}

/// A spec that does not state `max-txn-ops` uses what the cluster takes:
/// `scripts/etcd-cluster` starts members with `--max-txn-ops 1024`, so 201
/// writes commit in one transaction; with `max-txn-ops=128` in the spec the
/// same transaction is refused before anything is sent, nothing written.
#[test]
fn the_txn_size_is_what_the_cluster_takes_unless_the_spec_says() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let count = |db: capstan_cluster::Db| async move {
            db.read(|tx| {
                Box::pin(async move {
                    tx.get_prefix(TupleKey::new().str("many").as_bytes(), 0, false)
                        .await
                })
            })
            .await
            .unwrap()
            .len()
        };
        let stated =
            capstan_cluster::open(&format!("{}&max-txn-ops=128", spec_for(&unique("stated"))))
                .await
                .unwrap();
        assert_eq!(stated.store().max_commit_writes(), 125);
        let r = stated.transact(many).await;
        assert_eq!(r, Err(StoreError::TooManyWrites { len: 201, max: 128 }));
        assert_eq!(count(stated).await, 0);

        let found = capstan_cluster::open(&spec_for(&unique("found")))
            .await
            .unwrap();
        assert_eq!(
            found.store().max_commit_writes(),
            capstan_cluster::etcd_store::PROBED_TXN_OPS - 3,
            "scripts/etcd-cluster starts members with --max-txn-ops 1024"
        );
        found.transact(many).await.unwrap();
        assert_eq!(count(found).await, 200);
    });
}

/// With etcd's default request limit, a 2 MB transaction is refused before
/// anything is sent, with the limit in the error.
#[test]
fn requests_over_the_size_limit_are_refused() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let spec = format!(
            "etcd://{}/capstan-test/{}",
            endpoints().unwrap(),
            unique("size")
        );
        let db = capstan_cluster::open(&spec).await.unwrap();
        let r: Result<(), StoreError> = db
            .transact(|tx| {
                Box::pin(async move {
                    for i in 0..20u64 {
                        tx.set(&i.to_be_bytes(), &vec![7; 100_000])?;
                    }
                    Ok(())
                })
            })
            .await;
        match r {
            Err(StoreError::TransactionTooLarge { len, max }) => {
                assert_eq!(max, DEFAULT_MAX_REQUEST_BYTES);
                assert!(len > 2_000_000, "{len}");
            }
            other => panic!("expected TransactionTooLarge, got {other:?}"),
        }
        assert_eq!(get(&db, &0u64.to_be_bytes()).await.unwrap(), None);
        // Just below the limit goes through.
        db.transact(|tx| {
            Box::pin(async move {
                for i in 0..14u64 {
                    tx.set(&i.to_be_bytes(), &vec![7; 100_000])?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await
        .unwrap();
    });
}

/// A dead first endpoint: the client moves on to the live ones.
#[test]
fn dead_first_endpoint_is_skipped() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let spec = format!(
            "etcd://127.0.0.1:9,{}/capstan-test/{}",
            endpoints().unwrap(),
            unique("dead-first")
        );
        let started = Instant::now();
        let db = capstan_cluster::open(&spec).await.unwrap();
        for i in 0..20u8 {
            set(&db, b"k", &[i]).await.unwrap();
        }
        assert_eq!(get(&db, b"k").await.unwrap(), Some(vec![19]));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    });
}

/// No endpoint answers: a clear error naming them and what to do, quickly.
#[test]
fn unreachable_cluster_fails_clearly() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let started = Instant::now();
        let err = match capstan_cluster::open("etcd://127.0.0.1:9,127.0.0.1:11/x").await {
            Ok(_) => panic!("opened a store on dead endpoints"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("127.0.0.1:9,127.0.0.1:11"), "{err}");
        assert!(err.contains("scripts/etcd-cluster start"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    });
}

/// Direct commits report strictly increasing versions (etcd revisions).
#[test]
fn commit_versions_are_revisions() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("rev")))
            .await
            .unwrap();
        let snap = db.store().snapshot().await.unwrap();
        let v = db
            .store()
            .commit(CommitRequest {
                facts: Default::default(),
                fills: Vec::new(),
                read_version: snap.version(),
                read_conflicts: vec![],
                mutations: vec![Mutation::Set(b"a".to_vec(), b"1".to_vec())],
            })
            .await
            .unwrap();
        assert!(v > snap.version());
        assert!(db.describe().starts_with("etcd://"), "{}", db.describe());
    });
}

/// Latency of sequential read-modify-write transactions (get + set through
/// `Db::transact`: snapshot, read, read-set check, Txn) and of blind writes;
/// printed, with a loose bound.
#[test]
fn commit_latency() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("lat"))).await.unwrap();
        set(&db, b"warm", b"1").await.unwrap();
        let pct = |mut v: Vec<Duration>, p: usize| {
            v.sort();
            v[(v.len() * p / 100).min(v.len() - 1)]
        };
        let mut rmw = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            db.transact(|tx| {
                Box::pin(async move {
                    let n = tx.get(b"counter").await?.map(|v| v.len()).unwrap_or(0);
                    tx.set(b"counter", &vec![1; (n + 1) % 64])
                })
            })
            .await
            .unwrap();
            rmw.push(t.elapsed());
        }
        let mut blind = Vec::new();
        for i in 0..200u64 {
            let t = Instant::now();
            set(&db, &i.to_be_bytes(), b"v").await.unwrap();
            blind.push(t.elapsed());
        }
        eprintln!(
            "etcd commit latency: read-modify-write p50 {:?} p99 {:?}; blind write p50 {:?} p99 {:?}",
            pct(rmw.clone(), 50),
            pct(rmw.clone(), 99),
            pct(blind.clone(), 50),
            pct(blind, 99)
        );
        assert!(pct(rmw, 50) < Duration::from_millis(200));
    });
}

/// A transaction's first attempt reads at the latest revision this client
/// saw (no round trip), which can miss another client's newer commits.
/// What it read counts only if it commits: a read-modify-write that read
/// the old value conflicts and runs again, and an answer without a commit
/// (a read, an error) is worked out again on the latest revision. So a
/// client that saw its own commit moments ago still reads another
/// client's later, acknowledged write.
#[test]
fn a_snapshot_for_commit_never_answers_with_what_it_missed() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let spec = spec_for(&unique("stale"));
        let (a, b) = (
            capstan_cluster::open(&spec).await.unwrap(),
            capstan_cluster::open(&spec).await.unwrap(),
        );
        for round in 0u8..20 {
            // b commits (its latest revision is now fresh), then a writes.
            set(&b, b"b-own", &[round]).await.unwrap();
            set(&a, b"k", &[round]).await.unwrap();
            // read-modify-write through b: must build on a's value
            b.transact(|tx| {
                Box::pin(async move {
                    let v = tx.get(b"k").await?.unwrap_or_default();
                    tx.set(b"copy", &v)?;
                    Ok::<_, StoreError>(())
                })
            })
            .await
            .unwrap();
            assert_eq!(get(&b, b"copy").await.unwrap(), Some(vec![round]));
            // a read-only transaction through b: a's value, not an older one
            set(&b, b"b-own", &[round]).await.unwrap();
            set(&a, b"k", &[round, round]).await.unwrap();
            let seen = b
                .transact(|tx| Box::pin(async move { tx.get(b"k").await }))
                .await
                .unwrap();
            assert_eq!(seen, Some(vec![round, round]), "round {round}");
            // an error decided on a stale read is not returned either
            set(&b, b"b-own", &[round]).await.unwrap();
            let fresh_key = [b"new-".as_slice(), &[round]].concat();
            set(&a, &fresh_key, b"here").await.unwrap();
            let found = b
                .transact(move |tx| {
                    let k = fresh_key.clone();
                    Box::pin(async move {
                        match tx.get(&k).await? {
                            Some(v) => Ok(v),
                            None => Err(StoreError::Io("not there".into())),
                        }
                    })
                })
                .await;
            assert_eq!(found, Ok(b"here".to_vec()), "round {round}");
        }
    });
}

/// What an increment reads besides its counter: nothing, or a listing of
/// the range `L/` (which holds the counter, in those tests), unchecked or
/// checked (a read conflict range that covers the counter's own key).
#[derive(Clone, Copy)]
enum Listing {
    No,
    Unchecked,
    Checked,
}

/// Increments the counter at `key` (read checked, maybe from the cache).
/// With a listing, it also lists the range around it before it writes:
/// unchecked (as a lease renewal lists the members after reading its own
/// record), then reads the key again unchecked; or checked (as a placement
/// claim lists the members after reading the holder's record).
async fn increment(db: &Db, key: &'static [u8], list: Listing) {
    db.transact(move |tx| {
        Box::pin(async move {
            let n = tx
                .get(key)
                .await?
                .map(|v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
                .unwrap_or(0);
            let range = capstan_cluster::RangeOption::new(b"L/".to_vec(), b"L0".to_vec());
            match list {
                Listing::No => {}
                Listing::Unchecked => {
                    let listed = tx.snapshot_range(&range).await?;
                    assert!(listed.len() <= 3);
                    // and the key once more without a check
                    tx.snapshot_get(key).await?;
                }
                Listing::Checked => {
                    let listed = tx.get_range(range).await?;
                    assert!(listed.len() <= 3);
                }
            }
            tx.set(key, &(n + 1).to_be_bytes())?;
            Ok::<_, StoreError>(())
        })
    })
    .await
    .unwrap();
}

/// Two clients of one store increment the counter at `key` 150 times in
/// all: 25 rounds in turn (each writes a key of its own first, so that its
/// snapshot for commit is at a revision after the other's write while its
/// cache still holds the older value), then four tasks at once. Returns the
/// final count and the first client's store counters.
async fn two_clients_count(
    name: &str,
    key: &'static [u8],
    list: Listing,
) -> (u64, std::collections::BTreeMap<&'static str, u64>) {
    let spec = spec_for(&unique(name));
    let (a, b) = (
        capstan_cluster::open(&spec).await.unwrap(),
        capstan_cluster::open(&spec).await.unwrap(),
    );
    for round in 0u8..25 {
        set(&a, b"a-own", &[round]).await.unwrap();
        increment(&a, key, list).await;
        set(&b, b"b-own", &[round]).await.unwrap();
        increment(&b, key, list).await;
    }
    let mut tasks = Vec::new();
    for db in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                increment(&db, key, list).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = get(&a, key).await.unwrap().unwrap();
    let stats = a.store().stats().into_iter().collect();
    (u64::from_be_bytes(n.try_into().unwrap()), stats)
}

/// Each client keeps the values it saw and wrote (`etcd_store::cache`) and
/// answers the first attempt of its transactions from them. Two clients
/// that both read and write one counter have each other's writes missing
/// from their caches all the time: a cached value that reached a commit
/// would lose an increment, so the count shows it.
#[test]
fn cached_values_never_lose_another_clients_update() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (n, stats) = two_clients_count("cache", b"n", Listing::No).await;
        assert_eq!(n, 150);
        assert!(
            stats["cache_hits"] > 0,
            "the cache was never used, so this test checked nothing: {stats:?}"
        );
    });
}

/// A snapshot notes the mod revisions of a short listing's rows, and of
/// unchecked reads, for its commit's compares; a key a checked read already
/// served (maybe an older value from the cache) keeps the revision of the
/// value served, so neither can make a stale read pass the commit: no
/// increment is lost.
#[test]
fn a_listing_never_hides_a_stale_cached_read() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (n, stats) = two_clients_count("listing", b"L/n", Listing::Unchecked).await;
        assert_eq!(n, 150);
        assert!(
            stats["cache_hits"] > 0,
            "the cache was never used, so this test checked nothing: {stats:?}"
        );
    });
}

/// A checked listing whose range holds a key a checked read served (maybe
/// an older value from the cache): the two read ranges merge into one, and
/// the commit still compares that key with the revision of the value
/// served, so no increment is lost. (It compared the range's keys with
/// their revisions at the snapshot only: the stale value passed, and
/// increments were lost.)
#[test]
fn a_checked_listing_around_a_stale_cached_read_loses_nothing() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let (n, stats) = two_clients_count("checked-listing", b"L/n", Listing::Checked).await;
        assert_eq!(n, 150);
        assert!(
            stats["cache_hits"] > 0,
            "the cache was never used, so this test checked nothing: {stats:?}"
        );
    });
}

/// A key a transaction expects to be absent is not read on a first attempt
/// (`Transaction::expect_absent`); when another client created it, the
/// commit must not apply and the retry must read it.
#[test]
fn an_expected_absent_key_that_exists_is_read_on_the_retry() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let spec = spec_for(&unique("absent"));
        let (a, b) = (
            capstan_cluster::open(&spec).await.unwrap(),
            capstan_cluster::open(&spec).await.unwrap(),
        );
        for round in 0u8..10 {
            let slot = [b"slot-".as_slice(), &[round]].concat();
            set(&a, &slot, b"a").await.unwrap();
            // b's latest revision is recent: its next transaction starts on
            // a snapshot for commit, where the assumption is taken
            set(&b, b"b-own", &[round]).await.unwrap();
            let s = slot.clone();
            let seen = b
                .transact(move |tx| {
                    let s = s.clone();
                    Box::pin(async move {
                        tx.expect_absent(&s);
                        let v = tx.get(&s).await?;
                        if v.is_none() {
                            tx.set(&s, b"b")?;
                        }
                        Ok::<_, StoreError>(v)
                    })
                })
                .await
                .unwrap();
            assert_eq!(seen, Some(b"a".to_vec()), "round {round}");
            assert_eq!(get(&a, &slot).await.unwrap(), Some(b"a".to_vec()));
        }
        let stats: std::collections::BTreeMap<_, _> = b.store().stats().into_iter().collect();
        assert!(
            stats["assumed_absent"] > 0,
            "no assumption was ever taken, so this test checked nothing: {stats:?}"
        );
    });
}

/// The reads `db`'s store made so far (each costs etcd a request).
fn reads(db: &Db) -> u64 {
    db.store()
        .stats()
        .into_iter()
        .find(|(k, _)| *k == "reads")
        .map(|(_, v)| v)
        .expect("the etcd store counts its reads")
}

/// A transaction on a remembering snapshot that lists `r/` (whole, or its
/// first `limit` keys, or its last ones) and writes `out`; committed after
/// `meanwhile` ran. Returns the commit's outcome and the reads it made after
/// the listing (0: its compares came from the listing).
async fn list_then_commit(
    db: &Db,
    limit: usize,
    reverse: bool,
    meanwhile: impl std::future::Future<Output = ()>,
) -> (Result<u64, StoreError>, u64) {
    let mut tx = Transaction::new(db.store().snapshot_remembering().await.unwrap());
    let rows = tx.get_prefix(b"r/", limit, reverse).await.unwrap();
    assert!(!rows.is_empty());
    tx.set(b"out", b"x").unwrap();
    meanwhile.await;
    let before = reads(db);
    let r = db.store().commit(tx.into_commit_request().unwrap()).await;
    (r, reads(db) - before)
}

/// A range a transaction listed is compared at commit from the listing's
/// own rows (no second read of its keys), and still conflicts with every
/// change inside what was read: a key deleted, a key added, a value
/// changed; while a change past a limited listing's last row does not.
#[test]
fn a_listed_range_is_compared_from_its_rows_and_still_conflicts() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("listed")))
            .await
            .unwrap();
        for k in [b"r/a", b"r/c", b"r/e", b"r/g"] {
            set(&db, k, b"1").await.unwrap();
        }
        // Nothing changed: commits, with no read after the listing.
        let (r, extra) = list_then_commit(&db, 0, false, async {}).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(extra, 0, "the commit read the listed range again");
        // Each change inside the listed range: a conflict.
        // (what, key, its new value: none for a deletion)
        type Change = (&'static str, &'static [u8], Option<&'static [u8]>);
        let changes: [Change; 3] = [
            ("a key deleted", b"r/c", None),
            ("a key added", b"r/d", Some(b"1")),
            ("a value changed", b"r/e", Some(b"2")),
        ];
        for (what, key, value) in changes {
            let d = db.clone();
            let (r, _) = list_then_commit(&db, 0, false, async move {
                d.transact(move |t| {
                    Box::pin(async move {
                        match value {
                            Some(v) => t.set(key, v)?,
                            None => t.clear(key),
                        }
                        Ok::<_, StoreError>(())
                    })
                })
                .await
                .unwrap();
            })
            .await;
            assert_eq!(r, Err(StoreError::Conflict), "{what} inside the listing");
        }
        // The first two keys (r/a, r/d): a key added after the last row
        // returned is outside what was read; one added before it is not.
        let d = db.clone();
        let (r, extra) = list_then_commit(&db, 2, false, async move {
            set(&d, b"r/f", b"1").await.unwrap();
        })
        .await;
        assert!(r.is_ok(), "a write past the limited listing: {r:?}");
        assert_eq!(extra, 0);
        let d = db.clone();
        let (r, _) = list_then_commit(&db, 2, false, async move {
            set(&d, b"r/b", b"1").await.unwrap();
        })
        .await;
        assert_eq!(
            r,
            Err(StoreError::Conflict),
            "an insert inside the limited listing"
        );
        // The last two keys, listed in reverse (r/f, r/g): the same.
        let d = db.clone();
        let (r, extra) = list_then_commit(&db, 2, true, async move {
            set(&d, b"r/0", b"1").await.unwrap();
        })
        .await;
        assert!(r.is_ok(), "a write before the reverse listing: {r:?}");
        assert_eq!(extra, 0);
        let d = db.clone();
        let (r, _) = list_then_commit(&db, 2, true, async move {
            d.transact(|t| {
                Box::pin(async move {
                    t.clear(b"r/f");
                    Ok::<_, StoreError>(())
                })
            })
            .await
            .unwrap();
        })
        .await;
        assert_eq!(
            r,
            Err(StoreError::Conflict),
            "a delete inside the reverse listing"
        );
    });
}

/// A value a transaction is primed with, as a listing showed it (a guest
/// runner's message), is compared at commit with the revision the listing
/// saw: no read of it at commit, and a conflict when another client
/// changed it since.
#[test]
fn a_primed_value_from_a_listing_is_compared_without_a_read() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let spec = spec_for(&unique("primed"));
        let (a, b) = (
            capstan_cluster::open(&spec).await.unwrap(),
            capstan_cluster::open(&spec).await.unwrap(),
        );
        set(&b, b"p/1", b"first").await.unwrap();
        // `a` lists what `b` wrote (its cache learns the row), then a later
        // transaction of `a` takes the row as listed and commits.
        let primed_commit = |db: Db, value: &'static [u8]| async move {
            let mut tx = Transaction::new(db.store().snapshot_remembering().await.unwrap());
            tx.prime(b"p/1".to_vec(), Some(value.to_vec()));
            assert_eq!(tx.get(b"p/1").await.unwrap(), Some(value.to_vec()));
            tx.set(b"out", value).unwrap();
            let before = reads(&db);
            let r = db.store().commit(tx.into_commit_request().unwrap()).await;
            (r, reads(&db) - before)
        };
        let listed = a
            .store()
            .snapshot()
            .await
            .unwrap()
            .range(&capstan_cluster::RangeOption::new(
                b"p/".to_vec(),
                b"p0".to_vec(),
            ))
            .await
            .unwrap();
        assert_eq!(listed, vec![(b"p/1".to_vec(), b"first".to_vec())]);
        let (r, extra) = primed_commit(a.clone(), b"first").await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(extra, 0, "the commit read the primed key");
        // `b` changes it; `a`'s cache still holds what it listed.
        set(&b, b"p/1", b"second").await.unwrap();
        let (r, _) = primed_commit(a.clone(), b"first").await;
        assert_eq!(r, Err(StoreError::Conflict), "a primed value changed since");
        assert_eq!(get(&a, b"out").await.unwrap(), Some(b"first".to_vec()));
    });
}

/// A store used from a thread with a runtime of its own that ends (as the
/// node's collector runs its passes): every snapshot taken there, even one
/// whose revision read was in flight when that runtime ended, leaves the
/// store serving snapshots to its own runtime. (The revision read shared by
/// concurrent snapshots ran on whichever runtime asked first: when that
/// runtime ended mid-read, every later snapshot of the store waited forever,
/// and `capstan gc` on an etcd cluster hung one run in six.)
#[test]
fn snapshots_outlive_a_runtime_that_asked_for_one() {
    if !etcd_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("runtimes")))
            .await
            .unwrap();
        for round in 0..20 {
            let d = db.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                // Ask for a snapshot and end the runtime while its revision
                // read may still be in flight.
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_micros(200 * (round % 5)),
                        d.store().snapshot(),
                    )
                    .await;
                });
            })
            .join()
            .unwrap();
            tokio::time::timeout(Duration::from_secs(10), db.store().snapshot())
                .await
                .unwrap_or_else(|_| panic!("round {round}: a snapshot waited forever"))
                .unwrap();
        }
    });
}
