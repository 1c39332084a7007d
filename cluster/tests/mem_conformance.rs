//! The backend conformance suite against the in-memory store (`mem:`), and
//! tests of its seeded faults: reproducibility, "maybe committed" outcomes,
//! exactly-once transfers through `Db::transact` under faults, the stopped
//! store, history limits.
//!
//! The suite runs with `process_local`: `durability_across_reopen` and
//! `crash_kill9` need a store that outlives its handle or its process, which an
//! in-memory store cannot (see `capstan_cluster::conformance_tests!`). It runs
//! twice: on a fault-free store, and (module `delayed`) with seeded delays on
//! reads and commits, which change interleavings but must not change outcomes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capstan_cluster::conformance::{get, set};
use capstan_cluster::mem_store::{FaultCounts, Faults, MemStore, PPM};
use capstan_cluster::store::key_after;
use capstan_cluster::tuple::TupleKey;
use capstan_cluster::{CommitRequest, Db, KeyValue, Mutation, RangeOption, Store, StoreError};

async fn open_mem(_dir: PathBuf) -> Result<Db, StoreError> {
    capstan_cluster::open("mem:").await
}

capstan_cluster::conformance_tests!(open_mem, process_local);

/// The suite again, with about one read in 20 and one commit in 10 delayed by up to 1 ms.
mod delayed {
    use super::*;

    async fn open_delayed(_dir: PathBuf) -> Result<Db, StoreError> {
        let faults = Faults {
            read_delay_ppm: 50_000,
            commit_delay_ppm: 100_000,
            max_delay: Duration::from_millis(1),
            ..Faults::seeded(0xDE1A)
        };
        Ok(Db::new(Arc::new(MemStore::with_faults(faults))))
    }

    capstan_cluster::conformance_tests!(open_delayed, process_local);
}

fn everything() -> RangeOption {
    RangeOption::new(Vec::new(), vec![0xFF])
}

fn blind(key: &[u8], value: &[u8]) -> CommitRequest {
    CommitRequest {
        facts: Default::default(),
        fills: Vec::new(),
        read_version: 0,
        read_conflicts: vec![],
        mutations: vec![Mutation::Set(key.to_vec(), value.to_vec())],
    }
}

async fn all_rows(store: &dyn Store) -> Vec<KeyValue> {
    store
        .snapshot()
        .await
        .unwrap()
        .range(&everything())
        .await
        .unwrap()
}

/// A fixed sequence of calls from one task: reads, read-modify-writes (some at
/// stale versions, so some conflict for real) and blind writes. Returns every
/// outcome, the final contents and the injected faults.
async fn scripted_run(seed: u64) -> (Vec<String>, Vec<KeyValue>, FaultCounts) {
    let store = MemStore::with_faults(Faults {
        conflict_ppm: 150_000,
        maybe_committed_ppm: 150_000,
        read_delay_ppm: 30_000,
        commit_delay_ppm: 30_000,
        max_delay: Duration::from_micros(300),
        ..Faults::seeded(seed)
    });
    let mut outcomes = Vec::new();
    let mut versions = std::collections::VecDeque::new();
    for i in 0..300u64 {
        let snap = store.snapshot().await.unwrap();
        versions.push_back(snap.version());
        let key = format!("k{:02}", i % 13).into_bytes();
        let old = snap.get(&key).await.unwrap();
        outcomes.push(format!("read {old:?}"));
        // Every third commit read all the `k` keys three snapshots ago: it
        // conflicts if one of the commits since was applied.
        let (read_version, read) = if i % 3 == 0 {
            (versions[0], (b"k".to_vec(), b"l".to_vec()))
        } else {
            (snap.version(), (key.clone(), key_after(&key)))
        };
        if versions.len() > 3 {
            versions.pop_front();
        }
        let req = CommitRequest {
            facts: Default::default(),
            fills: Vec::new(),
            read_version,
            read_conflicts: vec![read],
            mutations: vec![Mutation::Set(key, i.to_be_bytes().to_vec())],
        };
        outcomes.push(format!("{:?}", store.commit(req).await));
        if i % 7 == 0 {
            let r = store.commit(blind(b"blind", &[1])).await;
            outcomes.push(format!("blind {r:?}"));
        }
    }
    let rows = all_rows(&store).await;
    (outcomes, rows, store.fault_counts())
}

#[tokio::test]
async fn same_seed_same_faults() {
    let (outcomes, rows, counts) = scripted_run(42).await;
    let again = scripted_run(42).await;
    assert!(
        again == (outcomes.clone(), rows.clone(), counts),
        "a second run with seed 42 differs"
    );
    let other = scripted_run(43).await;
    assert_ne!(other.0, outcomes, "seed 43 gave the same outcomes as 42");
    // Every kind of fault happened, and real conflicts too.
    assert!(counts.spurious_conflicts > 0, "{counts:?}");
    assert!(counts.maybe_committed_applied > 0, "{counts:?}");
    assert!(counts.maybe_committed_dropped > 0, "{counts:?}");
    assert!(
        counts.read_delays > 0 && counts.commit_delays > 0,
        "{counts:?}"
    );
    assert!(counts.delayed > Duration::ZERO);
    let conflicts = outcomes.iter().filter(|o| *o == "Err(Conflict)").count() as u64;
    assert!(
        conflicts > counts.spurious_conflicts,
        "{conflicts} conflicts, {} injected: no real one",
        counts.spurious_conflicts
    );
    // Blind writes never conflict, injected or not.
    assert!(!outcomes.contains(&"blind Err(Conflict)".to_string()));
    assert!(outcomes.iter().any(|o| o.starts_with("blind Ok")));
    assert_eq!(counts.refused_while_stopped, 0);
}

#[tokio::test]
async fn maybe_committed_is_sometimes_applied_sometimes_not() {
    let store = MemStore::with_faults(Faults {
        maybe_committed_ppm: PPM,
        ..Faults::seeded(5)
    });
    for i in 0..100u32 {
        let r = store.commit(blind(&i.to_be_bytes(), b"v")).await;
        assert_eq!(r, Err(StoreError::MaybeCommitted));
    }
    let applied = all_rows(&store).await.len() as u64;
    let counts = store.fault_counts();
    assert!(0 < applied && applied < 100, "{applied} of 100 applied");
    assert_eq!(counts.maybe_committed_applied, applied, "{counts:?}");
    assert_eq!(counts.maybe_committed_dropped, 100 - applied, "{counts:?}");
    // A commit that really conflicts is never applied, whatever the seed says.
    for i in 0..50u32 {
        let r = store
            .commit(CommitRequest {
                facts: Default::default(),
                fills: Vec::new(),
                read_version: 0,
                read_conflicts: vec![(Vec::new(), vec![0xFF])],
                mutations: vec![Mutation::Set(b"stale".to_vec(), i.to_be_bytes().to_vec())],
            })
            .await;
        assert_eq!(r, Err(StoreError::MaybeCommitted));
    }
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.get(b"stale").await.unwrap(), None);
    assert_eq!(
        store.fault_counts().maybe_committed_dropped,
        counts.maybe_committed_dropped + 50
    );
}

/// Without an idempotency key, `Db::transact` applies a "maybe committed" but
/// applied transaction again: the faults are real, and the reason transfers
/// carry a request id.
#[tokio::test]
async fn maybe_committed_doubles_non_idempotent_transactions() {
    let store = Arc::new(MemStore::with_faults(Faults {
        maybe_committed_ppm: 300_000,
        ..Faults::seeded(11)
    }));
    let db = Db::new(store.clone());
    for _ in 0..100 {
        db.transact(|tx| {
            Box::pin(async move {
                let n = tx
                    .get(b"counter")
                    .await?
                    .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                tx.set(b"counter", &(n + 1).to_be_bytes())
            })
        })
        .await
        .unwrap();
    }
    let n = u64::from_be_bytes(
        get(&db, b"counter")
            .await
            .unwrap()
            .unwrap()
            .try_into()
            .unwrap(),
    );
    let counts = store.fault_counts();
    assert!(counts.maybe_committed_applied > 0, "{counts:?}");
    assert_eq!(n, 100 + counts.maybe_committed_applied, "{counts:?}");
}

fn account(a: u64) -> Vec<u8> {
    TupleKey::new().str("acct").u64(a).into_vec()
}

fn done_key(task: u64, i: u64) -> Vec<u8> {
    TupleKey::new().str("done").u64(task).u64(i).into_vec()
}

fn balance(v: Option<Vec<u8>>) -> Result<u64, StoreError> {
    let v = v.ok_or_else(|| StoreError::Io("missing account".into()))?;
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Io("balance is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Tasks move units between accounts through `Db::transact` while the store
/// injects conflicts, "maybe committed" outcomes and delays. Each transfer
/// records itself under its own id in the same transaction and does nothing if
/// that record exists. The total is conserved, every acknowledged transfer is
/// recorded, and the balances are exactly the initial ones plus the recorded
/// transfers (a transfer applied twice, or applied without its record, would
/// show); every "maybe committed" transfer that had been applied was seen as
/// done by its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_apply_exactly_once_under_faults() {
    const ACCOUNTS: u64 = 6;
    const INITIAL: u64 = 1_000;
    const TASKS: u64 = 8;
    const TRANSFERS: u64 = 40;
    let store = Arc::new(MemStore::with_faults(Faults {
        conflict_ppm: 100_000,
        maybe_committed_ppm: 150_000,
        read_delay_ppm: 20_000,
        commit_delay_ppm: 50_000,
        max_delay: Duration::from_micros(500),
        ..Faults::seeded(0xBA4C)
    }));
    let db = Db::new(store.clone()).with_max_attempts(1_000);
    db.transact(|tx| {
        Box::pin(async move {
            for a in 0..ACCOUNTS {
                if tx.get(&account(a)).await?.is_none() {
                    tx.set(&account(a), &INITIAL.to_be_bytes())?;
                }
            }
            Ok::<_, StoreError>(())
        })
    })
    .await
    .unwrap();
    let applied_before = store.fault_counts().maybe_committed_applied;
    let replays = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (db, replays) = (db.clone(), replays.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..TRANSFERS {
                let from = (t * 7 + i * 3) % ACCOUNTS;
                let to = (from + 1 + i % (ACCOUNTS - 1)) % ACCOUNTS;
                let amount = 1 + (t * 13 + i * 5) % 300;
                let replays = replays.clone();
                let outcome = db
                    .transact(move |tx| {
                        let replays = replays.clone();
                        Box::pin(async move {
                            let done = done_key(t, i);
                            if tx.get(&done).await?.is_some() {
                                replays.fetch_add(1, Ordering::Relaxed);
                                return Ok(());
                            }
                            let fb = balance(tx.get(&account(from)).await?)?;
                            let tb = balance(tx.get(&account(to)).await?)?;
                            let moved = amount.min(fb);
                            tx.set(&account(from), &(fb - moved).to_be_bytes())?;
                            tx.set(&account(to), &(tb + moved).to_be_bytes())?;
                            let record = [from, to, moved].map(u64::to_be_bytes).concat();
                            tx.set(&done, &record)
                        })
                    })
                    .await;
                match outcome {
                    Ok(()) => acked.push(i),
                    Err(e) => panic!("transfer {t}/{i} failed: {e}"),
                }
            }
            (t, acked)
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        let (t, done) = task.await.unwrap();
        acked.extend(done.into_iter().map(|i| (t, i)));
    }
    assert_eq!(acked.len() as u64, TASKS * TRANSFERS);

    let rows = all_rows(store.as_ref()).await;
    let balances: Vec<u64> = (0..ACCOUNTS)
        .map(|a| {
            let k = account(a);
            let v = rows
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone());
            balance(v).unwrap()
        })
        .collect();
    assert_eq!(
        balances.iter().sum::<u64>(),
        ACCOUNTS * INITIAL,
        "total not conserved: {balances:?}"
    );
    let done_prefix = TupleKey::new().str("done").into_vec();
    let records: Vec<&KeyValue> = rows
        .iter()
        .filter(|(k, _)| k.starts_with(&done_prefix))
        .collect();
    for (t, i) in &acked {
        assert!(
            records.iter().any(|(k, _)| *k == done_key(*t, *i)),
            "acknowledged transfer {t}/{i} has no record"
        );
    }
    assert_eq!(records.len(), acked.len(), "records of unknown transfers");
    let mut expected = vec![INITIAL as i64; ACCOUNTS as usize];
    for (_, record) in &records {
        let field = |n: usize| u64::from_be_bytes(record[n * 8..n * 8 + 8].try_into().unwrap());
        let (from, to, moved) = (field(0) as usize, field(1) as usize, field(2) as i64);
        expected[from] -= moved;
        expected[to] += moved;
    }
    let actual: Vec<i64> = balances.iter().map(|b| *b as i64).collect();
    assert_eq!(
        actual, expected,
        "balances differ from the recorded transfers"
    );

    let counts = store.fault_counts();
    assert!(counts.spurious_conflicts > 0, "{counts:?}");
    assert!(counts.maybe_committed_dropped > 0, "{counts:?}");
    assert!(
        counts.maybe_committed_applied > applied_before,
        "{counts:?}"
    );
    assert_eq!(
        replays.load(Ordering::Relaxed),
        counts.maybe_committed_applied - applied_before,
        "every applied 'maybe committed' transfer is found done by its retry, once: {counts:?}"
    );
}

#[tokio::test]
async fn stopped_store_fails_every_call_and_recovers() {
    let store = Arc::new(MemStore::new());
    let db = Db::new(store.clone());
    set(&db, b"k", b"before").await.unwrap();
    let snap = store.snapshot().await.unwrap();
    store.stop();
    assert!(store.is_stopped());
    let unreachable = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Io(msg)) => assert!(msg.contains("stopped"), "{what}: {msg}"),
        other => panic!("{what} while stopped: {other:?}"),
    };
    unreachable(store.snapshot().await.map(drop), "snapshot");
    unreachable(snap.get(b"k").await.map(drop), "get");
    unreachable(snap.range(&everything()).await.map(drop), "range");
    unreachable(
        store.commit(blind(b"k", b"while stopped")).await.map(drop),
        "commit",
    );
    // Not retryable: `transact` gives up at once, with the same error.
    unreachable(set(&db, b"k", b"while stopped").await, "transact");
    unreachable(get(&db, b"k").await.map(drop), "read");
    assert_eq!(store.fault_counts().refused_while_stopped, 6);
    assert!(!StoreError::Io(String::new()).is_retryable());

    store.start();
    assert!(!store.is_stopped());
    assert_eq!(
        snap.get(b"k").await.unwrap(),
        Some(b"before".to_vec()),
        "a snapshot taken before the stop reads again"
    );
    assert_eq!(get(&db, b"k").await.unwrap(), Some(b"before".to_vec()));
    set(&db, b"k", b"after").await.unwrap();
    assert_eq!(get(&db, b"k").await.unwrap(), Some(b"after".to_vec()));
    assert_eq!(store.fault_counts().refused_while_stopped, 6);
}

/// A call delayed across `stop` fails when it resumes.
#[tokio::test]
async fn stop_during_a_delay_fails_the_call() {
    let store = Arc::new(MemStore::with_faults(Faults {
        commit_delay_ppm: PPM,
        max_delay: Duration::from_millis(3),
        ..Faults::seeded(1)
    }));
    let commit = {
        let store = store.clone();
        tokio::spawn(async move { store.commit(blind(b"k", b"v")).await })
    };
    tokio::task::yield_now().await;
    store.stop();
    let r = commit.await.unwrap();
    assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
    let counts = store.fault_counts();
    assert_eq!(
        (counts.commit_delays, counts.refused_while_stopped),
        (1, 1),
        "the commit was refused after its delay: {counts:?}"
    );
    store.start();
    assert!(all_rows(store.as_ref()).await.is_empty(), "nothing applied");
}

#[tokio::test]
async fn delays_take_the_time_they_count() {
    let store = MemStore::with_faults(Faults {
        read_delay_ppm: PPM,
        max_delay: Duration::from_millis(2),
        ..Faults::seeded(3)
    });
    let started = tokio::time::Instant::now();
    for _ in 0..5 {
        store.snapshot().await.unwrap();
    }
    let counts = store.fault_counts();
    assert_eq!(counts.read_delays, 5);
    assert_eq!(counts.commit_delays, 0);
    assert!(
        started.elapsed() >= counts.delayed,
        "{:?} elapsed, {:?} injected",
        started.elapsed(),
        counts.delayed
    );
}

/// Old snapshots read their version; one older than the history window fails
/// with `Conflict` (FoundationDB's transaction_too_old), and so does a commit
/// that read at a version older than the write log. Memory stays bounded.
#[tokio::test]
async fn history_window_bounds_old_snapshots_and_memory() {
    let store = MemStore::new().with_history_window(10);
    store.commit(blind(b"a", b"0")).await.unwrap();
    store.commit(blind(b"b", b"0")).await.unwrap();
    let old = store.snapshot().await.unwrap();
    let v = old.version();
    store
        .commit(CommitRequest {
            facts: Default::default(),
            fills: Vec::new(),
            read_version: v,
            read_conflicts: vec![],
            mutations: vec![Mutation::ClearRange(b"a".to_vec(), b"c".to_vec())],
        })
        .await
        .unwrap();
    for i in 1..10u8 {
        store.commit(blind(b"a", &[i])).await.unwrap();
    }
    // Ten commits since: still readable, at its own version.
    assert_eq!(old.get(b"a").await.unwrap(), Some(b"0".to_vec()));
    assert_eq!(old.range(&everything()).await.unwrap().len(), 2);
    assert_eq!(store.history_stats().oldest_readable, v);
    let read_b = |rv| CommitRequest {
        facts: Default::default(),
        fills: Vec::new(),
        read_version: rv,
        read_conflicts: vec![(b"b".to_vec(), b"b\0".to_vec())],
        mutations: vec![Mutation::Set(b"c".to_vec(), vec![])],
    };
    assert_eq!(
        store.commit(read_b(v)).await,
        Err(StoreError::Conflict),
        "b was cleared since"
    );
    // One commit more: too old.
    store.commit(blind(b"a", b"x")).await.unwrap();
    assert_eq!(old.get(b"a").await, Err(StoreError::Conflict));
    assert_eq!(old.range(&everything()).await, Err(StoreError::Conflict));
    // The same request, now older than the write log, conflicts; a blind one does not.
    assert_eq!(store.commit(read_b(v - 1)).await, Err(StoreError::Conflict));
    let mut blind_old = blind(b"d", b"");
    blind_old.read_version = v - 1;
    store.commit(blind_old).await.unwrap();
    drop(old);

    for i in 0..1_000u32 {
        store
            .commit(blind(&[b'k', (i % 10) as u8], &i.to_be_bytes()))
            .await
            .unwrap();
    }
    let stats = store.history_stats();
    assert_eq!(stats.live_snapshots, 0);
    assert_eq!(stats.oldest_readable, stats.version, "{stats:?}");
    assert!(stats.log_ranges <= 10, "{stats:?}");
    // k0..k9, a, d: one version each (b's tombstone is gone).
    assert_eq!((stats.keys, stats.versions), (12, 12), "{stats:?}");
}

#[tokio::test]
async fn open_mem_is_fresh_and_fault_free() {
    let a = capstan_cluster::open("mem:").await.unwrap();
    let b = capstan_cluster::open("mem:").await.unwrap();
    assert_eq!(a.describe(), "mem:");
    set(&a, b"k", b"v").await.unwrap();
    assert_eq!(
        get(&b, b"k").await.unwrap(),
        None,
        "two mem: stores share data"
    );
    let Err(e) = capstan_cluster::open("mem:shared").await else {
        panic!("mem:shared opened");
    };
    assert!(e.to_string().contains("redb:mem:shared"), "{e}");
    let faulty = MemStore::with_faults(Faults {
        conflict_ppm: 1,
        ..Faults::seeded(9)
    });
    assert_eq!(faulty.describe(), "mem: (seeded faults, seed 9)");
    assert_eq!(MemStore::new().faults(), Faults::none());
}
