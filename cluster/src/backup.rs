//! Backups of a whole store: one consistent snapshot written to a file, and
//! its restore into an empty store, on every backend.
//!
//! # File format (`capstan-backup-v1`)
//!
//! ```text
//! magic   "capstan-backup\n" (15 bytes), format u32 = 1
//! pair*   0x01, key length u32, value length u32, key, value
//! end     0x00, pairs u64, store version u64, blake3 of every byte before it (32)
//! ```
//!
//! Integers are big-endian. Pairs come in key order, every key of the user
//! key space (below [`SYSTEM_KEY_PREFIX`]) at one snapshot's version, so a
//! backup taken while the node serves is consistent: it holds exactly the
//! commits up to that version. The file is written under a temporary name,
//! synced and renamed into place (mode 0600: it holds everything the store
//! does), so a backup interrupted half way leaves no file that looks whole.
//!
//! A restore reads the file twice: first to check it (format, limits, key
//! order, the hash and the count), then to write. Nothing is written unless
//! the whole file checks, and only into a store that holds no key at all, so
//! a restore never mixes two stores' records. Its writes are blind (they
//! read nothing, so they never conflict) and go in commits of at most
//! [`Store::max_commit_writes`] keys and [`MAX_TRANSACTION_SIZE`] bytes; an
//! interrupted restore leaves a partial store that the next restore refuses
//! (it is not empty): remove it and restore again.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::store::{
    CommitRequest, Db, MAX_KEY_SIZE, MAX_TRANSACTION_SIZE, MAX_VALUE_SIZE, Mutation, RangeOption,
    SYSTEM_KEY_PREFIX, Store, StoreError, Version, key_after,
};

const MAGIC: &[u8; 15] = b"capstan-backup\n";
const FORMAT: u32 = 1;
const PAIR: u8 = 1;
const END: u8 = 0;
/// Keys read per range read while backing up.
const PAGE_KEYS: usize = 256;

/// What a backup holds (or a restore wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Key-value pairs.
    pub pairs: u64,
    /// Bytes of keys and values together.
    pub bytes: u64,
    /// The version of the snapshot the backup was taken at.
    pub version: Version,
}

/// A backup or restore that failed; a failed restore wrote nothing unless
/// it says so.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing the backup file failed.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The file is not a whole, undamaged Capstan backup.
    #[error(
        "{path} is not a whole Capstan backup ({detail}); nothing was restored. Use another backup"
    )]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The store to restore into holds keys.
    #[error(
        "the store {store} is not empty; a backup is restored only into an empty store, so that two stores' records never mix. Nothing was changed: move the store away (stop the node first), or restore into a fresh etcd prefix"
    )]
    NotEmpty {
        /// The store.
        store: String,
    },
    /// The store failed.
    #[error("{error}{}", if *partial { " (the restore stopped part way: remove what it wrote, then restore again)" } else { "" })]
    Store {
        /// What failed.
        error: StoreError,
        /// Whether a restore had written part of the backup.
        partial: bool,
    },
}

impl From<StoreError> for BackupError {
    fn from(e: StoreError) -> Self {
        BackupError::Store {
            error: e,
            partial: false,
        }
    }
}

fn file_error(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::File {
        path: path.display().to_string(),
        error,
    }
}

/// The temporary name a backup is written under.
fn partial(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes every key of one snapshot of `db` to `path` (replacing a file
/// there only once the new one is whole); `progress` is told the pairs and
/// bytes written so far after each page.
pub async fn write(
    db: &Db,
    path: &Path,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary, BackupError> {
    let tmp = partial(path);
    let ferr = file_error(&tmp);
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(&ferr)?
    };
    let written = async {
        let mut out = Hashing {
            inner: BufWriter::new(&file),
            hash: blake3::Hasher::new(),
        };
        out.write_all(MAGIC).map_err(&ferr)?;
        out.write_all(&FORMAT.to_be_bytes()).map_err(&ferr)?;
        let snapshot = db.store().snapshot().await?;
        let mut summary = Summary {
            version: snapshot.version(),
            ..Summary::default()
        };
        let mut begin = Vec::new();
        loop {
            let page = snapshot
                .range(
                    &RangeOption::new(begin.clone(), vec![SYSTEM_KEY_PREFIX]).with_limit(PAGE_KEYS),
                )
                .await?;
            for (k, v) in &page {
                out.write_all(&[PAIR]).map_err(&ferr)?;
                out.write_all(&(k.len() as u32).to_be_bytes())
                    .map_err(&ferr)?;
                out.write_all(&(v.len() as u32).to_be_bytes())
                    .map_err(&ferr)?;
                out.write_all(k).map_err(&ferr)?;
                out.write_all(v).map_err(&ferr)?;
                summary.pairs += 1;
                summary.bytes += (k.len() + v.len()) as u64;
            }
            progress(&summary);
            match page.last() {
                Some((k, _)) if page.len() == PAGE_KEYS => begin = key_after(k),
                _ => break,
            }
        }
        out.write_all(&[END]).map_err(&ferr)?;
        out.write_all(&summary.pairs.to_be_bytes()).map_err(&ferr)?;
        out.write_all(&summary.version.to_be_bytes())
            .map_err(&ferr)?;
        let hash = out.hash.finalize();
        let mut inner = out.inner;
        inner.write_all(hash.as_bytes()).map_err(&ferr)?;
        inner.flush().map_err(&ferr)?;
        drop(inner);
        file.sync_all().map_err(&ferr)?;
        Ok::<_, BackupError>(summary)
    }
    .await;
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path).map_err(file_error(path))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_error(dir))?;
    }
    Ok(summary)
}

/// Reads a backup file pair by pair, checking it as it goes.
struct Reader {
    path: PathBuf,
    input: BufReader<File>,
    hash: blake3::Hasher,
    pairs: u64,
    bytes: u64,
    last: Option<Vec<u8>>,
}

enum Item {
    Pair(Vec<u8>, Vec<u8>),
    End(Summary),
}

impl Reader {
    fn open(path: &Path) -> Result<Self, BackupError> {
        let input = BufReader::new(File::open(path).map_err(file_error(path))?);
        let mut r = Reader {
            path: path.to_path_buf(),
            input,
            hash: blake3::Hasher::new(),
            pairs: 0,
            bytes: 0,
            last: None,
        };
        let mut magic = [0u8; MAGIC.len()];
        r.read(&mut magic)?;
        if &magic != MAGIC {
            return Err(r.damaged("no capstan-backup header"));
        }
        let format = r.u32()?;
        if format != FORMAT {
            return Err(r.damaged(format!("format {format}; this build reads format {FORMAT}")));
        }
        Ok(r)
    }

    fn damaged(&self, detail: impl Into<String>) -> BackupError {
        BackupError::Damaged {
            path: self.path.display().to_string(),
            detail: detail.into(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.hash.update(buf);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.damaged("the file ends early: an interrupted copy?"))
            }
            Err(e) => Err(file_error(&self.path)(e)),
        }
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn next(&mut self) -> Result<Item, BackupError> {
        let mut tag = [0u8; 1];
        self.read(&mut tag)?;
        match tag[0] {
            PAIR => {
                let (klen, vlen) = (self.u32()? as usize, self.u32()? as usize);
                if klen == 0 || klen > MAX_KEY_SIZE || vlen > MAX_VALUE_SIZE {
                    return Err(self.damaged(format!(
                        "pair {} claims a key of {klen} bytes and a value of {vlen} bytes, beyond what a store holds",
                        self.pairs
                    )));
                }
                let mut key = vec![0u8; klen];
                self.read(&mut key)?;
                let mut value = vec![0u8; vlen];
                self.read(&mut value)?;
                if key[0] == SYSTEM_KEY_PREFIX || self.last.as_ref().is_some_and(|l| *l >= key) {
                    return Err(self.damaged(format!("pair {} is out of key order", self.pairs)));
                }
                self.pairs += 1;
                self.bytes += (klen + vlen) as u64;
                self.last = Some(key.clone());
                Ok(Item::Pair(key, value))
            }
            END => {
                let (pairs, version) = (self.u64()?, self.u64()?);
                let computed = self.hash.finalize();
                let mut stored = [0u8; 32];
                match self.input.read_exact(&mut stored) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(self.damaged("the file ends early: an interrupted copy?"));
                    }
                    Err(e) => return Err(file_error(&self.path)(e)),
                }
                if computed.as_bytes() != &stored {
                    return Err(self.damaged("its checksum does not match its contents"));
                }
                if pairs != self.pairs {
                    return Err(
                        self.damaged(format!("it says {pairs} pairs but holds {}", self.pairs))
                    );
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest).map_err(file_error(&self.path))? != 0 {
                    return Err(self.damaged("bytes after its end"));
                }
                Ok(Item::End(Summary {
                    pairs,
                    bytes: self.bytes,
                    version,
                }))
            }
            other => Err(self.damaged(format!("unknown record tag {other}"))),
        }
    }
}

/// Checks a backup file whole (format, order, limits, checksum, count)
/// without writing anything.
pub fn verify(path: &Path) -> Result<Summary, BackupError> {
    let mut r = Reader::open(path)?;
    loop {
        if let Item::End(s) = r.next()? {
            return Ok(s);
        }
    }
}

/// Commits blind writes, retrying an unknown outcome (setting the same
/// keys again is harmless) a few times.
async fn commit_blind(store: &dyn Store, mutations: Vec<Mutation>) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        let req = CommitRequest {
            facts: Default::default(),
            fills: Vec::new(),
            read_version: 0,
            read_conflicts: Vec::new(),
            mutations: mutations.clone(),
        };
        match store.commit(req).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "a restore commit's outcome is unknown; writing it again");
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Restores the backup at `path` into `db`, which must hold no key; the
/// file is checked whole first (see the module docs). `progress` is told
/// what was written after each commit.
pub async fn restore(
    db: &Db,
    path: &Path,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary, BackupError> {
    let expected = verify(path)?;
    let store = db.store();
    let snapshot = store.snapshot().await?;
    let any = snapshot
        .range(&RangeOption::new(Vec::new(), vec![SYSTEM_KEY_PREFIX]).with_limit(1))
        .await?;
    if !any.is_empty() {
        return Err(BackupError::NotEmpty {
            store: db.describe(),
        });
    }
    let max_writes = store.max_commit_writes().clamp(1, 1024);
    let mut r = Reader::open(path)?;
    let mut done = Summary {
        version: expected.version,
        ..Summary::default()
    };
    let mut batch: Vec<Mutation> = Vec::new();
    let mut batch_bytes = 0usize;
    loop {
        let item = r.next()?;
        let flush = match &item {
            Item::Pair(k, v) => {
                batch_bytes + k.len() + v.len() > MAX_TRANSACTION_SIZE / 2
                    || batch.len() >= max_writes
            }
            Item::End(_) => !batch.is_empty(),
        };
        if flush {
            let written = std::mem::take(&mut batch);
            let n = written.len() as u64;
            commit_blind(store.as_ref(), written)
                .await
                .map_err(|error| BackupError::Store {
                    error,
                    partial: done.pairs > 0,
                })?;
            done.pairs += n;
            done.bytes += batch_bytes as u64;
            batch_bytes = 0;
            progress(&done);
        }
        match item {
            Item::Pair(k, v) => {
                batch_bytes += k.len() + v.len();
                batch.push(Mutation::Set(k, v));
            }
            Item::End(_) => break,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_store::MemStore;
    use std::sync::Arc;

    fn mem() -> Db {
        Db::new(Arc::new(MemStore::new()))
    }

    async fn fill(db: &Db, n: usize) {
        let mut m = Vec::new();
        for i in 0..n {
            let v = vec![(i % 251) as u8; i * 7 % 3000];
            m.push(Mutation::Set(format!("k{i:05}").into_bytes(), v));
        }
        commit_blind(db.store().as_ref(), m).await.unwrap();
    }

    async fn all(db: &Db) -> Vec<(Vec<u8>, Vec<u8>)> {
        let s = db.store().snapshot().await.unwrap();
        s.range(&RangeOption::new(Vec::new(), vec![SYSTEM_KEY_PREFIX]))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_backup_restores_every_pair_into_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b");
        let from = mem();
        fill(&from, 700).await;
        let mut pages = 0;
        let s = write(&from, &file, |_| pages += 1).await.unwrap();
        assert_eq!(s.pairs, 700);
        assert!(pages >= 3, "progress after each page");
        assert!(!partial(&file).exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(verify(&file).unwrap(), s);
        let to = mem();
        let r = restore(&to, &file, |_| {}).await.unwrap();
        assert_eq!((r.pairs, r.bytes), (s.pairs, s.bytes));
        assert_eq!(all(&to).await, all(&from).await);
    }

    #[tokio::test]
    async fn damaged_or_cut_backups_and_full_stores_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b");
        let from = mem();
        fill(&from, 50).await;
        write(&from, &file, |_| {}).await.unwrap();
        let whole = std::fs::read(&file).unwrap();
        let bad = dir.path().join("bad");
        // One flipped byte anywhere, and every cut, is refused.
        for at in [20, whole.len() / 2, whole.len() - 40, whole.len() - 1] {
            let mut b = whole.clone();
            b[at] ^= 0x40;
            std::fs::write(&bad, &b).unwrap();
            let to = mem();
            let e = restore(&to, &bad, |_| {}).await.unwrap_err();
            assert!(
                matches!(e, BackupError::Damaged { .. }),
                "flip at {at}: {e}"
            );
            assert!(all(&to).await.is_empty(), "flip at {at} wrote something");
        }
        for cut in [0, 10, whole.len() / 3, whole.len() - 1] {
            std::fs::write(&bad, &whole[..cut]).unwrap();
            let e = verify(&bad).unwrap_err();
            assert!(
                matches!(e, BackupError::Damaged { .. }),
                "cut at {cut}: {e}"
            );
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&bad, &longer).unwrap();
        assert!(matches!(verify(&bad), Err(BackupError::Damaged { .. })));
        // A store with anything in it is left as it is.
        let to = mem();
        fill(&to, 1).await;
        let before = all(&to).await;
        let e = restore(&to, &file, |_| {}).await.unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");
        assert_eq!(all(&to).await, before);
    }
}
