//! The backend conformance suite against the embedded redb store, plus the
//! redb-specific checks of opening: locking, corrupt files, foreign redb files.

use std::path::{Path, PathBuf};

use capstan_cluster::redb_store::RedbStore;
use capstan_cluster::{Db, StoreError};

async fn open_redb(dir: PathBuf) -> Result<Db, StoreError> {
    capstan_cluster::open(&format!("redb:{}", dir.join("store.redb").display())).await
}

capstan_cluster::conformance_tests!(open_redb);

const LOCK_CHILD_ENV: &str = "CAPSTAN_TEST_LOCK_CHILD";

fn open_err(path: &Path) -> StoreError {
    match RedbStore::open(path) {
        Ok(_) => panic!("{} opened, an error was expected", path.display()),
        Err(e) => e,
    }
}

#[test]
fn second_open_in_same_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dirs/store.redb");
    let first = RedbStore::open(&path).unwrap();
    let err = open_err(&path);
    match &err {
        StoreError::Locked { detail, .. } => {
            assert!(
                detail.contains(&std::process::id().to_string()),
                "holder pid in {detail:?}"
            )
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    drop(RedbStore::open(&path).unwrap());
}

/// In the child (env var set), tries to open the store and prints the outcome;
/// in the parent, holds the store open and runs the child.
#[test]
fn second_open_in_other_process_is_locked() {
    if let Ok(path) = std::env::var(LOCK_CHILD_ENV) {
        match RedbStore::open(Path::new(&path)) {
            Ok(_) => println!("OUTCOME opened"),
            Err(e) => println!("OUTCOME {e:?}"),
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _held = RedbStore::open(&path).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "second_open_in_other_process_is_locked",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOCK_CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest may print "test … " on the same line before the child's output.
    let outcome = stdout
        .lines()
        .find_map(|l| l.find("OUTCOME ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no outcome in {stdout}"));
    assert!(outcome.starts_with("OUTCOME Locked"), "{outcome}");
    assert!(
        outcome.contains(&format!("held by pid {}", std::process::id())),
        "{outcome}"
    );
}

fn assert_refused_untouched(path: &Path, expect_in_detail: &str) {
    let before = std::fs::read(path).unwrap();
    let err = open_err(path);
    match &err {
        StoreError::Corrupt { detail, .. } => {
            assert!(detail.contains(expect_in_detail), "{detail:?}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "the file was modified"
    );
}

#[test]
fn garbage_file_is_corrupt_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    assert_refused_untouched(&path, "not a redb database");
    std::fs::write(&path, b"abc").unwrap();
    assert_refused_untouched(&path, "not a redb database");
    // The right magic followed by garbage.
    let mut fake = b"redb\x1a\x0a\xa9\x0d\x0a".to_vec();
    fake.extend_from_slice(&garbage);
    std::fs::write(&path, &fake).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = open_err(&path);
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was modified"
    );
}

#[test]
fn foreign_redb_file_is_not_a_capstan_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
            w.open_table(table).unwrap().insert("x", 1).unwrap();
        }
        w.commit().unwrap();
    }
    assert_refused_untouched(&path, "not a Capstan store");
    // With a capstan_meta table but no marker.
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("capstan_meta");
            w.open_table(meta)
                .unwrap()
                .insert("other", b"x".as_slice())
                .unwrap();
        }
        w.commit().unwrap();
    }
    assert_refused_untouched(&path, "not a Capstan store");
}

#[test]
fn describe_and_open_spec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt
        .block_on(capstan_cluster::open(path.to_str().unwrap()))
        .unwrap();
    assert_eq!(db.describe(), format!("redb:{}", path.display()));
}

const FOREIGN_CHILD_ENV: &str = "CAPSTAN_TEST_FOREIGN_CHILD";

/// A foreign redb file left unclean by a dead process is refused, untouched (the
/// recovery needed to read it runs in memory).
#[test]
fn unclean_foreign_redb_file_is_refused_untouched() {
    if let Ok(path) = std::env::var(FOREIGN_CHILD_ENV) {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
            w.open_table(table).unwrap().insert("x", 1).unwrap();
        }
        w.commit().unwrap();
        // Die without closing the database, as a killed process would.
        std::mem::forget(db);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.redb");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "unclean_foreign_redb_file_is_refused_untouched",
            "--exact",
            "--test-threads=1",
        ])
        .env(FOREIGN_CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        matches!(
            redb::Builder::new().open_read_only(&path),
            Err(redb::DatabaseError::RepairAborted)
        ),
        "the child should have left the file needing recovery"
    );
    assert_refused_untouched(&path, "not a Capstan store");
}
