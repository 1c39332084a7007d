//! The FoundationDB backend (cargo feature `fdb`): a FoundationDB 7.1 or 7.3
//! cluster, through the `libfdb_c` client library (API version 710).
//!
//! # Spec
//!
//! `fdb:[CLUSTER_FILE][?prefix=NAME]`, e.g. `fdb:/etc/foundationdb/fdb.cluster`.
//! An empty `CLUSTER_FILE` (`fdb:`) lets the client library find the cluster
//! file as it always does: `$FDB_CLUSTER_FILE`, then `./fdb.cluster`, then the
//! system default (`/etc/foundationdb/fdb.cluster` on Linux). A path containing
//! `?` is not supported. `NAME` (default `capstan`) is 1 to [`MAX_PREFIX_LEN`]
//! characters of `A-Z a-z 0-9 . _ -`; stores with different names are
//! independent and never overlap (the tests give each check a name of its own).
//!
//! # Layout
//!
//! With `S` the name's bytes:
//!
//! - `S 0x00 KEY`: the value of user key `KEY` (raw bytes, no header);
//! - `S 0x01 V ID`: commit markers (below): `V` the commit's read version
//!   (8 bytes, big-endian), `ID` 16 random bytes.
//!
//! Names are ASCII, so no store's keys start with another store's `S 0x00` or
//! `S 0x01`. A stored key is at most 8 bytes longer than the user key. Every
//! transaction sets FoundationDB's `raw_access` option, under which the client
//! accepts keys of up to 10,008 bytes (10,000 plus room for the 8-byte prefix
//! it gives tenants' keys), so user keys of [`crate::MAX_KEY_SIZE`] bytes fit.
//! Values are stored as they are: [`crate::MAX_VALUE_SIZE`] is FoundationDB's
//! own limit.
//!
//! # Versions and snapshots
//!
//! A [`Version`] is a FoundationDB version. A snapshot is a FoundationDB
//! transaction and its read version (`get_read_version`); its reads are
//! snapshot reads in that transaction (no conflict tracking: the snapshot is
//! never committed) with read-your-writes disabled. FoundationDB keeps
//! versions readable for about 5 seconds: reading an older snapshot fails
//! with `transaction_too_old`, reported as [`StoreError::Conflict`], which
//! [`crate::Db::transact`] retries on a new snapshot. Reads failing with other
//! retryable errors (`future_version`, `process_behind`, throttling) are
//! retried at the same version in a new transaction for up to
//! [`READ_RETRY_BUDGET`].
//!
//! A commit's version is its FoundationDB commit version. Transactions
//! committed in one batch share it; FoundationDB resolves a batch in order,
//! so such transactions do not conflict with each other and every snapshot
//! sees all of them or none: the trait's "strictly increasing" holds for
//! commits that could observe each other, not for unrelated concurrent ones.
//!
//! # Serializable commits
//!
//! A commit is one FoundationDB transaction whose read version is set to the
//! snapshot's (`set_read_version`), with a read-conflict range
//! (`add_conflict_range`) for each range of the request, the mutations, and its
//! commit marker. FoundationDB's resolvers then accept it only if nothing in
//! those ranges was written after the read version: exactly the trait's rule.
//! `not_committed` (and every other error FoundationDB calls "retryable, not
//! committed": `transaction_too_old`, `future_version`, proxy memory limits,
//! throttling) is reported as [`StoreError::Conflict`], which
//! [`crate::Db::transact`] retries with backoff. `transaction_too_large`,
//! `key_too_large` and `value_too_large` become the matching errors; since
//! FoundationDB counts conflict ranges (and the keys' prefixes) against its
//! 10,000,000-byte limit too, a transaction close to
//! [`crate::MAX_TRANSACTION_SIZE`] may be refused with
//! [`StoreError::TransactionTooLarge`]. Every request is bounded by
//! [`REQUEST_TIMEOUT`] (reads by a timer, so that a snapshot's transaction
//! has no deadline of its own; commits by FoundationDB's `timeout` option); a
//! cluster that does not answer in time is reported as [`StoreError::Io`]
//! naming the cluster file, except for a commit, whose outcome is then unknown
//! and resolved as below.
//!
//! # "Maybe committed"
//!
//! Each commit writes a unique marker key `S 0x01 V ID` whose value is the
//! transaction's versionstamp (`SetVersionstampedValue`: its commit version),
//! and adds a read-conflict range on that marker. When the commit fails with
//! `commit_unknown_result` (or `cluster_version_changed`, or times out while
//! committing), the committer resolves it in new transactions that read the
//! marker (a serializable read) and, if it is absent, write it as `a`
//! (aborted) and commit:
//!
//! - the marker holds a versionstamp: the commit was applied, at that version;
//! - the marker was absent and the abort committed: the lost commit can no
//!   longer apply (it read-conflicts on its marker, which was written after
//!   its read version), so the commit reports [`StoreError::Conflict`] and
//!   `Db::transact` runs it again;
//! - the marker says `a`: an earlier resolution fenced it (same as above);
//! - the abort conflicted: the lost commit applied meanwhile; read again.
//!
//! Nothing is ever applied twice. Resolution is retried (it is idempotent)
//! until [`RESOLVE_DEADLINE`] after the first send; only then is the outcome
//! reported as [`StoreError::MaybeCommitted`].
//!
//! Markers older than [`MARKER_TTL`] (measured in versions, FoundationDB's
//! clock: about 1,000,000 a second) are removed by a range clear that a
//! commit carries at most once per [`SWEEP_INTERVAL`] per process. A commit
//! is decided (applied or refused as too old) within seconds of its read
//! version, and resolved within [`RESOLVE_DEADLINE`], so a marker is never
//! needed after that.
//!
//! # The network thread
//!
//! The client library runs one network thread per process, started once and
//! never restarted. The first [`FdbStore::open`] selects API version 710 and
//! starts it (`foundationdb`'s `boot`); the guard that stops it lives in a
//! process-wide [`OnceLock`] for the rest of the process, and an `atexit`
//! handler stops the network thread and joins it when the process exits
//! (the client library must be stopped before exit). Nothing else in the
//! process may select an API version or start the network itself. These are
//! the module's two `unsafe` calls (the workspace denies `unsafe_code`).
//!
//! # Building and running
//!
//! The `foundationdb-sys` build script generates the bindings with bindgen,
//! which needs libclang (Debian: `libclang-dev`); the C headers come with the
//! crate. Linking needs `libfdb_c` (FoundationDB's client package,
//! `foundationdb-clients`; `FDB_CLIENT_LIB_PATH` names a directory holding it),
//! and a binary built with the feature needs that library at run time even
//! for other store specs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{ConflictRangeType, MutationType, StreamingMode, TransactionOption};
use foundationdb::{Database, FdbError, KeySelector};

use crate::store::{
    CommitRequest, KeyValue, MAX_KEY_SIZE, MAX_VALUE_SIZE, Mutation, RangeOption, Snapshot, Store,
    StoreError, Version, key_after,
};

/// Default store name (key prefix).
pub const DEFAULT_PREFIX: &str = "capstan";
/// Longest store name: with its tag byte, a prefix fits the 8 bytes
/// FoundationDB allows beyond 10,000 in a raw-access key.
pub const MAX_PREFIX_LEN: usize = 7;
/// Bound on each FoundationDB transaction (its `timeout` option).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time within which a read failing with a retryable error is retried.
pub const READ_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// Resolving an ambiguous commit must finish within this time of its send.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(30);
/// Commit markers older than this (in versions) are removed.
pub const MARKER_TTL: Duration = Duration::from_secs(600);
/// A process sweeps old markers at most this often (in versions).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// FoundationDB's versions per second (the server knob `VERSIONS_PER_SECOND`).
pub const VERSIONS_PER_SECOND: u64 = 1_000_000;
/// FoundationDB's default transaction size limit (mutations and conflict ranges).
pub const FDB_TRANSACTION_SIZE_LIMIT: usize = 10_000_000;

/// Tag byte after the prefix of user data keys.
const DATA_TAG: u8 = 0x00;
/// Tag byte after the prefix of commit markers.
const MARKER_TAG: u8 = 0x01;
/// Value of a marker written by a resolution that fenced its commit.
const MARKER_ABORTED: &[u8] = b"a";
/// Bytes of a versionstamp: 8 of commit version, 2 of order in the batch.
const VERSIONSTAMP_LEN: usize = 10;
/// `SetVersionstampedValue` operand: a 10-byte placeholder at offset 0
/// (the offset as 4 bytes little-endian, API version 520 and later).
const VERSIONSTAMP_OPERAND: [u8; VERSIONSTAMP_LEN + 4] = [0; VERSIONSTAMP_LEN + 4];
/// Bytes FoundationDB counts per conflict range or mutation on top of its keys (estimate).
const RANGE_OVERHEAD: usize = 1;

/// FoundationDB error codes the backend tells apart.
mod code {
    pub const TRANSACTION_CANCELLED: i32 = 1025;
    pub const TRANSACTION_TIMED_OUT: i32 = 1031;
    pub const TRANSACTION_TOO_OLD: i32 = 1007;
    pub const TRANSACTION_TOO_LARGE: i32 = 2101;
    pub const KEY_TOO_LARGE: i32 = 2102;
    pub const VALUE_TOO_LARGE: i32 = 2103;
}

/// What a spec (`fdb:…`) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbConfig {
    /// The cluster file, or `None` for the client library's default.
    pub cluster_file: Option<String>,
    /// The store's name: the prefix of its keys.
    pub prefix: String,
}

impl FdbConfig {
    /// Parses `fdb:[CLUSTER_FILE][?prefix=NAME]`.
    pub fn parse(spec: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| {
            StoreError::Io(format!(
                "bad FoundationDB store spec {spec:?}: {why}; expected fdb:[CLUSTER_FILE][?prefix=NAME]"
            ))
        };
        let rest = spec
            .strip_prefix("fdb:")
            .ok_or_else(|| bad("it does not start with fdb:"))?;
        let (file, query) = match rest.split_once('?') {
            Some((f, q)) => (f, Some(q)),
            None => (rest, None),
        };
        if file.contains('\0') {
            return Err(bad("the cluster file's path contains a NUL byte"));
        }
        let mut prefix = DEFAULT_PREFIX.to_string();
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("prefix", p)) => {
                    if p.is_empty()
                        || p.len() > MAX_PREFIX_LEN
                        || !p
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    {
                        return Err(bad(&format!(
                            "the prefix must be 1 to {MAX_PREFIX_LEN} characters of A-Z a-z 0-9 . _ -"
                        )));
                    }
                    prefix = p.to_string();
                }
                _ => return Err(bad(&format!("unknown option {kv:?}"))),
            }
        }
        Ok(FdbConfig {
            cluster_file: (!file.is_empty()).then(|| file.to_string()),
            prefix,
        })
    }

    /// The spec back (`fdb:CLUSTER_FILE`, with `?prefix=NAME` unless the default).
    pub fn spec(&self) -> String {
        let mut s = format!("fdb:{}", self.cluster_file.as_deref().unwrap_or(""));
        if self.prefix != DEFAULT_PREFIX {
            s.push_str("?prefix=");
            s.push_str(&self.prefix);
        }
        s
    }

    /// The cluster file as shown in messages.
    fn cluster_file_name(&self) -> &str {
        self.cluster_file
            .as_deref()
            .unwrap_or("(the default cluster file)")
    }
}

// ------------------------------------------------------------ network thread

/// The running network thread: the guard whose drop stops and joins it.
struct Network {
    guard: Mutex<Option<NetworkAutoStop>>,
}

/// The process's network thread, started by the first [`FdbStore::open`].
static NETWORK: OnceLock<Result<Network, String>> = OnceLock::new();

/// Starts the network thread once per process; an error is remembered (the
/// client library cannot be initialised twice).
fn network() -> Result<(), StoreError> {
    match NETWORK.get_or_init(boot) {
        Ok(net) => match net.guard.lock() {
            Ok(g) if g.is_some() => Ok(()),
            _ => Err(StoreError::Closed),
        },
        Err(e) => Err(StoreError::Io(e.clone())),
    }
}

/// Selects the API version and starts the network thread.
#[allow(unsafe_code)]
fn boot() -> Result<Network, String> {
    // `build` panics if an API version was already selected in this process.
    let builder = std::panic::catch_unwind(|| FdbApiBuilder::default().build())
        .map_err(|_| {
            "the FoundationDB client was already initialised in this process by other code"
                .to_string()
        })?
        .map_err(|e| {
            format!(
                "cannot initialise the FoundationDB client library (API version 710): {} (error {}); is libfdb_c 7.1 or newer installed?",
                e.message(),
                e.code()
            )
        })?;
    // SAFETY: `boot` requires the returned guard to be dropped before the
    // process exits. It is kept in NETWORK and dropped by the atexit handler
    // registered below (an aborted process needs nothing).
    let guard = unsafe { builder.boot() }.map_err(|e| {
        format!(
            "cannot start the FoundationDB network thread: {} (error {})",
            e.message(),
            e.code()
        )
    })?;
    // SAFETY: the handler is a plain `extern "C" fn` that catches every panic.
    if unsafe { libc::atexit(stop_network_at_exit) } != 0 {
        tracing::warn!("cannot register the FoundationDB network stop at exit");
    }
    tracing::debug!("FoundationDB network thread started (API version 710)");
    Ok(Network {
        guard: Mutex::new(Some(guard)),
    })
}

/// Stops the network thread and joins it (atexit).
extern "C" fn stop_network_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(net)) = NETWORK.get()
            && let Ok(mut guard) = net.guard.try_lock()
        {
            drop(guard.take());
        }
    });
}

// ------------------------------------------------------------------ errors

/// The store error for a failed FoundationDB operation (`what`) on `cluster`.
fn to_store_error(e: FdbError, what: &str, cluster: &str) -> StoreError {
    if e.code() == code::TRANSACTION_TIMED_OUT {
        return no_answer(what, cluster);
    }
    if e.is_retryable_not_committed() {
        tracing::debug!(error = %e, code = e.code(), what, "FoundationDB asks to retry; reported as a conflict");
        return StoreError::Conflict;
    }
    if e.is_maybe_committed() {
        return StoreError::MaybeCommitted;
    }
    StoreError::Io(format!(
        "FoundationDB {what} failed on the cluster of {cluster}: {} (error {})",
        e.message(),
        e.code()
    ))
}

/// The error of a request the cluster did not answer within [`REQUEST_TIMEOUT`].
fn no_answer(what: &str, cluster: &str) -> StoreError {
    StoreError::Io(format!(
        "no answer from the FoundationDB cluster of {cluster} within {REQUEST_TIMEOUT:?} ({what}); is it running? fdbcli -C {cluster} --exec status"
    ))
}

/// True when a read failing with `e` may succeed at the same read version.
fn read_retryable(e: FdbError) -> bool {
    e.is_retryable() && e.code() != code::TRANSACTION_TOO_OLD && !e.is_maybe_committed()
}

/// True when a commit failing with `e` may or may not have been applied.
fn outcome_unknown(e: FdbError) -> bool {
    e.is_maybe_committed()
        || e.code() == code::TRANSACTION_TIMED_OUT
        || e.code() == code::TRANSACTION_CANCELLED
}

fn to_version(v: i64) -> Result<Version, StoreError> {
    Version::try_from(v)
        .map_err(|_| StoreError::Io(format!("FoundationDB returned a negative version {v}")))
}

fn timeout_ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
}

/// The commit version in a marker's value, if it is a versionstamp.
fn stamp_version(value: &[u8]) -> Option<Version> {
    if value.len() != VERSIONSTAMP_LEN {
        return None;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&value[..8]);
    Some(u64::from_be_bytes(v))
}

fn random_id() -> [u8; 16] {
    use std::hash::BuildHasher;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&n.to_le_bytes());
    h.update(&nanos.to_le_bytes());
    h.update(
        &std::collections::hash_map::RandomState::new()
            .hash_one(n)
            .to_le_bytes(),
    );
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

// ------------------------------------------------------------------- store

/// Key layout of one store (module docs).
#[derive(Debug, Clone)]
struct Layout {
    /// `S 0x00`.
    data: Vec<u8>,
    /// `S 0x01`.
    markers: Vec<u8>,
}

impl Layout {
    fn new(prefix: &str) -> Self {
        let p = prefix.as_bytes();
        Layout {
            data: [p, &[DATA_TAG]].concat(),
            markers: [p, &[MARKER_TAG]].concat(),
        }
    }

    /// The stored key of user key `key`.
    fn dk(&self, key: &[u8]) -> Vec<u8> {
        [self.data.as_slice(), key].concat()
    }

    /// A new marker key for a commit reading at `read_version`.
    fn marker(&self, read_version: Version) -> Vec<u8> {
        [
            self.markers.as_slice(),
            &read_version.to_be_bytes(),
            &random_id(),
        ]
        .concat()
    }

    /// End of the markers older than `cut` (a version): `[markers, end)` holds them.
    fn markers_before(&self, cut: Version) -> Vec<u8> {
        [self.markers.as_slice(), &cut.to_be_bytes()].concat()
    }

    /// The user key of stored key `k`.
    fn user_key<'k>(&self, k: &'k [u8]) -> Result<&'k [u8], StoreError> {
        k.strip_prefix(self.data.as_slice())
            .ok_or_else(|| StoreError::Corrupt {
                path: String::from_utf8_lossy(k).into_owned(),
                detail: "a range read returned a key outside the store's prefix".into(),
            })
    }
}

/// Bytes FoundationDB is expected to count for `req` (mutations with their
/// prefixed keys, write and read conflict ranges, the marker).
fn estimated_size(req: &CommitRequest, layout: &Layout) -> usize {
    let p = layout.data.len();
    let mut n = 0;
    for m in &req.mutations {
        n += match m {
            Mutation::Set(k, v) => (k.len() + p) * 3 + v.len() + RANGE_OVERHEAD,
            Mutation::Clear(k) => (k.len() + p) * 4 + 2 * RANGE_OVERHEAD,
            Mutation::ClearRange(b, e) => (b.len() + e.len() + 2 * p) * 2,
        };
    }
    for (b, e) in &req.read_conflicts {
        n += b.len() + e.len() + 2 * p;
    }
    n + 4 * (layout.markers.len() + 24) + VERSIONSTAMP_OPERAND.len()
}

/// How an ambiguous commit turned out.
enum Resolution {
    /// It was applied, at this version.
    Applied(Version),
    /// It was not applied and never will be.
    Fenced,
}

struct Inner {
    db: Database,
    config: FdbConfig,
    describe: String,
    layout: Layout,
    /// Read version of the last marker sweep claimed by this process.
    last_sweep: AtomicU64,
}

/// The FoundationDB backend (see the module docs).
pub struct FdbStore {
    inner: std::sync::Arc<Inner>,
}

impl FdbStore {
    /// Opens the store of `spec` (`fdb:…`, see the module docs), starting the
    /// client's network thread if needed, and checks that the cluster answers.
    pub async fn open(spec: &str) -> Result<Self, StoreError> {
        Self::open_config(FdbConfig::parse(spec)?).await
    }

    /// Opens the store described by `config` and checks that the cluster answers.
    pub async fn open_config(config: FdbConfig) -> Result<Self, StoreError> {
        network()?;
        let cluster = config.cluster_file_name().to_string();
        let db = Database::new(config.cluster_file.as_deref()).map_err(|e| {
            StoreError::Io(format!(
                "cannot open the FoundationDB cluster file {cluster}: {} (error {})",
                e.message(),
                e.code()
            ))
        })?;
        let inner = Inner {
            db,
            describe: config.spec(),
            layout: Layout::new(&config.prefix),
            config,
            last_sweep: AtomicU64::new(0),
        };
        let store = FdbStore {
            inner: std::sync::Arc::new(inner),
        };
        let (_, version) = store.inner.read_view().await.map_err(|e| match e {
            StoreError::Io(msg) => StoreError::Io(format!(
                "cannot reach the FoundationDB cluster of {cluster}: {msg}"
            )),
            e => e,
        })?;
        tracing::debug!(store = %store.inner.describe, version, "FoundationDB store opened");
        Ok(store)
    }

    /// The configuration this store was opened with.
    pub fn config(&self) -> &FdbConfig {
        &self.inner.config
    }
}

impl Inner {
    fn cluster(&self) -> &str {
        self.config.cluster_file_name()
    }

    fn err(&self, e: FdbError, what: &str) -> StoreError {
        to_store_error(e, what, self.cluster())
    }

    /// A transaction with raw access, cancelled after `timeout` if given.
    fn trx(&self, timeout: Option<Duration>) -> Result<foundationdb::Transaction, StoreError> {
        let trx = self
            .db
            .create_trx()
            .map_err(|e| self.err(e, "transaction creation"))?;
        trx.set_option(TransactionOption::RawAccess)
            .map_err(|e| self.err(e, "transaction setup"))?;
        if let Some(t) = timeout {
            trx.set_option(TransactionOption::Timeout(timeout_ms(t)))
                .map_err(|e| self.err(e, "transaction setup"))?;
        }
        Ok(trx)
    }

    /// A read-only transaction for snapshot reads, at `version` if given. It
    /// has no timeout of its own (a snapshot lives as long as FoundationDB
    /// serves its version): each read is bounded by [`Inner::bounded`].
    fn read_trx(&self, version: Option<Version>) -> Result<foundationdb::Transaction, StoreError> {
        let trx = self.trx(None)?;
        trx.set_option(TransactionOption::ReadYourWritesDisable)
            .map_err(|e| self.err(e, "transaction setup"))?;
        if let Some(v) = version {
            let v = i64::try_from(v)
                .map_err(|_| StoreError::Io(format!("version {v} is out of range")))?;
            trx.set_read_version(v);
        }
        Ok(trx)
    }

    /// `read` if it completes within [`REQUEST_TIMEOUT`].
    async fn bounded<T>(
        &self,
        what: &str,
        read: impl std::future::Future<Output = Result<T, FdbError>>,
    ) -> Result<Result<T, FdbError>, StoreError> {
        tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| no_answer(what, self.cluster()))
    }

    /// After a failed read: waits and returns `Ok` when it should be retried
    /// (same version, new transaction), the error otherwise.
    async fn retry_read(
        &self,
        e: FdbError,
        what: &str,
        started: Instant,
        delay: &mut Duration,
    ) -> Result<(), StoreError> {
        if !read_retryable(e) || started.elapsed() >= READ_RETRY_BUDGET {
            return Err(self.err(e, what));
        }
        tracing::debug!(error = %e, code = e.code(), what, "retrying a FoundationDB read");
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(Duration::from_millis(500));
        Ok(())
    }

    /// A read transaction and its read version (the latest).
    async fn read_view(&self) -> Result<(foundationdb::Transaction, Version), StoreError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        loop {
            let trx = self.read_trx(None)?;
            match self.bounded("read version", trx.get_read_version()).await? {
                Ok(v) => return Ok((trx, to_version(v)?)),
                Err(e) => {
                    self.retry_read(e, "read version", started, &mut delay)
                        .await?
                }
            }
        }
    }

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        crate::redb_store::refuse_fills(&req, "FoundationDB")?;
        crate::redb_store::validate(&req)?;
        let read_version = i64::try_from(req.read_version).map_err(|_| {
            StoreError::Io(format!("read version {} is out of range", req.read_version))
        })?;
        let layout = &self.layout;
        let trx = self.trx(Some(REQUEST_TIMEOUT))?;
        trx.set_read_version(read_version);
        let marker = layout.marker(req.read_version);
        let conflict = |b: &[u8], e: &[u8]| {
            trx.add_conflict_range(b, e, ConflictRangeType::Read)
                .map_err(|err| self.err(err, "adding a read-conflict range"))
        };
        for (b, e) in &req.read_conflicts {
            if b < e {
                conflict(&layout.dk(b), &layout.dk(e))?;
            }
        }
        // The fence of "maybe committed" resolution (module docs).
        conflict(&marker, &key_after(&marker))?;
        for m in &req.mutations {
            match m {
                Mutation::Set(k, v) => trx.set(&layout.dk(k), v),
                Mutation::Clear(k) => trx.clear(&layout.dk(k)),
                Mutation::ClearRange(b, e) => {
                    if b < e {
                        trx.clear_range(&layout.dk(b), &layout.dk(e));
                    }
                }
            }
        }
        trx.atomic_op(
            &marker,
            &VERSIONSTAMP_OPERAND,
            MutationType::SetVersionstampedValue,
        );
        if let Some(cut) = self.sweep_due(req.read_version) {
            tracing::debug!(before = cut, "removing old commit markers");
            trx.clear_range(&layout.markers, &layout.markers_before(cut));
        }
        let sent = Instant::now();
        match trx.commit().await {
            Ok(committed) => committed
                .committed_version()
                .map_err(|e| self.err(e, "reading the commit version"))
                .and_then(to_version),
            Err(e) => {
                let e = FdbError::from(e);
                if outcome_unknown(e) {
                    tracing::info!(error = %e, code = e.code(), "commit outcome unknown; resolving it with its marker");
                    return self.resolve(&marker, sent).await;
                }
                Err(match e.code() {
                    code::TRANSACTION_TOO_LARGE => StoreError::TransactionTooLarge {
                        len: estimated_size(&req, layout),
                        max: FDB_TRANSACTION_SIZE_LIMIT,
                    },
                    code::KEY_TOO_LARGE => StoreError::KeyTooLarge {
                        len: longest_key(&req),
                        max: MAX_KEY_SIZE,
                    },
                    code::VALUE_TOO_LARGE => StoreError::ValueTooLarge {
                        len: longest_value(&req),
                        max: MAX_VALUE_SIZE,
                    },
                    _ => self.err(e, "commit"),
                })
            }
        }
    }

    /// The cut version if this commit should sweep old markers (claimed: at
    /// most one commit per [`SWEEP_INTERVAL`] in this process).
    fn sweep_due(&self, read_version: Version) -> Option<Version> {
        let interval = SWEEP_INTERVAL.as_secs() * VERSIONS_PER_SECOND;
        let ttl = MARKER_TTL.as_secs() * VERSIONS_PER_SECOND;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if read_version < last.saturating_add(interval) {
            return None;
        }
        self.last_sweep
            .compare_exchange(last, read_version, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        read_version.checked_sub(ttl).filter(|cut| *cut > 0)
    }

    /// Decides an ambiguous commit by its marker, fencing it if absent.
    async fn resolve(&self, marker: &[u8], sent: Instant) -> Result<Version, StoreError> {
        let mut delay = Duration::from_millis(10);
        loop {
            let left = RESOLVE_DEADLINE.saturating_sub(sent.elapsed());
            if left.is_zero() {
                tracing::warn!(
                    "cannot resolve an ambiguous commit in time; reporting it as maybe committed"
                );
                return Err(StoreError::MaybeCommitted);
            }
            match self.resolve_once(marker, left.min(REQUEST_TIMEOUT)).await {
                Ok(Resolution::Applied(v)) => {
                    tracing::info!(version = v, "ambiguous commit was applied");
                    return Ok(v);
                }
                Ok(Resolution::Fenced) => {
                    tracing::info!(
                        "ambiguous commit was not applied; fenced it, the transaction retries"
                    );
                    return Err(StoreError::Conflict);
                }
                Err(msg) => {
                    tracing::debug!(error = %msg, "resolving an ambiguous commit failed; retrying");
                    tokio::time::sleep(delay.min(left)).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One attempt at resolving: read the marker; if absent, write the abort
    /// marker (the read makes this conflict with a late write of the marker).
    async fn resolve_once(&self, marker: &[u8], timeout: Duration) -> Result<Resolution, String> {
        let trx = self.trx(Some(timeout)).map_err(|e| e.to_string())?;
        let seen = trx
            .get(marker, false)
            .await
            .map_err(|e| format!("marker read: {e} (error {})", e.code()))?;
        if let Some(value) = seen {
            return Ok(match stamp_version(&value) {
                Some(v) => Resolution::Applied(v),
                // Fenced by an earlier resolution of this same commit.
                None => Resolution::Fenced,
            });
        }
        trx.set(marker, MARKER_ABORTED);
        trx.commit().await.map_err(|e| {
            let e = FdbError::from(e);
            format!("abort marker commit: {e} (error {})", e.code())
        })?;
        Ok(Resolution::Fenced)
    }
}

fn longest_key(req: &CommitRequest) -> usize {
    req.mutations
        .iter()
        .map(|m| match m {
            Mutation::Set(k, _) | Mutation::Clear(k) => k.len(),
            Mutation::ClearRange(b, e) => b.len().max(e.len()),
        })
        .max()
        .unwrap_or(0)
}

fn longest_value(req: &CommitRequest) -> usize {
    req.mutations
        .iter()
        .map(|m| match m {
            Mutation::Set(_, v) => v.len(),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl Store for FdbStore {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        let (trx, version) = self.inner.read_view().await?;
        Ok(Box::new(FdbSnapshot {
            inner: self.inner.clone(),
            trx,
            version,
        }))
    }

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        let started = Instant::now();
        let r = self.inner.commit(req).await;
        tracing::trace!(elapsed = ?started.elapsed(), ok = r.is_ok(), "FoundationDB commit");
        r
    }
}

struct FdbSnapshot {
    inner: std::sync::Arc<Inner>,
    /// The transaction holding the read version (reads are snapshot reads).
    trx: foundationdb::Transaction,
    version: Version,
}

#[async_trait::async_trait]
impl Snapshot for FdbSnapshot {
    fn version(&self) -> Version {
        self.version
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.inner.layout.dk(key);
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        let mut retry: Option<foundationdb::Transaction> = None;
        loop {
            let trx = retry.as_ref().unwrap_or(&self.trx);
            match self.inner.bounded("read", trx.get(&k, true)).await? {
                Ok(v) => return Ok(v.map(|v| v.to_vec())),
                Err(e) => {
                    self.inner
                        .retry_read(e, "read", started, &mut delay)
                        .await?;
                    retry = Some(self.inner.read_trx(Some(self.version))?);
                }
            }
        }
    }

    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        if opt.begin >= opt.end {
            return Ok(Vec::new());
        }
        let layout = &self.inner.layout;
        let mut range = foundationdb::RangeOption {
            limit: (opt.limit > 0).then_some(opt.limit),
            mode: StreamingMode::WantAll,
            reverse: opt.reverse,
            ..foundationdb::RangeOption::from((
                KeySelector::first_greater_or_equal(layout.dk(&opt.begin)),
                KeySelector::first_greater_or_equal(layout.dk(&opt.end)),
            ))
        };
        let mut out: Vec<KeyValue> = Vec::new();
        let started = Instant::now();
        let mut delay = Duration::from_millis(5);
        let mut retry: Option<foundationdb::Transaction> = None;
        let mut iteration = 1;
        loop {
            let trx = retry.as_ref().unwrap_or(&self.trx);
            let page = match self
                .inner
                .bounded("range read", trx.get_range(&range, iteration, true))
                .await?
            {
                Ok(page) => page,
                Err(e) => {
                    self.inner
                        .retry_read(e, "range read", started, &mut delay)
                        .await?;
                    retry = Some(self.inner.read_trx(Some(self.version))?);
                    continue;
                }
            };
            for kv in &page {
                out.push((layout.user_key(kv.key())?.to_vec(), kv.value().to_vec()));
            }
            match range.next_range(&page) {
                Some(next) => {
                    range = next;
                    iteration += 1;
                }
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let c = FdbConfig::parse("fdb:/etc/foundationdb/fdb.cluster").unwrap();
        assert_eq!(
            c.cluster_file.as_deref(),
            Some("/etc/foundationdb/fdb.cluster")
        );
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.spec(), "fdb:/etc/foundationdb/fdb.cluster");
        let c = FdbConfig::parse("fdb:").unwrap();
        assert_eq!(c.cluster_file, None);
        assert_eq!(c.spec(), "fdb:");
        let c = FdbConfig::parse("fdb:?prefix=t-1.x_").unwrap();
        assert_eq!(
            (c.cluster_file.as_deref(), c.prefix.as_str()),
            (None, "t-1.x_")
        );
        assert_eq!(c.spec(), "fdb:?prefix=t-1.x_");
        let c = FdbConfig::parse("fdb:a/fdb.cluster?prefix=abc").unwrap();
        assert_eq!(c.spec(), "fdb:a/fdb.cluster?prefix=abc");
        for bad in [
            "redb:/x",
            "fdb:/x?prefix=",
            "fdb:/x?prefix=12345678",
            "fdb:/x?prefix=a/b",
            "fdb:/x?prefix=a\u{1}",
            "fdb:/x?other=1",
            "fdb:/x\0y",
        ] {
            let e = FdbConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("fdb:[CLUSTER_FILE]"), "{bad}: {e}");
        }
    }

    #[test]
    fn layout_keeps_stores_and_markers_apart() {
        let a = Layout::new("ab");
        let b = Layout::new("abc");
        assert_eq!(a.dk(b"k"), b"ab\x00k");
        // The largest user key still fits FoundationDB's raw-access limit.
        assert!(Layout::new("capstan").dk(&[0; MAX_KEY_SIZE]).len() <= 10_008);
        assert!(
            Layout::new(&"x".repeat(MAX_PREFIX_LEN))
                .dk(&[0; MAX_KEY_SIZE])
                .len()
                <= 10_008
        );
        // Every data key of a sorts before its markers; b's keys are elsewhere.
        let top = a.dk(&[0xFF; MAX_KEY_SIZE + 1]);
        let m = a.marker(7);
        assert!(top < m && m.starts_with(&a.markers));
        for k in [b.dk(b""), b.dk(&[0xFF; 4]), b.marker(1)] {
            assert!(!k.starts_with(&a.data) && !k.starts_with(&a.markers));
        }
        assert_eq!(a.user_key(&a.dk(b"xyz")).unwrap(), b"xyz");
        assert!(a.user_key(&b.dk(b"xyz")).is_err());
    }

    #[test]
    fn markers_sort_by_version_for_the_sweep() {
        let l = Layout::new(DEFAULT_PREFIX);
        let cut = l.markers_before(1_000);
        assert!(l.marker(999) < cut);
        assert!(l.marker(1_000) >= cut);
        assert!(l.markers < l.marker(0));
        assert_ne!(l.marker(5), l.marker(5), "marker ids are unique");
    }

    #[test]
    fn versionstamps_decode() {
        let mut stamp = 0x0102_0304_0506_0708u64.to_be_bytes().to_vec();
        stamp.extend_from_slice(&[0, 3]);
        assert_eq!(stamp_version(&stamp), Some(0x0102_0304_0506_0708));
        assert_eq!(stamp_version(MARKER_ABORTED), None);
        // The operand: 10 placeholder bytes, then offset 0 (4 bytes LE).
        assert_eq!(VERSIONSTAMP_OPERAND.len(), 14);
        assert!(VERSIONSTAMP_OPERAND.iter().all(|b| *b == 0));
    }

    #[test]
    fn estimated_size_counts_prefixes_and_conflicts() {
        let l = Layout::new(DEFAULT_PREFIX);
        let req = CommitRequest {
            facts: Default::default(),
            fills: Vec::new(),
            read_version: 1,
            read_conflicts: vec![(b"a".to_vec(), b"b".to_vec())],
            mutations: vec![Mutation::Set(b"k".to_vec(), vec![0; 100])],
        };
        assert!(estimated_size(&req, &l) > 100 + 3 * (1 + l.data.len()));
    }

    /// Against a live cluster (`CAPSTAN_FDB_CLUSTER_FILE`; skipped without it):
    /// an ambiguous commit that never applied is fenced by its resolution (the
    /// lost transaction arriving late is refused), one that applied is
    /// reported at its version.
    #[tokio::test]
    async fn ambiguous_commits_resolve_by_marker() {
        let Ok(file) = std::env::var("CAPSTAN_FDB_CLUSTER_FILE") else {
            eprintln!(
                "skipped: set CAPSTAN_FDB_CLUSTER_FILE to the cluster file of a running cluster"
            );
            return;
        };
        let prefix: String = random_id()[..3]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let store = FdbStore::open(&format!("fdb:{file}?prefix=r{prefix}"))
            .await
            .unwrap();
        let inner = &store.inner;
        let snap = store.snapshot().await.unwrap();
        let rv = snap.version();
        // A commit whose outcome is lost before it reaches the cluster.
        let lost = inner.layout.marker(rv);
        let late = inner.trx(Some(REQUEST_TIMEOUT)).unwrap();
        late.set_read_version(i64::try_from(rv).unwrap());
        late.add_conflict_range(&lost, &key_after(&lost), ConflictRangeType::Read)
            .unwrap();
        late.set(&inner.layout.dk(b"late"), b"x");
        late.atomic_op(
            &lost,
            &VERSIONSTAMP_OPERAND,
            MutationType::SetVersionstampedValue,
        );
        assert_eq!(
            inner.resolve(&lost, Instant::now()).await,
            Err(StoreError::Conflict)
        );
        assert!(late.commit().await.is_err(), "a fenced commit applied");
        assert_eq!(
            inner.resolve(&lost, Instant::now()).await,
            Err(StoreError::Conflict)
        );
        // A commit applied before its answer was lost: reported at its version.
        let applied = inner.layout.marker(rv);
        let ok = inner.trx(Some(REQUEST_TIMEOUT)).unwrap();
        ok.set(&inner.layout.dk(b"applied"), b"x");
        ok.atomic_op(
            &applied,
            &VERSIONSTAMP_OPERAND,
            MutationType::SetVersionstampedValue,
        );
        let version = to_version(ok.commit().await.unwrap().committed_version().unwrap()).unwrap();
        assert_eq!(inner.resolve(&applied, Instant::now()).await, Ok(version));
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.get(b"late").await.unwrap(), None);
        assert_eq!(snap.get(b"applied").await.unwrap(), Some(b"x".to_vec()));
    }
}
