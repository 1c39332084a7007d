//! The embedded backend: one redb file, FoundationDB's commit design.
//!
//! # Layout of the file
//!
//! - table `capstan_data`: the key-value pairs (bytes → bytes);
//! - table `capstan_meta`: `format` = `capstan-store-v1` (written when the store
//!   is created: a redb file without it is not a Capstan store) and `version` =
//!   the last committed [`Version`] (u64 big-endian), updated in the same redb
//!   write transaction as the data, so a snapshot reads data and version from
//!   one redb read transaction.
//!
//! Beside it, `<path>.lock` holds an exclusive `flock` for as long as the store
//! is open, and the pid of its holder: a second opener gets [`StoreError::Locked`]
//! naming that pid.
//!
//! # Commits
//!
//! [`Store::commit`] queues the request on a bounded channel ([`QUEUE_CAPACITY`])
//! to one committer on a dedicated OS thread. The committer takes everything
//! queued (up to [`MAX_BATCH_REQUESTS`] requests or [`MAX_BATCH_BYTES`] bytes),
//! checks each request's read-conflict ranges against the [`ConflictLog`] of
//! recent writes and against the writes of the requests accepted before it in the
//! batch, applies all accepted mutations in one redb write transaction with
//! `Durability::Immediate` (one fsync for the batch: group commit), and only then
//! replies. Every accepted request of a batch gets the batch's version; versions
//! strictly increase from batch to batch.
//!
//! # Opening
//!
//! A new store is created under a temporary name, initialised, then renamed into
//! place, so a crash during creation never leaves a file without the marker.
//! An existing file is vetted before redb may write to it: the magic bytes are
//! checked, then the file is opened read-only and the marker read. A file that
//! fails is reported [`StoreError::Corrupt`] and left untouched. A file that was
//! not closed cleanly (a killed process) cannot be opened read-only: redb then
//! recovers it into an in-memory copy-on-write overlay of the file to read the
//! marker, and only a Capstan store is then recovered for real. Commits save
//! redb's allocator state (quick-repair), so recovery is fast.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{
    Builder, Database, DatabaseError, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable,
    StorageError, TableDefinition, TableError,
};
use tokio::sync::{mpsc, oneshot};

use crate::store::{
    CommitRequest, KeyValue, MAX_KEY_SIZE, MAX_TRANSACTION_SIZE, MAX_VALUE_SIZE, Mutation,
    RangeOption, Snapshot, Store, StoreError, Version,
};

const DATA: TableDefinition<&'static [u8], &'static [u8]> = TableDefinition::new("capstan_data");
const META: TableDefinition<&'static str, &'static [u8]> = TableDefinition::new("capstan_meta");
const FORMAT_KEY: &str = "format";
const FORMAT_VALUE: &[u8] = b"capstan-store-v1";
const VERSION_KEY: &str = "version";
/// redb's magic number, the first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Commit requests waiting for the committer, at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// A batch commit (apply + fsync) slower than this is logged as a warning.
const SLOW_COMMIT: Duration = Duration::from_millis(200);
/// Requests committed in one batch, at most.
pub const MAX_BATCH_REQUESTS: usize = 1024;
/// Mutation bytes committed in one batch, at most (a single larger request still goes alone).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// How long writes are kept in the conflict log (longer-running transactions conflict).
pub const CONFLICT_WINDOW: Duration = Duration::from_secs(5);
/// Ranges kept in the conflict log, at most.
pub const MAX_CONFLICT_ENTRIES: usize = 100_000;
/// Save redb's allocator state with every commit, so that a store killed mid-write
/// reopens instantly (and read-only vetting works) instead of being fully repaired.
const QUICK_REPAIR: bool = true;

/// The embedded store (see the module docs).
pub struct RedbStore {
    describe: String,
    db: Arc<Database>,
    queue: Option<mpsc::Sender<Pending>>,
    committer: Option<std::thread::JoinHandle<()>>,
    /// Snapshots taken, commits asked for, and those that conflicted
    /// (what [`Store::stats`] reports).
    snapshots: AtomicU64,
    commits: AtomicU64,
    conflicts: AtomicU64,
    /// Dropped last: the file stays locked until redb has closed it.
    _lock: LockFile,
}

struct Pending {
    req: CommitRequest,
    bytes: usize,
    reply: oneshot::Sender<Result<Version, StoreError>>,
}

/// Bytes of redb's page cache for a node's store unless set otherwise
/// (`capstan start --store-cache-bytes`): 32 MiB. redb's own default is
/// 1 GiB, which let a node's resident memory grow with its store (about
/// 1.3 KB per stored message, 17 MB → 153 MB over 108k messages, back to
/// 17 MB after a restart: issue 18).
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;
/// The smallest page cache accepted (below it redb reads the file for
/// nearly every lookup).
pub const MIN_CACHE_BYTES: u64 = 1 << 20;

static CACHE_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_CACHE_BYTES);

/// Sets the page cache of stores opened from now on in this process (at
/// least [`MIN_CACHE_BYTES`]).
pub fn set_cache_bytes(bytes: u64) {
    CACHE_BYTES.store(
        bytes.max(MIN_CACHE_BYTES),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The page cache of the stores this process opens.
pub fn cache_bytes() -> u64 {
    CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

impl RedbStore {
    /// Opens (creating if absent) the store file at `path`; refuses a file in use by
    /// another process, a corrupt file, or a redb file that is not a Capstan store.
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {shown}: {e}"));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| io("creating the directory of", e))?;
        }
        let lock = LockFile::acquire(path, &shown)?;
        let exists = match fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(StoreError::Io(format!("{shown} is a directory"))),
            // A store is created whole (`create_new`: a temporary file
            // renamed into place), so an empty file was truncated: refused,
            // not taken for a fresh store (that would silently drop
            // everything it held).
            Ok(m) if m.len() == 0 => {
                return Err(corrupt(
                    &shown,
                    "the file is empty (0 bytes); stores are never written empty, so it was truncated. Restore it from a backup, or move it away to start an empty store",
                ));
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io("reading", e)),
        };
        if exists {
            vet_existing(path, &shown)
                .and_then(|()| verify_pages(path, &shown))
                .map_err(with_restore_hint)?;
        } else {
            create_new(path, &shown)?;
        }
        let cache = usize::try_from(cache_bytes()).unwrap_or(usize::MAX);
        let db = quiet_unwind(|| Builder::new().set_cache_size(cache).create(path))
            .map_err(|_| corrupt(&shown, "redb failed opening the file (damaged pages)"))?
            .map_err(|e| open_error(e, &shown))?;
        let version = read_meta(&db, &shown)?;
        let db = Arc::new(db);
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let committer = {
            let db = db.clone();
            let describe = format!("redb:{shown}");
            std::thread::Builder::new()
                .name("capstan-committer".into())
                .spawn(move || Committer::new(db, version, describe).run(rx))
                .map_err(|e| io("starting the committer of", e))?
        };
        tracing::info!(path = %shown, version, "store opened");
        Ok(RedbStore {
            describe: format!("redb:{shown}"),
            db,
            queue: Some(queue),
            committer: Some(committer),
            snapshots: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            _lock: lock,
        })
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue lets the committer finish what is queued and exit.
        drop(self.queue.take());
        if let Some(handle) = self.committer.take()
            && handle.join().is_err()
        {
            tracing::error!(store = %self.describe, "committer thread panicked");
        }
        tracing::debug!(store = %self.describe, "store closed");
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let err = |e: redb::Error| backend_error(e, &self.describe);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        let rtx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = rtx.open_table(META).map_err(|e| err(e.into()))?;
        let version = version_of(&meta, &self.describe)?;
        let table = rtx.open_table(DATA).map_err(|e| err(e.into()))?;
        Ok(Box::new(RedbSnapshot {
            version,
            table,
            describe: self.describe.clone(),
        }))
    }

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        refuse_fills(&req, "redb")?;
        let bytes = validate(&req)?;
        let queue = self.queue.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send(Pending { req, bytes, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        // A committer that vanished mid-batch may or may not have committed it.
        let r = answer.await.map_err(|_| StoreError::MaybeCommitted)?;
        if r == Err(StoreError::Conflict) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("snapshots", get(&self.snapshots)),
            ("commits", get(&self.commits)),
            ("conflicts", get(&self.conflicts)),
        ]
    }
}

/// Checks the limits on a request coming straight to [`Store::commit`]; its mutation bytes.
/// Refuses a commit with numbers to fill in: a backend with no member to
/// fill them ([`crate::Transaction::fill`]).
pub(crate) fn refuse_fills(req: &CommitRequest, backend: &str) -> Result<(), StoreError> {
    match req.fills.is_empty() {
        true => Ok(()),
        false => Err(StoreError::FillUnavailable(format!(
            "the {backend} store has no member to fill numbers in"
        ))),
    }
}

pub(crate) fn validate(req: &CommitRequest) -> Result<usize, StoreError> {
    let mut total = 0usize;
    for m in &req.mutations {
        // A range end may be one byte longer than a key (`key\0`).
        let (key_len, max_len, value_len) = match m {
            Mutation::Set(k, v) => (k.len(), MAX_KEY_SIZE, v.len()),
            Mutation::Clear(k) => (k.len(), MAX_KEY_SIZE, 0),
            Mutation::ClearRange(b, e) => (b.len().max(e.len()), MAX_KEY_SIZE + 1, 0),
        };
        if key_len > max_len {
            return Err(StoreError::KeyTooLarge {
                len: key_len,
                max: MAX_KEY_SIZE,
            });
        }
        if value_len > MAX_VALUE_SIZE {
            return Err(StoreError::ValueTooLarge {
                len: value_len,
                max: MAX_VALUE_SIZE,
            });
        }
        total += m.size();
    }
    if total > MAX_TRANSACTION_SIZE {
        return Err(StoreError::TransactionTooLarge {
            len: total,
            max: MAX_TRANSACTION_SIZE,
        });
    }
    Ok(total)
}

struct RedbSnapshot {
    version: Version,
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    describe: String,
}

#[async_trait::async_trait]
impl Snapshot for RedbSnapshot {
    fn version(&self) -> Version {
        self.version
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        guarded(&self.describe, || {
            let found = self
                .table
                .get(key)
                .map_err(|e| backend_error(e.into(), &self.describe))?;
            Ok(found.map(|v| v.value().to_vec()))
        })
    }

    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        guarded(&self.describe, || self.range_now(opt))
    }
}

impl RedbSnapshot {
    fn range_now(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        if opt.begin >= opt.end {
            return Ok(Vec::new());
        }
        let err = |e: StorageError| backend_error(e.into(), &self.describe);
        let iter = self
            .table
            .range::<&[u8]>(opt.begin.as_slice()..opt.end.as_slice())
            .map_err(err)?;
        let limit = if opt.limit == 0 {
            usize::MAX
        } else {
            opt.limit
        };
        let mut out = Vec::new();
        let mut push = |item: Result<_, StorageError>| -> Result<(), StoreError> {
            let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = item.map_err(err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
            Ok(())
        };
        if opt.reverse {
            for item in iter.rev().take(limit) {
                push(item)?;
            }
        } else {
            for item in iter.take(limit) {
                push(item)?;
            }
        }
        Ok(out)
    }
}

thread_local! {
    /// Set while this thread runs a redb call whose panic is caught.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind` for redb calls, which panic on some damaged pages: the
/// panic becomes an error here, so its message and backtrace are not
/// printed (the process-wide panic hook is wrapped once to stay silent on
/// this thread meanwhile; every other panic is reported as before).
fn quiet_unwind<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) {
                tracing::debug!("redb panicked on a damaged store: {info}");
            } else {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r
}

/// Runs a redb call, turning a panic (redb panics on some damaged pages)
/// into an error naming the store and what to do, so a damaged page fails
/// the one operation that met it instead of the task serving it.
fn guarded<T>(describe: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    quiet_unwind(f).unwrap_or_else(|_| {
        tracing::error!(store = %describe, "redb panicked reading the store: it is damaged");
        Err(corrupt(
            describe,
            format!("reading it failed inside redb (damaged pages); stop the node, {RESTORE_HINT}"),
        ))
    })
}

/// A transaction's read ranges, ordered to answer "does a write overlap
/// any of them" in O(log reads): a garbage-collection transaction reads a
/// thousand ranges and a batch it is checked against writes thousands,
/// which compared pairwise took the committer tens of milliseconds (every
/// other commit waiting behind it).
struct ReadIndex<'a> {
    /// Reads ordered by start.
    by_start: Vec<&'a (Vec<u8>, Vec<u8>)>,
    /// `max_end[i]`: the largest end among `by_start[..=i]`.
    max_end: Vec<&'a [u8]>,
}

impl<'a> ReadIndex<'a> {
    fn new(reads: &'a [(Vec<u8>, Vec<u8>)]) -> Self {
        let mut by_start: Vec<&(Vec<u8>, Vec<u8>)> = reads.iter().collect();
        by_start.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut max_end: Vec<&[u8]> = Vec::with_capacity(by_start.len());
        for r in &by_start {
            let m = match max_end.last() {
                Some(&m) if m >= r.1.as_slice() => m,
                _ => r.1.as_slice(),
            };
            max_end.push(m);
        }
        ReadIndex { by_start, max_end }
    }

    /// Whether `w` overlaps a read: some read starts before `w` ends and
    /// ends after `w` starts.
    fn overlaps(&self, w: &(Vec<u8>, Vec<u8>)) -> bool {
        let n = self.by_start.partition_point(|r| r.0 < w.1);
        n > 0 && self.max_end[n - 1] > w.0.as_slice()
    }
}

/// Writes recently committed, to check read-conflict ranges against (pure: time comes in).
#[derive(Debug)]
pub struct ConflictLog {
    batches: VecDeque<LoggedBatch>,
    entries: usize,
    /// Every write with a version above the horizon is in the log; reads at
    /// versions below it conflict conservatively.
    horizon: Version,
    window: Duration,
    max_entries: usize,
}

#[derive(Debug)]
struct LoggedBatch {
    version: Version,
    at: Instant,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The pairwise rule [`ReadIndex`] answers for many reads at once.
#[cfg(test)]
fn overlaps(a: &(Vec<u8>, Vec<u8>), b: &(Vec<u8>, Vec<u8>)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl ConflictLog {
    /// An empty log for a store at `version`, keeping writes for `window` and at most `max_entries` ranges.
    pub fn new(version: Version, window: Duration, max_entries: usize) -> Self {
        ConflictLog {
            batches: VecDeque::new(),
            entries: 0,
            horizon: version,
            window,
            max_entries,
        }
    }

    /// True if a transaction that read `reads` at `read_version` must be refused: a
    /// write logged with a later version, or one of `pending` (writes accepted
    /// earlier in the batch being built, all later than any read version), overlaps
    /// one of its reads; or its read version is older than the log.
    pub fn conflicts(
        &self,
        read_version: Version,
        reads: &[(Vec<u8>, Vec<u8>)],
        pending: &[(Vec<u8>, Vec<u8>)],
    ) -> bool {
        if reads.is_empty() {
            return false;
        }
        if read_version < self.horizon {
            return true;
        }
        let reads = ReadIndex::new(reads);
        let hit = |ranges: &[(Vec<u8>, Vec<u8>)]| ranges.iter().any(|w| reads.overlaps(w));
        if hit(pending) {
            return true;
        }
        self.batches
            .iter()
            .rev()
            .take_while(|b| b.version > read_version)
            .any(|b| hit(&b.ranges))
    }

    /// Records the writes of a committed batch, then forgets what is too old or too much.
    pub fn record(&mut self, version: Version, now: Instant, ranges: Vec<(Vec<u8>, Vec<u8>)>) {
        self.entries += ranges.len();
        self.batches.push_back(LoggedBatch {
            version,
            at: now,
            ranges,
        });
        while let Some(front) = self.batches.front() {
            let too_old = now.saturating_duration_since(front.at) > self.window;
            if !too_old && self.entries <= self.max_entries {
                break;
            }
            self.horizon = self.horizon.max(front.version);
            self.entries -= front.ranges.len();
            self.batches.pop_front();
        }
    }

    /// Reads at versions below this conflict conservatively.
    pub fn horizon(&self) -> Version {
        self.horizon
    }
}

struct Committer {
    db: Arc<Database>,
    version: Version,
    log: ConflictLog,
    describe: String,
}

impl Committer {
    fn new(db: Arc<Database>, version: Version, describe: String) -> Self {
        Committer {
            db,
            version,
            log: ConflictLog::new(version, CONFLICT_WINDOW, MAX_CONFLICT_ENTRIES),
            describe,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.bytes;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.bytes;
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
        tracing::debug!(store = %self.describe, version = self.version, "committer exits");
    }

    fn commit_batch(&mut self, batch: Vec<Pending>) {
        let version = self.version + 1;
        let mut accepted = Vec::with_capacity(batch.len());
        let mut written: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut replies: Vec<Option<Result<Version, StoreError>>> = Vec::with_capacity(batch.len());
        for p in &batch {
            if self
                .log
                .conflicts(p.req.read_version, &p.req.read_conflicts, &written)
            {
                tracing::debug!(
                    read_version = p.req.read_version,
                    horizon = self.log.horizon(),
                    version = self.version,
                    reads = p.req.read_conflicts.len(),
                    "commit refused: conflict"
                );
                replies.push(Some(Err(StoreError::Conflict)));
                continue;
            }
            written.extend(p.req.mutations.iter().map(Mutation::written_range));
            accepted.push(&p.req);
            replies.push(None);
        }
        let started = Instant::now();
        let result = if written.is_empty() {
            Ok(self.version)
        } else {
            match guarded(&self.describe, || self.apply(&accepted, version)) {
                Ok(()) => {
                    self.version = version;
                    self.log.record(version, Instant::now(), written);
                    Ok(version)
                }
                Err(e) => {
                    tracing::error!(store = %self.describe, error = %e, requests = accepted.len(), "batch commit failed");
                    Err(e)
                }
            }
        };
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            tracing::warn!(
                store = %self.describe,
                ms = took.as_millis() as u64,
                requests = accepted.len(),
                "slow commit: the disk took long to make a batch durable"
            );
        }
        tracing::trace!(
            size = batch.len(),
            accepted = accepted.len(),
            us = took.as_micros() as u64,
            "batch committed"
        );
        for (p, reply) in batch.into_iter().zip(replies) {
            // A waiter that went away no longer needs its answer.
            let _ = p.reply.send(reply.unwrap_or_else(|| result.clone()));
        }
    }

    fn apply(&self, requests: &[&CommitRequest], version: Version) -> Result<(), StoreError> {
        let err = |e: redb::Error| backend_error(e, &self.describe);
        let mut wtx = self.db.begin_write().map_err(|e| err(e.into()))?;
        wtx.set_durability(Durability::Immediate)
            .map_err(|e| err(e.into()))?;
        wtx.set_quick_repair(QUICK_REPAIR);
        {
            let mut data = wtx.open_table(DATA).map_err(|e| err(e.into()))?;
            for m in requests.iter().flat_map(|r| &r.mutations) {
                match m {
                    Mutation::Set(k, v) => data.insert(k.as_slice(), v.as_slice()).map(|_| ()),
                    Mutation::Clear(k) => data.remove(k.as_slice()).map(|_| ()),
                    Mutation::ClearRange(b, e) if b < e => {
                        data.retain_in::<&[u8], _>(b.as_slice()..e.as_slice(), |_, _| false)
                    }
                    Mutation::ClearRange(..) => Ok(()),
                }
                .map_err(|e| err(e.into()))?;
            }
            let mut meta = wtx.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert(VERSION_KEY, version.to_be_bytes().as_slice())
                .map_err(|e| err(e.into()))?;
        }
        wtx.commit().map_err(|e| err(e.into()))
    }
}

/// The exclusive lock on `<path>.lock`, held while the store is open.
struct LockFile {
    _file: File,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl LockFile {
    fn acquire(path: &Path, shown: &str) -> Result<Self, StoreError> {
        let lock_path = sibling(path, ".lock");
        let io =
            |e: std::io::Error| StoreError::Io(format!("lock file {}: {e}", lock_path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(io)?;
                writeln!(file, "{}", std::process::id()).map_err(io)?;
                Ok(LockFile { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The pid is informative only: an unreadable lock file still means "locked".
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "unknown" } else { holder };
                Err(StoreError::Locked {
                    path: shown.to_string(),
                    detail: format!("{} is held by pid {holder}", lock_path.display()),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

fn corrupt(shown: &str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: shown.to_string(),
        detail: detail.into(),
    }
}

fn backend_error(e: redb::Error, describe: &str) -> StoreError {
    match e {
        redb::Error::Corrupted(detail) => corrupt(describe, detail),
        redb::Error::DatabaseClosed => StoreError::Closed,
        other => StoreError::Io(format!("{describe}: {other}")),
    }
}

fn open_error(e: DatabaseError, shown: &str) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: shown.to_string(),
                detail: "redb reports the database already open".into(),
            }
        }
        DatabaseError::UpgradeRequired(v) => {
            corrupt(shown, format!("redb file format {v} is not supported"))
        }
        DatabaseError::Storage(StorageError::Corrupted(detail)) => corrupt(shown, detail),
        other => StoreError::Io(format!("opening {shown}: {other}")),
    }
}

/// The version stored in the meta table (after checking the format marker).
fn version_of(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    shown: &str,
) -> Result<Version, StoreError> {
    let err = |e: StorageError| backend_error(e.into(), shown);
    match meta.get(FORMAT_KEY).map_err(err)? {
        Some(v) if v.value() == FORMAT_VALUE => {}
        Some(v) => {
            return Err(corrupt(
                shown,
                format!(
                    "unknown store format {:?}",
                    String::from_utf8_lossy(v.value())
                ),
            ));
        }
        None => return Err(corrupt(shown, "not a Capstan store (no format marker)")),
    }
    let v = meta
        .get(VERSION_KEY)
        .map_err(err)?
        .ok_or_else(|| corrupt(shown, "no version in the meta table"))?;
    let bytes: [u8; 8] = v
        .value()
        .try_into()
        .map_err(|_| corrupt(shown, "malformed version in the meta table"))?;
    Ok(Version::from_be_bytes(bytes))
}

/// Opens the meta table of a read transaction and reads the version.
fn read_meta_of(rtx: &redb::ReadTransaction, shown: &str) -> Result<Version, StoreError> {
    let meta = match rtx.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(corrupt(
                shown,
                "a redb database but not a Capstan store (no capstan_meta table)",
            ));
        }
        Err(e) => return Err(open_table_error(e, shown)),
    };
    version_of(&meta, shown)
}

fn open_table_error(e: TableError, shown: &str) -> StoreError {
    match e {
        TableError::Storage(s) => backend_error(s.into(), shown),
        other => corrupt(shown, format!("unexpected table layout: {other}")),
    }
}

fn read_meta(db: &Database, shown: &str) -> Result<Version, StoreError> {
    let rtx = db
        .begin_read()
        .map_err(|e| backend_error(e.into(), shown))?;
    let version = read_meta_of(&rtx, shown)?;
    if let Err(e) = rtx.open_table(DATA) {
        return Err(open_table_error(e, shown));
    }
    Ok(version)
}

/// Checks an existing file without writing to it: redb magic, then (read-only) the marker.
fn vet_existing(path: &Path, shown: &str) -> Result<(), StoreError> {
    let mut head = [0u8; REDB_MAGIC.len()];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) if head == REDB_MAGIC => {}
        Ok(()) => return Err(corrupt(shown, "not a redb database (bad magic bytes)")),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(corrupt(shown, "not a redb database (file too short)"));
        }
        Err(e) => return Err(StoreError::Io(format!("reading {shown}: {e}"))),
    }
    let read_only = vet_with(shown, || Builder::new().open_read_only(path));
    match read_only {
        Err(StoreError::Corrupt { detail, .. }) if detail == NEEDS_REPAIR => {
            // Not closed cleanly (e.g. killed): redb refuses a read-only open. Let it
            // recover into an in-memory overlay of the file, so the file itself is only
            // written once it is known to be a Capstan store.
            tracing::warn!(path = %shown, "store was not closed cleanly; recovering");
            let overlay = CowBackend::open(path)
                .map_err(|e| StoreError::Io(format!("reading {shown}: {e}")))?;
            vet_with(shown, || Builder::new().create_with_backend(overlay))
        }
        other => other,
    }
}

const NEEDS_REPAIR: &str = "needs repair";

/// What a damaged store's error tells the operator to do.
pub const RESTORE_HINT: &str = "move the file away and restore the store from a backup (`capstan restore FILE`; `capstan backup FILE` makes one)";

/// A refusal of a damaged file says what to do (once).
fn with_restore_hint(e: StoreError) -> StoreError {
    match e {
        StoreError::Corrupt { path, detail } if !detail.contains("capstan restore") => {
            StoreError::Corrupt {
                path,
                detail: format!("{detail}; {RESTORE_HINT}"),
            }
        }
        other => other,
    }
}

/// Checks the checksum of every page of the file (redb's integrity check),
/// on a copy-on-write overlay so the file itself is never written: damage
/// anywhere is refused at start, before the node serves anything, instead
/// of surfacing later as a failed read (or, where it hits redb's own
/// structures, a panic). It reads the whole file once (about as long as
/// copying it).
fn verify_pages(path: &Path, shown: &str) -> Result<(), StoreError> {
    let started = Instant::now();
    let overlay =
        CowBackend::open(path).map_err(|e| StoreError::Io(format!("reading {shown}: {e}")))?;
    let checked = quiet_unwind(|| -> Result<bool, DatabaseError> {
        let mut db = Builder::new().create_with_backend(overlay)?;
        db.check_integrity()
    });
    let damaged = |detail: String| corrupt(shown, detail);
    match checked {
        Ok(Ok(true)) => {
            tracing::debug!(path = %shown, ms = started.elapsed().as_millis() as u64, "store pages verified");
            Ok(())
        }
        // redb could only make the file consistent by dropping what the
        // damaged pages held (e.g. rolling back to the commit before).
        Ok(Ok(false)) => Err(damaged(
            "pages of the file fail their checksums (damaged on disk)".into(),
        )),
        Ok(Err(e)) => Err(damaged(format!("its integrity check failed: {e}"))),
        Err(_) => Err(damaged(
            "its integrity check failed on damaged pages".into(),
        )),
    }
}

/// Opens a database with `open` (which must not write to the file) and checks the marker.
fn vet_with<D: ReadableDatabase>(
    shown: &str,
    open: impl FnOnce() -> Result<D, DatabaseError>,
) -> Result<(), StoreError> {
    let opened = quiet_unwind(|| -> Result<Result<(), StoreError>, DatabaseError> {
        let db = open()?;
        Ok(match db.begin_read() {
            Ok(rtx) => read_meta_of(&rtx, shown).map(|_| ()),
            Err(e) => Err(backend_error(e.into(), shown)),
        })
    })
    .map_err(|_| corrupt(shown, "redb failed reading the file (damaged pages)"))?;
    match opened {
        Ok(checked) => checked,
        Err(DatabaseError::RepairAborted) => Err(corrupt(shown, NEEDS_REPAIR)),
        Err(e) => Err(open_error(e, shown)),
    }
}

const COW_PAGE: u64 = 4096;

/// A redb storage backend over a file opened read-only, whose writes go to memory:
/// redb's crash recovery can run on it without touching the file.
#[derive(Debug)]
struct CowBackend {
    file: File,
    state: std::sync::Mutex<CowState>,
}

#[derive(Debug)]
struct CowState {
    len: u64,
    /// Bytes of the file at or after this offset read as zeros (the storage was truncated).
    visible: u64,
    pages: std::collections::HashMap<u64, Vec<u8>>,
}

impl CowBackend {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(CowBackend {
            file,
            state: std::sync::Mutex::new(CowState {
                len,
                visible: len,
                pages: Default::default(),
            }),
        })
    }

    fn state(&self) -> std::io::Result<std::sync::MutexGuard<'_, CowState>> {
        self.state
            .lock()
            .map_err(|_| std::io::Error::other("overlay lock poisoned"))
    }

    /// Reads file bytes at `offset` into `out`, zeros past the visible part.
    fn read_base(&self, visible: u64, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let avail = usize::try_from(visible.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(out.len());
        self.file.read_exact_at(&mut out[..avail], offset)?;
        out[avail..].fill(0);
        Ok(())
    }
}

impl redb::StorageBackend for CowBackend {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let st = self.state()?;
        if offset + out.len() as u64 > st.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the overlay",
            ));
        }
        let mut pos = 0usize;
        while pos < out.len() {
            let abs = offset + pos as u64;
            let (index, within) = (abs / COW_PAGE, (abs % COW_PAGE) as usize);
            let n = (COW_PAGE as usize - within).min(out.len() - pos);
            match st.pages.get(&index) {
                Some(page) => out[pos..pos + n].copy_from_slice(&page[within..within + n]),
                None => self.read_base(st.visible, abs, &mut out[pos..pos + n])?,
            }
            pos += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self.state()?;
        if len < st.len {
            st.visible = st.visible.min(len);
            st.pages.retain(|index, _| index * COW_PAGE < len);
            if let Some(page) = st.pages.get_mut(&(len / COW_PAGE)) {
                page[(len % COW_PAGE) as usize..].fill(0);
            }
        }
        st.len = len;
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.state()?;
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let (index, within) = (abs / COW_PAGE, (abs % COW_PAGE) as usize);
            let n = (COW_PAGE as usize - within).min(data.len() - pos);
            if !st.pages.contains_key(&index) {
                let mut page = vec![0; COW_PAGE as usize];
                self.read_base(st.visible, index * COW_PAGE, &mut page)?;
                st.pages.insert(index, page);
            }
            if let Some(page) = st.pages.get_mut(&index) {
                page[within..within + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        st.len = st.len.max(offset + data.len() as u64);
        Ok(())
    }
}

/// Creates and initialises a store under a temporary name, then renames it into place.
fn create_new(path: &Path, shown: &str) -> Result<(), StoreError> {
    let tmp = sibling(path, ".init");
    let io =
        |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", tmp.display()));
    match fs::remove_file(&tmp) {
        Ok(()) => {
            tracing::warn!(path = %tmp.display(), "removed the leftover of an interrupted store creation")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", e)),
    }
    {
        let db = Builder::new()
            .create(&tmp)
            .map_err(|e| open_error(e, shown))?;
        let err = |e: redb::Error| backend_error(e, shown);
        let mut wtx = db.begin_write().map_err(|e| err(e.into()))?;
        wtx.set_quick_repair(QUICK_REPAIR);
        {
            wtx.open_table(DATA).map_err(|e| err(e.into()))?;
            let mut meta = wtx.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert(FORMAT_KEY, FORMAT_VALUE)
                .map_err(|e| err(e.into()))?;
            meta.insert(VERSION_KEY, 0u64.to_be_bytes().as_slice())
                .map_err(|e| err(e.into()))?;
        }
        wtx.commit().map_err(|e| err(e.into()))?;
        db.close().map_err(|e| open_error(e, shown))?;
    }
    fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Io(format!("syncing the directory of {shown}: {e}")))?;
    }
    tracing::info!(path = %shown, "store created");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: &str, b: &str) -> (Vec<u8>, Vec<u8>) {
        (a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    #[test]
    fn indexed_reads_answer_as_the_pairwise_rule() {
        use proptest::prelude::*;
        let range = (
            proptest::collection::vec(0u8..4, 0..3),
            proptest::collection::vec(0u8..4, 0..3),
        );
        proptest!(|(reads in proptest::collection::vec(range.clone(), 0..12),
                    writes in proptest::collection::vec(range, 1..12))| {
            let index = ReadIndex::new(&reads);
            for w in &writes {
                prop_assert_eq!(
                    index.overlaps(w),
                    reads.iter().any(|r| overlaps(r, w)),
                    "reads {:?} write {:?}", reads, w
                );
            }
        });
    }

    #[test]
    fn conflict_log_checks_versions_pending_and_horizon() {
        let t0 = Instant::now();
        let mut log = ConflictLog::new(10, Duration::from_secs(5), 4);
        log.record(11, t0, vec![r("b", "b\0")]);
        log.record(12, t0, vec![r("d", "f")]);
        assert!(log.conflicts(10, &[r("a", "c")], &[]));
        assert!(
            !log.conflicts(11, &[r("a", "c")], &[]),
            "write at 11 is visible to a read at 11"
        );
        assert!(log.conflicts(11, &[r("e", "e\0")], &[]));
        assert!(
            !log.conflicts(11, &[r("f", "g")], &[]),
            "ranges are half-open"
        );
        assert!(
            log.conflicts(12, &[r("x", "y")], &[r("x", "x\0")]),
            "pending writes conflict"
        );
        assert!(
            !log.conflicts(12, &[], &[r("x", "x\0")]),
            "blind writes never conflict"
        );
        assert!(log.conflicts(9, &[r("x", "y")], &[]), "older than the log");
        // Entry cap: the oldest batches go and the horizon moves.
        log.record(13, t0, vec![r("m", "n"), r("o", "p"), r("q", "r")]);
        assert_eq!(log.horizon(), 11);
        assert!(log.conflicts(10, &[r("x", "y")], &[]));
        // Age: everything older than the window goes.
        log.record(14, t0 + Duration::from_secs(6), vec![]);
        assert_eq!(log.horizon(), 13);
        assert!(!log.conflicts(13, &[r("a", "z")], &[]));
    }

    #[test]
    fn validate_rejects_oversized_requests() {
        let req = |m| CommitRequest {
            facts: Default::default(),
            fills: Vec::new(),
            read_version: 0,
            read_conflicts: vec![],
            mutations: vec![m],
        };
        assert!(matches!(
            validate(&req(Mutation::Set(vec![0; MAX_KEY_SIZE + 2], vec![]))),
            Err(StoreError::KeyTooLarge { .. })
        ));
        assert!(matches!(
            validate(&req(Mutation::Set(vec![1], vec![0; MAX_VALUE_SIZE + 1]))),
            Err(StoreError::ValueTooLarge { .. })
        ));
        assert_eq!(validate(&req(Mutation::Clear(vec![1, 2]))), Ok(2));
    }
}
