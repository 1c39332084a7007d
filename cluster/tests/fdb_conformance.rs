//! The backend conformance suite against a real FoundationDB cluster (cargo
//! feature `fdb`), plus FoundationDB-specific checks.
//!
//! Needs `CAPSTAN_FDB_CLUSTER_FILE`: the cluster file of a running
//! FoundationDB 7.1 or 7.3 cluster. Without it every check passes as skipped
//! (with a note on stderr). Each check uses a store name (key prefix) of its
//! own, derived from its scratch directory, so checks share one cluster; the
//! stores are left in the cluster afterwards.
//!
//! Building this file needs libclang (bindgen) and linking it needs libfdb_c,
//! FoundationDB's client library.
#![cfg(feature = "fdb")]

use std::path::{Path, PathBuf};

use capstan_cluster::conformance::{get, set};
use capstan_cluster::fdb_store::{FdbConfig, MAX_PREFIX_LEN};
use capstan_cluster::{CommitRequest, Db, Mutation, StoreError, Transaction};

const CLUSTER_FILE_ENV: &str = "CAPSTAN_FDB_CLUSTER_FILE";

/// The cluster file, or `None` (check skipped, with a note) when unset.
fn cluster_file() -> Option<String> {
    match std::env::var(CLUSTER_FILE_ENV) {
        Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => {
            eprintln!(
                "skipped: set {CLUSTER_FILE_ENV} to the cluster file of a running FoundationDB cluster (e.g. /etc/foundationdb/fdb.cluster)"
            );
            None
        }
    }
}

fn fdb_enabled() -> bool {
    cluster_file().is_some()
}

/// A store name of [`MAX_PREFIX_LEN`] characters derived from `tag` (a
/// scratch directory's name, unique per check and run).
fn prefix_for(tag: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    blake3::hash(tag.as_bytes()).as_bytes()[..MAX_PREFIX_LEN]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

fn spec_for(tag: &str) -> String {
    format!(
        "fdb:{}?prefix={}",
        cluster_file().expect("cluster file"),
        prefix_for(tag)
    )
}

/// The conformance factory: the same directory opens the same store.
async fn open_fdb(dir: PathBuf) -> Result<Db, StoreError> {
    let tag = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("scratch")
        .to_string();
    capstan_cluster::open(&spec_for(&tag)).await
}

capstan_cluster::conformance_tests!(open_fdb, enabled: fdb_enabled);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

#[test]
fn spec_names_the_cluster_file_and_prefix() {
    let c = FdbConfig::parse("fdb:/etc/foundationdb/fdb.cluster?prefix=abc").unwrap();
    assert_eq!(
        c.cluster_file.as_deref(),
        Some("/etc/foundationdb/fdb.cluster")
    );
    assert_eq!(c.prefix, "abc");
    assert_eq!(prefix_for("x").len(), MAX_PREFIX_LEN);
    assert!(FdbConfig::parse(&format!("fdb:?prefix={}", prefix_for("y"))).is_ok());
}

/// Stores with different names share a cluster without seeing each other,
/// and the same name opens the same store again.
#[test]
fn stores_are_independent() {
    if !fdb_enabled() {
        return;
    }
    rt().block_on(async {
        let (ta, tb) = (unique("a"), unique("b"));
        let a = capstan_cluster::open(&spec_for(&ta)).await.unwrap();
        let b = capstan_cluster::open(&spec_for(&tb)).await.unwrap();
        set(&a, b"k", b"a").await.unwrap();
        assert_eq!(get(&b, b"k").await.unwrap(), None);
        set(&b, b"k", b"b").await.unwrap();
        assert_eq!(get(&a, b"k").await.unwrap(), Some(b"a".to_vec()));
        let again = capstan_cluster::open(&spec_for(&ta)).await.unwrap();
        assert_eq!(get(&again, b"k").await.unwrap(), Some(b"a".to_vec()));
        assert!(a.describe().starts_with("fdb:"), "{}", a.describe());
    });
}

/// A key deleted after a transaction read it (by a range read or a get) makes
/// the transaction conflict; an insert into a read range too; a write outside
/// the read set does not.
#[test]
fn deletions_and_inserts_after_the_read_conflict() {
    if !fdb_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("del")))
            .await
            .unwrap();
        for k in [b"r/a", b"r/b", b"r/c"] {
            set(&db, k, b"1").await.unwrap();
        }
        let mut tx = Transaction::new(db.store().snapshot().await.unwrap());
        assert_eq!(tx.get_prefix(b"r/", 0, false).await.unwrap().len(), 3);
        tx.set(b"out", b"x").unwrap();
        let mut other = Transaction::new(db.store().snapshot().await.unwrap());
        other.clear(b"r/b");
        db.store()
            .commit(other.into_commit_request().unwrap())
            .await
            .unwrap();
        let r = db.store().commit(tx.into_commit_request().unwrap()).await;
        assert_eq!(r, Err(StoreError::Conflict), "delete inside a read range");

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
    });
}

/// A commit whose read version FoundationDB no longer serves (older than its
/// ~5 s window) is a conflict, which `Db::transact` retries; it is not an I/O
/// error.
#[test]
fn too_old_read_versions_are_conflicts() {
    if !fdb_enabled() {
        return;
    }
    rt().block_on(async {
        let db = capstan_cluster::open(&spec_for(&unique("old")))
            .await
            .unwrap();
        let rv = db.store().snapshot().await.unwrap().version();
        tokio::time::sleep(std::time::Duration::from_secs(7)).await;
        let r = db
            .store()
            .commit(CommitRequest {
                facts: Default::default(),
                fills: Vec::new(),
                read_version: rv,
                read_conflicts: vec![(b"k".to_vec(), b"k\0".to_vec())],
                mutations: vec![Mutation::Set(b"k".to_vec(), b"v".to_vec())],
            })
            .await;
        assert_eq!(r, Err(StoreError::Conflict));
        set(&db, b"k", b"v").await.unwrap();
    });
}

/// A cluster file that does not exist gives an I/O error naming it.
#[test]
fn missing_cluster_file_is_a_clear_error() {
    if !fdb_enabled() {
        return;
    }
    rt().block_on(async {
        let path = Path::new("/nonexistent/capstan/fdb.cluster");
        let r = capstan_cluster::open(&format!("fdb:{}", path.display())).await;
        match r {
            Err(StoreError::Io(msg)) => assert!(msg.contains(&*path.to_string_lossy()), "{msg}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a store from a missing cluster file"),
        }
    });
}
