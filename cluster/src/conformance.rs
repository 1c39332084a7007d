//! Backend conformance suite, written once and run against every backend.
//!
//! Each check is a public async function taking a [`Db`] (or, where the store
//! must be reopened, a factory `Fn(PathBuf) -> Future<Output = Result<Db, _>>`
//! that opens the store living in a scratch directory: the same directory opens
//! the same store again). [`conformance_tests!`](crate::conformance_tests) expands
//! to one `#[test]` per check, each on a fresh scratch directory and a
//! multi-threaded tokio runtime:
//!
//! ```ignore
//! capstan_cluster::conformance_tests!(|dir: std::path::PathBuf| async move {
//!     capstan_cluster::open(&format!("redb:{}", dir.join("store.redb").display())).await
//! });
//! ```
//!
//! The crash check ([`crash_test`]) re-executes the test binary itself as a child
//! process (selected by the environment variable [`CRASH_CHILD_ENV`]) that commits
//! from many tasks and prints one line per acknowledged commit; the parent kills
//! it with SIGKILL, reopens the store and checks that every acknowledged commit
//! is there.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::blob::{self, MAX_BLOB_SIZE};
use crate::store::{CommitRequest, MAX_KEY_SIZE, MAX_VALUE_SIZE, Mutation, RangeOption};
use crate::tuple::{TupleKey, TupleReader};
use crate::{Db, KeyValue, StoreError};

/// A failed conformance check: what was expected and what happened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailure(pub String);

impl From<StoreError> for CheckFailure {
    fn from(e: StoreError) -> Self {
        CheckFailure(format!("unexpected store error: {e}"))
    }
}

impl From<std::io::Error> for CheckFailure {
    fn from(e: std::io::Error) -> Self {
        CheckFailure(format!("I/O error: {e}"))
    }
}

/// Outcome of a check.
pub type CheckResult = Result<(), CheckFailure>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(CheckFailure(format!($($fmt)+)));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(CheckFailure(format!("{}: {:?} != {:?}", format!($($fmt)+), l, r)));
        }
    };
}

/// Environment variable that turns the crash test into the crash child; its value is the store directory.
pub const CRASH_CHILD_ENV: &str = "CAPSTAN_CONFORMANCE_CRASH_CHILD";

/// Expands to one `#[test]` per conformance check, for a backend given by a
/// factory expression `Fn(PathBuf) -> impl Future<Output = Result<Db, StoreError>>`
/// (called with a scratch directory; the same directory must reopen the same store:
/// a network store derives its key prefix from the directory's name).
///
/// With `enabled: EXPR` (an expression of type `fn() -> bool`), each test first
/// calls it and returns at once (passes, skipped) when it says `false`: for
/// backends that need a server the environment may not have.
///
/// With `process_local` (`conformance_tests!(factory, process_local)`), for a
/// store that lives only inside the test process ([`crate::mem_store`]): every
/// check runs except the two that need the store to outlive its handle or its
/// process, which such a store cannot do by design, so they are not generated:
/// `durability_across_reopen` (the factory opens the directory again after the
/// first handle is dropped: an in-memory store is gone with it, and handing back
/// the same live instance would test nothing) and `crash_kill9` (a child process
/// commits and is killed, then the parent opens the store: the child's memory
/// died with it). The other forms are unchanged and still generate both.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!($factory, enabled: || true);
    };
    ($factory:expr, enabled: $enabled:expr) => {
        $crate::__conformance_checks!($factory, $enabled);

        #[test]
        fn durability_across_reopen() {
            if !($enabled)() {
                return;
            }
            $crate::conformance::run("durability_across_reopen", |dir| {
                $crate::conformance::durability_across_reopen($factory, dir)
            });
        }

        #[test]
        fn crash_kill9() {
            if !($enabled)() {
                return;
            }
            let name = $crate::conformance::test_name(module_path!(), "crash_kill9");
            $crate::conformance::crash_test($factory, &name);
        }
    };
    ($factory:expr, process_local) => {
        $crate::__conformance_checks!($factory, || true);
    };
}

/// The checks that run on one store handle (every form of [`conformance_tests!`](crate::conformance_tests)).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checks {
    ($factory:expr, $enabled:expr) => {
        $crate::__conformance_check!($factory, $enabled, basics);
        $crate::__conformance_check!($factory, $enabled, read_your_writes);
        $crate::__conformance_check!($factory, $enabled, atomicity_on_error);
        $crate::__conformance_check!($factory, $enabled, atomicity_seen_by_concurrent_readers);
        $crate::__conformance_check!($factory, $enabled, isolation_counter);
        $crate::__conformance_check!($factory, $enabled, write_skew_prevented);
        $crate::__conformance_check!($factory, $enabled, commit_conflicts);
        $crate::__conformance_check!($factory, $enabled, range_order);
        $crate::__conformance_check!($factory, $enabled, limits);
        $crate::__conformance_check!($factory, $enabled, blobs);
        $crate::__conformance_check!($factory, $enabled, versions_increase);
        $crate::__conformance_check!(
            $factory,
            $enabled,
            batches_never_merge_conflicting_transactions
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_check {
    ($factory:expr, $enabled:expr, $check:ident) => {
        #[test]
        fn $check() {
            if !($enabled)() {
                return;
            }
            $crate::conformance::run(stringify!($check), |dir| async move {
                let db = ($factory)(dir).await?;
                $crate::conformance::$check(&db).await
            });
        }
    };
}

/// The etcd endpoints the etcd tests use (`CAPSTAN_ETCD_ENDPOINTS`,
/// comma-separated `HOST:PORT`, as `scripts/etcd-cluster start` prints
/// them), or `None`: the test passes as skipped, unless
/// `CAPSTAN_REQUIRE_ETCD=1`, which makes it fail.
pub fn etcd_endpoints() -> Option<String> {
    const ENV: &str = "CAPSTAN_ETCD_ENDPOINTS";
    match std::env::var(ENV) {
        Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => {
            if std::env::var("CAPSTAN_REQUIRE_ETCD").as_deref() == Ok("1") {
                panic!(
                    "CAPSTAN_REQUIRE_ETCD=1 but {ENV} is not set: run scripts/etcd-cluster start and export {ENV}=<the endpoints it prints>"
                );
            }
            eprintln!("skipped: set {ENV} (scripts/etcd-cluster start)");
            None
        }
    }
}

/// The name libtest knows a test by: `module_path!()` without the crate name, then `test`.
pub fn test_name(module_path: &str, test: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{test}"),
        None => test.to_string(),
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh, unique directory whose name contains `tag`.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "capstan-{tag}-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The runtime the checks (and backend-specific tests) run on: two workers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime for a conformance check")
}

/// Runs `check` on a fresh scratch directory in a multi-threaded runtime; panics
/// (fails the test) with the check's message if it fails.
pub fn run<C, Fut>(name: &str, check: C)
where
    C: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = CheckResult>,
{
    let dir = ScratchDir::new(name).expect("creating a scratch directory");
    let outcome = runtime().block_on(check(dir.path().to_path_buf()));
    if let Err(e) = outcome {
        panic!("conformance check `{name}` failed: {e}");
    }
}

// ---------------------------------------------------------------- helpers

/// Reads `key` in its own read-only transaction (also used by backend-specific tests).
pub async fn get(db: &Db, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let key = key.to_vec();
    db.read(move |tx| Box::pin(async move { tx.get(&key).await }))
        .await
}

/// Writes `key` in its own transaction (also used by backend-specific tests).
pub async fn set(db: &Db, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    let (key, value) = (key.to_vec(), value.to_vec());
    db.transact(move |tx| {
        let (key, value) = (key.clone(), value.clone());
        Box::pin(async move { tx.set(&key, &value) })
    })
    .await
}

async fn prefix(db: &Db, p: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
    let p = p.to_vec();
    db.read(move |tx| Box::pin(async move { tx.get_prefix(&p, 0, false).await }))
        .await
}

async fn read_version(db: &Db) -> Result<u64, StoreError> {
    db.read(|tx| Box::pin(async move { Ok(tx.read_version()) }))
        .await
}

fn keys(rows: &[KeyValue]) -> Vec<Vec<u8>> {
    rows.iter().map(|(k, _)| k.clone()).collect()
}

fn bkeys(ks: &[&[u8]]) -> Vec<Vec<u8>> {
    ks.iter().map(|k| k.to_vec()).collect()
}

/// Deterministic pseudo-random bytes.
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A name no other test run has used: `tag`, this process and a clock
/// reading (for key prefixes of tests that share one store).
pub fn unique(tag: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Adds one to the 8-byte counter at `key`, in a transaction of its own.
pub async fn increment(db: &Db, key: &'static [u8]) -> Result<(), StoreError> {
    db.transact(move |tx| {
        Box::pin(async move {
            let n = counter_value(tx.get(key).await?)?;
            tx.set(key, &(n + 1).to_be_bytes())
        })
    })
    .await
}

/// The 8-byte counter at `key` (0 when absent).
pub async fn counter(db: &Db, key: &[u8]) -> Result<u64, StoreError> {
    counter_value(get(db, key).await?)
}

fn counter_value(v: Option<Vec<u8>>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(b) => b
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Io("counter is not 8 bytes".into())),
    }
}

// ----------------------------------------------------------------- checks

/// get / set / clear of single keys, and overwrite.
pub async fn basics(db: &Db) -> CheckResult {
    ensure_eq!(get(db, b"basics/k").await?, None, "absent key");
    set(db, b"basics/k", b"v1").await?;
    ensure_eq!(
        get(db, b"basics/k").await?,
        Some(b"v1".to_vec()),
        "after set"
    );
    set(db, b"basics/k", b"v2").await?;
    ensure_eq!(
        get(db, b"basics/k").await?,
        Some(b"v2".to_vec()),
        "after overwrite"
    );
    set(db, b"basics/empty", b"").await?;
    ensure_eq!(
        get(db, b"basics/empty").await?,
        Some(vec![]),
        "empty value is a value"
    );
    set(db, b"", b"empty key").await?;
    ensure_eq!(
        get(db, b"").await?,
        Some(b"empty key".to_vec()),
        "empty key"
    );
    db.transact(|tx| {
        Box::pin(async move {
            tx.clear(b"basics/k");
            tx.clear(b"basics/never-set");
            tx.clear(b"");
            Ok::<_, StoreError>(())
        })
    })
    .await?;
    ensure_eq!(get(db, b"basics/k").await?, None, "after clear");
    ensure_eq!(get(db, b"").await?, None, "empty key after clear");
    ensure_eq!(
        keys(&prefix(db, b"basics/").await?),
        bkeys(&[b"basics/empty"]),
        "remaining keys"
    );
    // A value returned from the closure comes back.
    let got = db
        .transact(|tx| {
            Box::pin(async move {
                tx.set(b"basics/n", b"1")?;
                Ok::<_, StoreError>(42)
            })
        })
        .await?;
    ensure_eq!(got, 42, "transact returns the closure's value");
    Ok(())
}

/// A transaction sees its own sets and clears, in gets and in range reads
/// (with limits and reverse), and commits exactly what it saw.
pub async fn read_your_writes(db: &Db) -> CheckResult {
    db.transact(|tx| {
        Box::pin(async move {
            for k in [b"ryw/a", b"ryw/b", b"ryw/c", b"ryw/d", b"ryw/e", b"ryw/f"] {
                tx.set(k, b"old")?;
            }
            Ok::<_, StoreError>(())
        })
    })
    .await?;
    let seen = db
        .transact(|tx| {
            Box::pin(async move {
                tx.set(b"ryw/a", b"new")?;
                tx.clear(b"ryw/b");
                tx.clear_range(b"ryw/c", b"ryw/f");
                tx.set(b"ryw/d", b"again")?;
                tx.set(b"ryw/z", b"added")?;
                let mut checks = Vec::new();
                checks.push(tx.get(b"ryw/a").await? == Some(b"new".to_vec()));
                checks.push(tx.get(b"ryw/b").await?.is_none());
                checks.push(tx.get(b"ryw/c").await?.is_none());
                checks.push(tx.get(b"ryw/d").await? == Some(b"again".to_vec()));
                checks.push(tx.get(b"ryw/e").await?.is_none());
                checks.push(tx.get(b"ryw/f").await? == Some(b"old".to_vec()));
                let all = tx.get_prefix(b"ryw/", 0, false).await?;
                let first2 = tx.get_prefix(b"ryw/", 2, false).await?;
                let last2 = tx.get_prefix(b"ryw/", 2, true).await?;
                let mid = tx
                    .get_range(RangeOption::new(b"ryw/b".to_vec(), b"ryw/g".to_vec()))
                    .await?;
                Ok::<_, StoreError>((checks, all, first2, last2, mid))
            })
        })
        .await?;
    let (checks, all, first2, last2, mid) = seen;
    ensure!(
        checks.iter().all(|c| *c),
        "gets inside the transaction: {checks:?}"
    );
    let expect_all: Vec<KeyValue> = vec![
        (b"ryw/a".to_vec(), b"new".to_vec()),
        (b"ryw/d".to_vec(), b"again".to_vec()),
        (b"ryw/f".to_vec(), b"old".to_vec()),
        (b"ryw/z".to_vec(), b"added".to_vec()),
    ];
    ensure_eq!(all, expect_all, "prefix read inside the transaction");
    ensure_eq!(keys(&first2), bkeys(&[b"ryw/a", b"ryw/d"]), "limit 2");
    ensure_eq!(
        keys(&last2),
        bkeys(&[b"ryw/z", b"ryw/f"]),
        "reverse limit 2"
    );
    ensure_eq!(keys(&mid), bkeys(&[b"ryw/d", b"ryw/f"]), "range [b, g)");
    ensure_eq!(
        prefix(db, b"ryw/").await?,
        expect_all,
        "committed state = what the transaction saw"
    );
    Ok(())
}

/// A closure that fails after writing commits nothing; nor does a failed set.
pub async fn atomicity_on_error(db: &Db) -> CheckResult {
    let r: Result<(), StoreError> = db
        .transact(|tx| {
            Box::pin(async move {
                tx.set(b"atom/x", b"1")?;
                tx.set(b"atom/y", b"2")?;
                tx.clear_range(b"atom/", b"atom0");
                Err(StoreError::Io("the closure failed".into()))
            })
        })
        .await;
    ensure_eq!(
        r,
        Err(StoreError::Io("the closure failed".into())),
        "closure error returned"
    );
    ensure!(
        prefix(db, b"atom/").await?.is_empty(),
        "nothing written by a failed closure"
    );
    Ok(())
}

/// Multi-key commits are all-or-nothing as seen by concurrent readers.
pub async fn atomicity_seen_by_concurrent_readers(db: &Db) -> CheckResult {
    const KEYS: u64 = 10;
    const ROUNDS: u64 = 40;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for round in 1..=ROUNDS {
                db.transact(move |tx| {
                    Box::pin(async move {
                        for k in 0..KEYS {
                            tx.set(
                                TupleKey::new().str("atomr").u64(k).as_bytes(),
                                &round.to_be_bytes(),
                            )?;
                        }
                        Ok::<_, StoreError>(())
                    })
                })
                .await?;
            }
            Ok::<_, StoreError>(())
        })
    };
    let mut readers = Vec::new();
    for _ in 0..3 {
        let db = db.clone();
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            let mut observed = 0u64;
            while !done.load(Ordering::Relaxed) {
                let rows = db
                    .read(|tx| {
                        Box::pin(async move {
                            tx.get_prefix(TupleKey::new().str("atomr").as_bytes(), 0, false)
                                .await
                        })
                    })
                    .await?;
                let values: Vec<&Vec<u8>> = rows.iter().map(|(_, v)| v).collect();
                if !(rows.is_empty()
                    || (rows.len() as u64 == KEYS && values.iter().all(|v| *v == values[0])))
                {
                    return Ok(Err(format!(
                        "torn read: {} keys, values {values:?}",
                        rows.len()
                    )));
                }
                observed += 1;
                tokio::task::yield_now().await;
            }
            Ok::<_, StoreError>(Ok(observed))
        }));
    }
    let written = writer
        .await
        .map_err(|e| CheckFailure(format!("writer panicked: {e}")))?;
    done.store(true, Ordering::Relaxed);
    written?;
    for r in readers {
        let seen = r
            .await
            .map_err(|e| CheckFailure(format!("reader panicked: {e}")))??;
        seen.map_err(CheckFailure)?;
    }
    let rows = prefix(db, TupleKey::new().str("atomr").as_bytes()).await?;
    ensure!(
        rows.len() as u64 == KEYS && rows.iter().all(|(_, v)| *v == ROUNDS.to_be_bytes()),
        "final state: {rows:?}"
    );
    Ok(())
}

/// Concurrent read-modify-write increments of one key lose no update.
pub async fn isolation_counter(db: &Db) -> CheckResult {
    const TASKS: u64 = 8;
    const EACH: u64 = 25;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                increment(&db, b"counter").await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| CheckFailure(format!("task panicked: {e}")))??;
    }
    let n = counter(db, b"counter").await?;
    ensure_eq!(
        n,
        TASKS * EACH,
        "counter after {TASKS} tasks x {EACH} increments (lost updates?)"
    );
    Ok(())
}

/// Write skew is prevented: two doctors on call (`a = b = 1`), each transaction
/// goes off call (sets its own key to 0) only if both are on call (`a + b >= 2`).
/// Both read before either commits. Under snapshot isolation both would commit
/// (`a + b = 0`); under serializability one retries, sees `a + b = 1` and stays,
/// so the invariant `a + b >= 1` holds.
pub async fn write_skew_prevented(db: &Db) -> CheckResult {
    for round in 0..5u64 {
        let a = TupleKey::new().str("skew").u64(round).str("a").into_vec();
        let b = TupleKey::new().str("skew").u64(round).str("b").into_vec();
        set(db, &a, &[1]).await?;
        set(db, &b, &[1]).await?;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        // Set when the two never had both read before either committed (the
        // backend serialised them): then write skew was not tested at all.
        let missed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for mine in [a.clone(), b.clone()] {
            let (db, a, b, barrier, missed) = (
                db.clone(),
                a.clone(),
                b.clone(),
                barrier.clone(),
                missed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                db.transact(move |tx| {
                    let wait = std::mem::replace(&mut first, false);
                    let (a, b, mine, barrier, missed) = (
                        a.clone(),
                        b.clone(),
                        mine.clone(),
                        barrier.clone(),
                        missed.clone(),
                    );
                    Box::pin(async move {
                        let va = tx.get(&a).await?.map_or(0, |v| v[0]);
                        let vb = tx.get(&b).await?.map_or(0, |v| v[0]);
                        if wait {
                            // Both have read before either commits (bounded, in case the other failed).
                            if tokio::time::timeout(Duration::from_secs(5), barrier.wait())
                                .await
                                .is_err()
                            {
                                missed.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        if va + vb >= 2 {
                            tx.set(&mine, &[0])?;
                        }
                        Ok::<_, StoreError>(())
                    })
                })
                .await
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| CheckFailure(format!("task panicked: {e}")))??;
        }
        ensure!(
            !missed.load(std::sync::atomic::Ordering::Relaxed),
            "round {round}: the two transactions never both read before either committed, so write skew was not tested"
        );
        let va = get(db, &a).await?.map_or(0, |v| v[0]);
        let vb = get(db, &b).await?.map_or(0, |v| v[0]);
        ensure_eq!(va + vb, 1, "round {round}: a + b (0 means write skew)");
    }
    Ok(())
}

/// Many commits at once from one snapshot, in the shapes a backend that
/// groups concurrent commits (etcd's batches, redb's group commit) must keep
/// apart: for each `i`, A writes `z_i`; B read `z_i` and writes `w_i`; C read
/// `x_i` and writes `y_i`; D read `y_i` and writes `x_i` (write skew). All
/// read at the same version, so B may commit only before A or with it (a
/// group committed at one version is serialized in some order inside it: B
/// first did not miss A's write), never after it; and C and D, which each
/// read what the other writes, never both.
pub async fn batches_never_merge_conflicting_transactions(db: &Db) -> CheckResult {
    const PAIRS: usize = 48;
    let store = db.store();
    let key = |what: &str, i: usize| format!("bm/{what}/{i:03}").into_bytes();
    let snap = store.snapshot().await?;
    let rv = snap.version();
    let req = |read: Option<Vec<u8>>, write: Vec<u8>| CommitRequest {
        facts: Default::default(),
        fills: Vec::new(),
        read_version: rv,
        read_conflicts: read
            .map(|k| vec![(k.clone(), crate::store::key_after(&k))])
            .unwrap_or_default(),
        mutations: vec![Mutation::Set(write, b"1".to_vec())],
    };
    let mut commits = Vec::new();
    for i in 0..PAIRS {
        commits.push(req(None, key("z", i)));
        commits.push(req(Some(key("z", i)), key("w", i)));
        commits.push(req(Some(key("x", i)), key("y", i)));
        commits.push(req(Some(key("y", i)), key("x", i)));
    }
    let outcomes = futures::future::join_all(commits.into_iter().map(|c| {
        let store = store.clone();
        async move { store.commit(c).await }
    }))
    .await;
    let mut merged_skew = 0;
    for (i, o) in outcomes.chunks(4).enumerate() {
        for r in o {
            if let Err(e) = r {
                ensure!(*e == StoreError::Conflict, "pair {i}: unexpected error {e}");
            }
        }
        ensure!(
            o[0].is_ok(),
            "pair {i}: A read nothing and still failed: {:?}",
            o[0]
        );
        if let (Ok(a), Ok(b)) = (&o[0], &o[1]) {
            ensure!(
                b <= a,
                "pair {i}: B read z at {rv} and committed at {b}, after A's write of z at {a}"
            );
        }
        if o[2].is_ok() && o[3].is_ok() {
            merged_skew += 1;
        }
    }
    ensure_eq!(merged_skew, 0, "write-skew pairs that both committed");
    Ok(())
}

/// The backend's commit checks read-conflict ranges against later writes.
pub async fn commit_conflicts(db: &Db) -> CheckResult {
    let store = db.store();
    set(db, b"cc/k", b"0").await?;
    let s1 = store.snapshot().await?;
    let s2 = store.snapshot().await?;
    let rv = s1.version();
    // Without commits in between two snapshots read the same version; a store
    // shared with other writers (an etcd cluster, other prefixes) may move on.
    ensure!(
        s2.version() >= rv,
        "snapshot versions went back: {} after {rv}",
        s2.version()
    );
    let req = |reads: Vec<(&[u8], &[u8])>, key: &[u8]| CommitRequest {
        facts: Default::default(),
        fills: Vec::new(),
        read_version: rv,
        read_conflicts: reads
            .into_iter()
            .map(|(b, e)| (b.to_vec(), e.to_vec()))
            .collect(),
        mutations: vec![Mutation::Set(key.to_vec(), b"1".to_vec())],
    };
    let v1 = store
        .commit(req(vec![(b"cc/k", b"cc/k\0")], b"cc/k"))
        .await?;
    ensure!(v1 > rv, "commit version {v1} > read version {rv}");
    ensure_eq!(
        store
            .commit(req(vec![(b"cc/k", b"cc/k\0")], b"cc/other"))
            .await,
        Err(StoreError::Conflict),
        "a read of a key written since"
    );
    ensure_eq!(
        store
            .commit(req(vec![(b"cc/a", b"cc/z")], b"cc/other"))
            .await,
        Err(StoreError::Conflict),
        "a range read covering a key written since"
    );
    ensure!(
        store
            .commit(req(vec![(b"cc/k\0", b"cc/z")], b"cc/other"))
            .await
            .is_ok(),
        "a range read not covering the written key"
    );
    ensure!(
        store.commit(req(vec![], b"cc/blind")).await.is_ok(),
        "blind writes never conflict"
    );
    ensure_eq!(
        s2.get(b"cc/k").await?,
        Some(b"0".to_vec()),
        "an old snapshot still reads its version"
    );
    ensure_eq!(
        get(db, b"cc/other").await?,
        Some(b"1".to_vec()),
        "accepted commits applied"
    );
    Ok(())
}

/// Range reads: bytewise order, limits, reverse, empty ranges, prefixes, tuple order.
pub async fn range_order(db: &Db) -> CheckResult {
    let ks: Vec<&[u8]> = vec![
        b"r/",
        b"r/\x00",
        b"r/\x00\x00",
        b"r/\x01",
        b"r/a",
        b"r/a\x00",
        b"r/ab",
        b"r/b",
        b"r/\x7f",
        b"r/\x80",
        b"r/\xfe",
        b"r/\xff",
        b"r/\xff\xff",
    ];
    let mut shuffled = ks.clone();
    shuffled.reverse();
    shuffled.swap(2, 7);
    let to_write: Vec<Vec<u8>> = shuffled.iter().map(|k| k.to_vec()).collect();
    db.transact(move |tx| {
        let to_write = to_write.clone();
        Box::pin(async move {
            for k in &to_write {
                tx.set(k, k)?;
            }
            tx.set(b"r", b"outside")?;
            tx.set(b"r0", b"outside")?;
            Ok::<_, StoreError>(())
        })
    })
    .await?;
    let all = bkeys(&ks);
    let range = |b: &[u8], e: &[u8], limit: usize, reverse: bool| {
        let opt = RangeOption::new(b.to_vec(), e.to_vec())
            .with_limit(limit)
            .reversed(reverse);
        db.read(move |tx| Box::pin(async move { tx.get_range(opt).await }))
    };
    let rows = prefix(db, b"r/").await?;
    ensure_eq!(keys(&rows), all, "prefix read is sorted bytewise");
    ensure!(rows.iter().all(|(k, v)| k == v), "values match keys");
    ensure_eq!(
        keys(&range(b"r/", b"r0", 3, false).await?),
        all[..3].to_vec(),
        "limit 3"
    );
    let mut rev = all.clone();
    rev.reverse();
    ensure_eq!(keys(&range(b"r/", b"r0", 0, true).await?), rev, "reverse");
    ensure_eq!(
        keys(&range(b"r/", b"r0", 2, true).await?),
        rev[..2].to_vec(),
        "reverse limit 2"
    );
    ensure_eq!(
        keys(&range(b"r/", b"r0", 1000, false).await?),
        all,
        "limit above count"
    );
    ensure_eq!(
        keys(&range(b"r/a", b"r/b", 0, false).await?),
        bkeys(&[b"r/a", b"r/a\x00", b"r/ab"]),
        "[r/a, r/b): begin included, end excluded"
    );
    ensure!(
        range(b"r/a", b"r/a", 0, false).await?.is_empty(),
        "begin == end"
    );
    ensure!(
        range(b"r/b", b"r/a", 0, false).await?.is_empty(),
        "begin > end"
    );
    ensure!(
        range(b"q", b"q\xff", 0, false).await?.is_empty(),
        "no keys in range"
    );
    ensure!(
        prefix(db, b"nothing/").await?.is_empty(),
        "empty prefix read"
    );
    // Tuple-encoded integers sort numerically.
    let order: Vec<u64> = vec![300, 0, 255, 256, 1, u64::MAX, 65_536, 2];
    db.transact(move |tx| {
        let order = order.clone();
        Box::pin(async move {
            for n in order {
                tx.set(TupleKey::new().str("nums").u64(n).as_bytes(), b"")?;
            }
            Ok::<_, StoreError>(())
        })
    })
    .await?;
    let rows = prefix(db, TupleKey::new().str("nums").as_bytes()).await?;
    let mut got = Vec::new();
    for (k, _) in &rows {
        let mut r = TupleReader::new(k);
        let (_, n) = (r.str(), r.u64().map_err(|e| CheckFailure(e.to_string()))?);
        got.push(n);
    }
    ensure_eq!(
        got,
        vec![0, 1, 2, 255, 256, 300, 65_536, u64::MAX],
        "tuple integers in order"
    );
    // A listing longer than a backend's pages (etcd: 64 pairs, then
    // growing): every pair once, in order, both ways, cut by any limit.
    const LONG: u64 = 1_500;
    for first in (0..LONG).step_by(100) {
        db.transact(move |tx| {
            Box::pin(async move {
                for n in first..first + 100 {
                    tx.set(
                        TupleKey::new().str("long").u64(n).as_bytes(),
                        &n.to_be_bytes(),
                    )?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .await?;
    }
    let numbers = |rows: Vec<KeyValue>| -> Result<Vec<u64>, CheckFailure> {
        rows.iter()
            .map(|(k, v)| {
                let mut r = TupleReader::new(k);
                let _ = r.str();
                let n = r.u64().map_err(|e| CheckFailure(e.to_string()))?;
                let want = n.to_be_bytes();
                ensure_eq!(v.as_slice(), want.as_slice(), "value of {n}");
                Ok(n)
            })
            .collect()
    };
    let (b, e) = (
        TupleKey::new().str("long").into_vec(),
        TupleKey::new().str("long").u64(u64::MAX).into_vec(),
    );
    let all: Vec<u64> = (0..LONG).collect();
    ensure_eq!(
        numbers(range(&b, &e, 0, false).await?)?,
        all,
        "long listing"
    );
    ensure_eq!(
        numbers(range(&b, &e, 1_000, false).await?)?,
        all[..1_000].to_vec(),
        "long listing, limit 1,000"
    );
    let back: Vec<u64> = all.iter().rev().copied().collect();
    ensure_eq!(
        numbers(range(&b, &e, 0, true).await?)?,
        back,
        "long listing, reversed"
    );
    ensure_eq!(
        numbers(range(&b, &e, 700, true).await?)?,
        back[..700].to_vec(),
        "long listing, reversed, limit 700"
    );
    let mid = TupleKey::new().str("long").u64(333).into_vec();
    ensure_eq!(
        numbers(range(&mid, &e, 0, false).await?)?,
        all[333..].to_vec(),
        "long listing from the middle"
    );
    Ok(())
}

/// Oversized keys, values and transactions and reserved keys are refused with
/// clear errors, and nothing is written.
pub async fn limits(db: &Db) -> CheckResult {
    let big_key = [b"lim/".as_slice(), &vec![b'k'; MAX_KEY_SIZE]].concat();
    let r: Result<(), StoreError> = db
        .transact(move |tx| {
            let big_key = big_key.clone();
            Box::pin(async move {
                tx.set(b"lim/ok-before", b"1")?;
                tx.set(&big_key, b"v")
            })
        })
        .await;
    ensure!(
        matches!(r, Err(StoreError::KeyTooLarge { .. })),
        "key too large: {r:?}"
    );
    let r: Result<(), StoreError> = db
        .transact(|tx| Box::pin(async move { tx.set(b"lim/v", &vec![0; MAX_VALUE_SIZE + 1]) }))
        .await;
    ensure!(
        matches!(r, Err(StoreError::ValueTooLarge { .. })),
        "value too large: {r:?}"
    );
    let r: Result<(), StoreError> = db
        .transact(|tx| {
            Box::pin(async move {
                let v = vec![7u8; MAX_VALUE_SIZE];
                for i in 0u32.. {
                    tx.set(TupleKey::new().str("lim").u64(u64::from(i)).as_bytes(), &v)?;
                }
                Ok(())
            })
        })
        .await;
    ensure!(
        matches!(r, Err(StoreError::TransactionTooLarge { .. })),
        "transaction too large: {r:?}"
    );
    let r: Result<(), StoreError> = db
        .transact(|tx| Box::pin(async move { tx.set(b"\xffsystem", b"v") }))
        .await;
    ensure_eq!(r, Err(StoreError::ReservedKey), "set of a reserved key");
    let r: Result<(), StoreError> = db
        .transact(|tx| {
            Box::pin(async move {
                tx.set(b"lim/with-clear", b"1")?;
                tx.clear(b"\xff\x01");
                Ok(())
            })
        })
        .await;
    ensure_eq!(
        r,
        Err(StoreError::ReservedKey),
        "clear of a reserved key fails the commit"
    );
    let r: Result<(), StoreError> = db
        .transact(|tx| {
            Box::pin(async move {
                tx.clear_range(b"lim/", b"\xff\x00");
                Ok(())
            })
        })
        .await;
    ensure_eq!(
        r,
        Err(StoreError::ReservedKey),
        "clear_range into the system keys"
    );
    ensure!(
        prefix(db, b"lim").await?.is_empty(),
        "nothing written by refused transactions"
    );
    ensure_eq!(get(db, b"\xffsystem").await?, None, "no system key written");
    // A refused write changes nothing in a transaction that carries on.
    db.transact(|tx| {
        Box::pin(async move {
            let refused = tx.set(b"lim/big", &vec![0; MAX_VALUE_SIZE + 1]);
            if !matches!(refused, Err(StoreError::ValueTooLarge { .. })) {
                return Err(StoreError::Io(format!(
                    "expected ValueTooLarge, got {refused:?}"
                )));
            }
            tx.set(b"lim/fine", b"1")
        })
    })
    .await?;
    ensure_eq!(
        keys(&prefix(db, b"lim").await?),
        bkeys(&[b"lim/fine"]),
        "only the valid write"
    );
    // Size limits are inclusive.
    set(db, &vec![b'm'; MAX_KEY_SIZE], &vec![1; MAX_VALUE_SIZE]).await?;
    ensure_eq!(
        get(db, &vec![b'm'; MAX_KEY_SIZE]).await?.map(|v| v.len()),
        Some(MAX_VALUE_SIZE),
        "largest key and value"
    );
    Ok(())
}

/// Blobs: a 3 MiB round trip, replacement, the empty blob, the size limit,
/// corruption detection, removal.
pub async fn blobs(db: &Db) -> CheckResult {
    let big = noise("big blob", 3 * 1024 * 1024);
    let small = noise("small blob", 100_000);
    async fn put(db: &Db, p: &'static [u8], data: Vec<u8>) -> Result<(), StoreError> {
        db.transact(move |tx| {
            let data = data.clone();
            Box::pin(async move { blob::set_blob(tx, p, &data).await })
        })
        .await
    }
    async fn fetch(db: &Db, p: &'static [u8]) -> Result<Option<Vec<u8>>, StoreError> {
        db.read(move |tx| Box::pin(async move { blob::get_blob(tx, p).await }))
            .await
    }
    ensure_eq!(fetch(db, b"blob/a/").await?, None, "absent blob");
    put(db, b"blob/a/", big.clone()).await?;
    ensure!(
        fetch(db, b"blob/a/").await?.as_ref() == Some(&big),
        "3 MiB blob round trip"
    );
    put(db, b"blob/a/", small.clone()).await?;
    ensure!(
        fetch(db, b"blob/a/").await?.as_ref() == Some(&small),
        "replaced blob"
    );
    ensure_eq!(
        prefix(db, b"blob/a/").await?.len(),
        1 + small.len().div_ceil(blob::CHUNK_SIZE),
        "no chunk of the old blob left"
    );
    put(db, b"blob/empty/", Vec::new()).await?;
    ensure_eq!(fetch(db, b"blob/empty/").await?, Some(vec![]), "empty blob");
    let r = put(db, b"blob/huge/", vec![0; MAX_BLOB_SIZE + 1]).await;
    ensure_eq!(
        r,
        Err(StoreError::BlobTooLarge {
            len: MAX_BLOB_SIZE + 1,
            max: MAX_BLOB_SIZE
        }),
        "blob too large"
    );
    ensure!(
        prefix(db, b"blob/huge/").await?.is_empty(),
        "nothing written for a refused blob"
    );
    // Corrupt one chunk behind the blob layer's back.
    let chunk_key = [b"blob/a/".as_slice(), TupleKey::new().u64(1).as_bytes()].concat();
    set(db, &chunk_key, &noise("evil", blob::CHUNK_SIZE)).await?;
    let r = fetch(db, b"blob/a/").await;
    ensure!(
        matches!(r, Err(StoreError::Corrupt { .. })),
        "corrupt blob detected: {r:?}"
    );
    db.transact(|tx| {
        Box::pin(async move {
            blob::clear_blob(tx, b"blob/a/");
            Ok::<_, StoreError>(())
        })
    })
    .await?;
    ensure_eq!(fetch(db, b"blob/a/").await?, None, "cleared blob");
    ensure!(prefix(db, b"blob/a/").await?.is_empty(), "no chunk left");
    Ok(())
}

/// Commit versions strictly increase; snapshots see the latest commit.
pub async fn versions_increase(db: &Db) -> CheckResult {
    let mut last = read_version(db).await?;
    for i in 0..5u8 {
        set(db, b"ver/k", &[i]).await?;
        let now = read_version(db).await?;
        ensure!(now > last, "read version {now} after a commit, was {last}");
        last = now;
    }
    let store = db.store();
    let mut prev = last;
    for i in 0..5u8 {
        let v = store
            .commit(CommitRequest {
                facts: Default::default(),
                fills: Vec::new(),
                read_version: prev,
                read_conflicts: vec![],
                mutations: vec![Mutation::Set(b"ver/direct".to_vec(), vec![i])],
            })
            .await?;
        ensure!(v > prev, "commit version {v} after {prev}");
        let snap = store.snapshot().await?;
        ensure!(
            snap.version() >= v,
            "snapshot version {} >= commit version {v}",
            snap.version()
        );
        ensure_eq!(
            snap.get(b"ver/direct").await?,
            Some(vec![i]),
            "snapshot after commit sees it"
        );
        prev = v;
    }
    // Concurrent commits: every acknowledged version is above the version read before.
    let before = read_version(db).await?;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let store = db.store().clone();
            store
                .commit(CommitRequest {
                    facts: Default::default(),
                    fills: Vec::new(),
                    read_version: before,
                    read_conflicts: vec![],
                    mutations: vec![Mutation::Set(
                        TupleKey::new().str("ver").u64(t).into_vec(),
                        vec![],
                    )],
                })
                .await
        }));
    }
    for t in tasks {
        let v = t
            .await
            .map_err(|e| CheckFailure(format!("task panicked: {e}")))??;
        ensure!(v > before, "concurrent commit version {v} > {before}");
    }
    Ok(())
}

/// Data survives closing and reopening the store (the factory reopens `dir`).
pub async fn durability_across_reopen<F, Fut>(open: F, dir: PathBuf) -> CheckResult
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Result<Db, StoreError>>,
{
    let data = noise("durable blob", 200_000);
    let version = {
        let db = open(dir.clone()).await?;
        for i in 0..20u64 {
            set(
                &db,
                TupleKey::new().str("dur").u64(i).as_bytes(),
                &i.to_be_bytes(),
            )
            .await?;
        }
        let d = data.clone();
        db.transact(move |tx| {
            let d = d.clone();
            Box::pin(async move {
                tx.clear(TupleKey::new().str("dur").u64(3).as_bytes());
                blob::set_blob(tx, b"durblob/", &d).await
            })
        })
        .await?;
        read_version(&db).await?
    };
    for reopen in 0..2 {
        let db = open(dir.clone()).await?;
        let v = read_version(&db).await?;
        ensure!(
            v >= version,
            "reopen {reopen}: version {v} went back below {version}"
        );
        let rows = prefix(&db, TupleKey::new().str("dur").as_bytes()).await?;
        ensure_eq!(
            rows.len(),
            19 + reopen,
            "reopen {reopen}: keys after reopen"
        );
        ensure_eq!(
            get(&db, TupleKey::new().str("dur").u64(3).as_bytes()).await?,
            None,
            "cleared key"
        );
        let b = db
            .read(|tx| Box::pin(async move { blob::get_blob(tx, b"durblob/").await }))
            .await?;
        ensure!(b.as_ref() == Some(&data), "blob after reopen");
        set(
            &db,
            TupleKey::new()
                .str("dur")
                .u64(100 + reopen as u64)
                .as_bytes(),
            b"x",
        )
        .await?;
        ensure!(
            read_version(&db).await? > v,
            "commits after reopen get higher versions"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ crash

const CRASH_TASKS: u64 = 16;

/// The value the crash child writes under `key` (the parent recomputes it).
fn crash_value(key: &str) -> Vec<u8> {
    let mut size = 16 + (blake3::hash(key.as_bytes()).as_bytes()[0] as usize) * 8;
    if key.ends_with("7/b") {
        size = 20_000;
    }
    noise(key, size)
}

/// The crash child: commits from many tasks forever, printing `ACK <key>` on
/// stdout after each acknowledged commit (two keys per transaction: `<key>/a`, `<key>/b`).
pub async fn crash_child(db: Db) -> CheckResult {
    let mut tasks = Vec::new();
    for t in 0..CRASH_TASKS {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("crash/{t:02}/{i:08}");
                // The shared counter makes the tasks conflict on purpose; on
                // a loaded machine one of them can lose every attempt of a
                // transaction. Nothing unacknowledged is claimed, so it
                // writes the same key again (the test is about what was
                // acknowledged, not about winning a contended counter).
                loop {
                    let k = key.clone();
                    let r = db
                        .transact(move |tx| {
                            let k = k.clone();
                            Box::pin(async move {
                                for part in ["a", "b"] {
                                    let kk = format!("{k}/{part}");
                                    tx.set(kk.as_bytes(), &crash_value(&kk))?;
                                }
                                // Also read-modify-write a shared counter, to keep the committer busy with conflicts.
                                let n = counter_value(tx.get(b"crash-counter").await?)?;
                                tx.set(b"crash-counter", &(n + 1).to_be_bytes())
                            })
                        })
                        .await;
                    match r {
                        Err(StoreError::TooManyRetries { .. }) => continue,
                        r => break r?,
                    }
                }
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {key}").and_then(|()| out.flush())?;
            }
            Ok::<_, CheckFailure>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| CheckFailure(format!("task panicked: {e}")))??;
    }
    Ok(())
}

/// The crash test: in the parent, re-executes this test binary running `test_name`
/// as the crash child, kills it with SIGKILL mid-write, reopens the store and
/// checks every acknowledged commit; in the child (see [`CRASH_CHILD_ENV`]), runs
/// [`crash_child`] until killed (or for 60 s at most).
pub fn crash_test<F, Fut>(open: F, test_name: &str)
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Result<Db, StoreError>>,
{
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        let outcome = runtime().block_on(async {
            let db = open(PathBuf::from(dir)).await?;
            match tokio::time::timeout(Duration::from_secs(60), crash_child(db)).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        });
        if let Err(e) = outcome {
            panic!("crash child failed: {e}");
        }
        return;
    }
    run("crash_kill9", |dir| {
        crash_parent(open, dir, test_name.to_string())
    });
}

async fn crash_parent<F, Fut>(open: F, dir: PathBuf, test_name: String) -> CheckResult
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Result<Db, StoreError>>,
{
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            test_name.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CheckFailure("no stdout pipe".into()))?;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        // Only complete lines count: a line is written in one small write, so a
        // kill cannot split it, but be strict anyway.
        while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if line.ends_with(b"\n") {
                let s = String::from_utf8_lossy(&line).trim_end().to_string();
                if lines_tx.send(s).is_err() {
                    break;
                }
            }
            line.clear();
        }
    });
    let started = Instant::now();
    let mut acked: Vec<String> = Vec::new();
    let take = |line: String, acked: &mut Vec<String>| {
        // libtest may print "test … " on the line of the first acknowledgement.
        if let Some(i) = line.find("ACK ") {
            acked.push(line[i + 4..].to_string());
        }
    };
    // Let it run: until enough acknowledgements after a moment, bounded in time.
    while started.elapsed() < Duration::from_secs(30) {
        if acked.len() >= 400 && started.elapsed() >= Duration::from_millis(700) {
            break;
        }
        match lines_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => take(line, &mut acked),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let still_running = child.try_wait()?.is_none();
    child.kill()?; // SIGKILL
    let status = child.wait()?;
    let _ = reader.join();
    for line in lines_rx.try_iter() {
        take(line, &mut acked);
    }
    ensure!(
        still_running,
        "the crash child exited by itself ({status}) before being killed"
    );
    ensure!(!acked.is_empty(), "the crash child acknowledged no commit");
    let db = open(dir.clone()).await?;
    let mut missing = Vec::new();
    for key in &acked {
        for part in ["a", "b"] {
            let kk = format!("{key}/{part}");
            if get(&db, kk.as_bytes()).await? != Some(crash_value(&kk)) {
                missing.push(kk);
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost after kill -9, e.g. {:?}",
        missing.len(),
        acked.len() * 2,
        &missing[..missing.len().min(5)]
    );
    // Every transaction is whole: each `a` has its `b`, both with the values
    // written (acknowledged or not: the kill may land after a commit and
    // before its ACK).
    let rows = prefix(&db, b"crash/").await?;
    let mut pairs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (k, v) in &rows {
        let k = String::from_utf8_lossy(k).into_owned();
        ensure!(
            *v == crash_value(&k),
            "crash key {k} holds a value that was never written"
        );
        let Some((txn, part)) = k.rsplit_once('/') else {
            return Err(CheckFailure(format!("unexpected crash key {k}")));
        };
        pairs
            .entry(txn.to_string())
            .or_default()
            .push(part.to_string());
    }
    let whole = ["a".to_string(), "b".to_string()];
    for (txn, parts) in &pairs {
        ensure_eq!(
            parts.as_slice(),
            whole.as_slice(),
            "the parts of transaction {txn} (a torn transaction)"
        );
    }
    ensure!(
        pairs.len() >= acked.len(),
        "{} transactions in the store, fewer than the {} acknowledged",
        pairs.len(),
        acked.len()
    );
    // Each transaction also added one to a shared counter: a transaction
    // applied twice (a retry after an unknown outcome) would count twice.
    let counter = counter_value(get(&db, b"crash-counter").await?)?;
    ensure_eq!(
        counter,
        pairs.len() as u64,
        "the shared counter against the transactions in the store (one increment each)"
    );
    set(&db, b"crash/after", b"alive").await?;
    ensure_eq!(
        get(&db, b"crash/after").await?,
        Some(b"alive".to_vec()),
        "store writable after recovery"
    );
    tracing::info!(acked = acked.len(), "crash test passed");
    Ok(())
}
