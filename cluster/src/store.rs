//! The `Store` trait (backend) and the `Db` handle (retried transactions).
//!
//! The model is FoundationDB's: a [`Transaction`] reads from a [`Snapshot`] taken
//! at one [`Version`], buffers its writes (and sees them: read-your-writes), and
//! records the key ranges it read. Committing hands the read-conflict ranges and
//! the mutations to the backend ([`Store::commit`]), which accepts the commit only
//! if nothing in those ranges was written after the read version. [`Db::transact`]
//! retries conflicting transactions with bounded, jittered exponential backoff.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A commit version. Strictly increasing with every commit of a store.
pub type Version = u64;
/// A key and its value, as returned by range reads.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Largest key accepted (FoundationDB's limit).
pub const MAX_KEY_SIZE: usize = 10_000;
/// Largest single value accepted (FoundationDB's limit); larger values go through [`crate::blob`].
pub const MAX_VALUE_SIZE: usize = 100_000;
/// Largest transaction accepted: sum of key and value sizes of its mutations.
pub const MAX_TRANSACTION_SIZE: usize = 10_000_000;
/// First byte of the keys reserved for the system: user transactions cannot write them.
pub const SYSTEM_KEY_PREFIX: u8 = 0xFF;
/// Default number of attempts of [`Db::transact`] before [`StoreError::TooManyRetries`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 100;

/// Errors of the store. Every variant says what the caller should do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// A key longer than [`MAX_KEY_SIZE`]; nothing was written.
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge {
        /// Size of the rejected key.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value longer than [`MAX_VALUE_SIZE`]; nothing was written. Use `blob` for large values.
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Size of the rejected value.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The transaction's mutations exceed [`MAX_TRANSACTION_SIZE`]; nothing was written.
    #[error("transaction of {len} bytes exceeds the limit of {max} bytes")]
    TransactionTooLarge {
        /// Size the transaction would have reached.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The transaction writes more keys or ranges than the backend takes in one
    /// commit (etcd: `--max-txn-ops`, 128 by default); nothing was written.
    #[error(
        "transaction writes {len} keys or ranges, more than the {max} the store takes in one commit; split it into several transactions"
    )]
    TooManyWrites {
        /// Writes the transaction needed (with the backend's own).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A write to a key starting with `0xFF` (reserved for the system); nothing was written.
    #[error("keys starting with 0xFF are reserved for the system; nothing was written")]
    ReservedKey,
    /// A blob larger than [`crate::blob::MAX_BLOB_SIZE`]; nothing was written.
    #[error("blob of {len} bytes exceeds the limit of {max} bytes; nothing was written")]
    BlobTooLarge {
        /// Size of the rejected blob.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another transaction wrote something this one read; retry (done by [`Db::transact`]).
    #[error("transaction conflicted with a concurrent commit; retry")]
    Conflict,
    /// The commit may or may not have been applied (connection lost during commit).
    #[error("commit outcome unknown (maybe committed); retry idempotently")]
    MaybeCommitted,
    /// [`Db::transact`] gave up after this many conflicting attempts.
    #[error(
        "transaction still conflicting after {attempts} attempts; the store is overloaded, try again later"
    )]
    TooManyRetries {
        /// Attempts made.
        attempts: u32,
    },
    /// The store is already opened by another process.
    #[error("store {path} is in use by another process ({detail}); stop it first")]
    Locked {
        /// The store's path.
        path: String,
        /// Who holds it, as far as known.
        detail: String,
    },
    /// The store file is corrupt, or is not a Capstan store.
    #[error("store {path} is corrupt or not a Capstan store: {detail}")]
    Corrupt {
        /// The store's path (or the key whose value is corrupt).
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// An I/O or backend failure.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The store was closed.
    #[error("store is closed")]
    Closed,
    /// A commit with numbers to fill in ([`Transaction::fill`]) found no
    /// member to fill them now; nothing was written: commit it again with
    /// numbers of its own.
    #[error("no store member fills numbers in now ({0}); nothing was written")]
    FillUnavailable(String),
}

impl StoreError {
    /// True when retrying the whole transaction may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict | StoreError::MaybeCommitted)
    }
}

/// Error types usable in [`Db::transact`] closures: they wrap store errors,
/// and expose them so `transact` can retry conflicts.
pub trait TxnError: From<StoreError> {
    /// The store error inside, if this is one.
    fn as_store_error(&self) -> Option<&StoreError>;
}

impl TxnError for StoreError {
    fn as_store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

/// Range read options: keys in `[begin, end)`, at most `limit` (0 = no limit), optionally reversed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeOption {
    /// First key of the range (included).
    pub begin: Vec<u8>,
    /// End of the range (excluded).
    pub end: Vec<u8>,
    /// Most pairs returned; 0 means no limit.
    pub limit: usize,
    /// Return pairs in descending key order (the limit then keeps the last keys).
    pub reverse: bool,
}

impl RangeOption {
    /// All keys in `[begin, end)`, ascending, no limit.
    pub fn new(begin: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        RangeOption {
            begin: begin.into(),
            end: end.into(),
            limit: 0,
            reverse: false,
        }
    }
    /// The same range with at most `limit` pairs (0 = no limit).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
    /// The same range in descending (`true`) or ascending order.
    pub fn reversed(mut self, reverse: bool) -> Self {
        self.reverse = reverse;
        self
    }
}

/// One mutation of a commit, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Sets a key to a value.
    Set(Vec<u8>, Vec<u8>),
    /// Removes a key.
    Clear(Vec<u8>),
    /// Removes every key in `[begin, end)`.
    ClearRange(Vec<u8>, Vec<u8>),
}

impl Mutation {
    /// The key range `[begin, end)` this mutation writes.
    pub fn written_range(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Mutation::Set(k, _) | Mutation::Clear(k) => (k.clone(), key_after(k)),
            Mutation::ClearRange(b, e) => (b.clone(), e.clone()),
        }
    }
    /// Bytes counted against [`MAX_TRANSACTION_SIZE`].
    pub fn size(&self) -> usize {
        match self {
            Mutation::Set(k, v) => k.len() + v.len(),
            Mutation::Clear(k) => k.len(),
            Mutation::ClearRange(b, e) => b.len() + e.len(),
        }
    }
}

/// A consistent read view at one version.
#[async_trait::async_trait]
pub trait Snapshot: Send + Sync {
    /// The version this snapshot reads at: it sees exactly the commits with versions `<=` it.
    fn version(&self) -> Version;
    /// The value of `key`, if any.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The value of `key` for a read the commit will check (the key is in
    /// the transaction's read set, [`Transaction::get`]): a backend may
    /// answer it from values it remembers, since the commit refuses the
    /// transaction if the key changed since the value answered. What the
    /// transaction learns this way counts only once it commits, as for a
    /// snapshot that is not fresh.
    async fn get_checked(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key).await
    }
    /// The pairs of the range, sorted (descending if `reverse`); with a limit, exactly
    /// `min(limit, available)` pairs (the transaction layer relies on it).
    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError>;
    /// False for a snapshot from [`Store::snapshot_for_commit`] that may miss
    /// the latest commits: what it read only counts once a commit validated
    /// it.
    fn is_fresh(&self) -> bool {
        true
    }
    /// Takes `key` as absent without reading it, if this snapshot may
    /// (one that is not fresh, on a backend whose reads cost a round trip):
    /// the commit then checks that the key is still absent, so a wrong
    /// assumption fails the commit with [`StoreError::Conflict`] and never
    /// lets it apply. Returns whether the assumption was taken (otherwise
    /// the key is read as usual). See [`Transaction::expect_absent`].
    fn assume_absent(&self, _key: &[u8]) -> bool {
        false
    }
    /// What this snapshot learned that its commit needs (backend-private;
    /// see [`ReadFacts`]).
    fn facts(&self) -> ReadFacts {
        ReadFacts::default()
    }
    /// The transaction takes `key` as holding `value` without reading it
    /// ([`Transaction::prime`]): a backend whose commit must learn the
    /// version of each key read may note what it already knows of this
    /// value (say, from a cache of values seen, when it holds exactly
    /// this value), so that the commit need not read it.
    fn primed(&self, _key: &[u8], _value: &[u8]) {}
}

/// Facts a backend's snapshot gathered for the commit of its transaction
/// (say, the versions of the keys it served from a cache), carried in the
/// [`CommitRequest`] back to the same backend; opaque to everyone else.
#[derive(Clone, Default)]
pub struct ReadFacts(pub Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl std::fmt::Debug for ReadFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ReadFacts(..)"
        } else {
            "ReadFacts(none)"
        })
    }
}

/// What a backend commits: the reads a transaction depended on and its writes.
#[derive(Debug, Clone, Default)]
pub struct CommitRequest {
    /// Version of the snapshot the transaction read.
    pub read_version: Version,
    /// Key ranges `[begin, end)` read by the transaction (single keys as `[k, k\0)`).
    pub read_conflicts: Vec<(Vec<u8>, Vec<u8>)>,
    /// The writes, applied in order.
    pub mutations: Vec<Mutation>,
    /// What the snapshot learned for this commit ([`Snapshot::facts`]).
    pub facts: ReadFacts,
    /// Numbers a member of the store fills in as it commits
    /// ([`Transaction::fill`]); where the numbers go once it applied.
    pub fills: Vec<Fill>,
}

/// A number to fill in at commit ([`Transaction::fill`]): every occurrence
/// of `placeholder`'s 8 bytes (big-endian in keys, either order in values)
/// in the commit becomes the next number of the sequence `scope` names, as
/// the member of the store that hands that sequence out gives it.
#[derive(Debug, Clone)]
pub struct Fill {
    pub scope: Vec<u8>,
    pub placeholder: u64,
    /// Where the number goes once the commit applied (it stays unset when
    /// the commit applied but its answer was lost: then the caller reads
    /// what it wrote to learn it).
    pub filled: Filled,
}

/// A filled number, once known ([`Fill`]).
pub type Filled = Arc<std::sync::OnceLock<FilledNumber>>;

/// The number a [`Fill`] got, and what its filler said with it
/// ([`crate::relay::FillAnswer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilledNumber {
    pub number: u64,
    pub notes: Vec<String>,
}

/// Whether `bytes` holds `placeholder` (either byte order).
pub fn holds_placeholder(bytes: &[u8], placeholder: u64) -> bool {
    let (be, le) = (placeholder.to_be_bytes(), placeholder.to_le_bytes());
    bytes.windows(8).any(|w| w == be || w == le)
}

/// Writes over every placeholder of `numbers` (placeholder → number) in
/// `bytes` its number, in the byte order it was written in, in one pass
/// whatever the number of placeholders (a group of many commits is
/// scanned once); the placeholders it found. A position is looked up only
/// when its byte is the first byte of some placeholder written big-endian
/// or the first of one written little-endian (its lowest byte): with a
/// few placeholders that is a few positions in a hundred (testing only
/// the top bit every placeholder has looked up three positions in four
/// of random ids).
pub fn replace_placeholders(
    bytes: &mut [u8],
    numbers: &rustc_hash::FxHashMap<u64, u64>,
) -> rustc_hash::FxHashSet<u64> {
    let mut found = rustc_hash::FxHashSet::default();
    if numbers.is_empty() {
        return found;
    }
    // the bytes a placeholder may start with, in either order
    let mut starts = [false; 256];
    for p in numbers.keys() {
        starts[usize::from(p.to_be_bytes()[0])] = true;
        starts[usize::from(p.to_le_bytes()[0])] = true;
    }
    let mut i = 0;
    while i + 8 <= bytes.len() {
        if !starts[usize::from(bytes[i])] {
            i += 1;
            continue;
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        let be = u64::from_be_bytes(w);
        let le = u64::from_le_bytes(w);
        if let Some(n) = numbers.get(&be) {
            bytes[i..i + 8].copy_from_slice(&n.to_be_bytes());
            found.insert(be);
            i += 8;
        } else if let Some(n) = numbers.get(&le) {
            bytes[i..i + 8].copy_from_slice(&n.to_le_bytes());
            found.insert(le);
            i += 8;
        } else {
            i += 1;
        }
    }
    found
}

impl CommitRequest {
    /// Writes the numbers of `numbers` (placeholder → number) over their
    /// placeholders in this request's read-conflict ranges and mutations,
    /// as a relay does over a group's bytes ([`replace_placeholders`]): for
    /// a backend that fills numbers in without a relay's encoding (the
    /// simulation's store). The placeholders found.
    pub fn fill_in(
        &mut self,
        numbers: &rustc_hash::FxHashMap<u64, u64>,
    ) -> rustc_hash::FxHashSet<u64> {
        let mut found = rustc_hash::FxHashSet::default();
        let mut fill = |b: &mut Vec<u8>| found.extend(replace_placeholders(b, numbers));
        for (b, e) in &mut self.read_conflicts {
            fill(b);
            fill(e);
        }
        for m in &mut self.mutations {
            match m {
                Mutation::Set(k, v) => {
                    fill(k);
                    fill(v);
                }
                Mutation::Clear(k) => fill(k),
                Mutation::ClearRange(b, e) => {
                    fill(b);
                    fill(e);
                }
            }
        }
        found
    }
}

/// A backend: snapshot reads and optimistic commits (FoundationDB's model).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for logs and `status` (e.g. `redb:/home/x/store.redb`).
    fn describe(&self) -> String;
    /// A read view at the latest committed version.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError>;
    /// A snapshot for a transaction that means to commit: it may be a few
    /// milliseconds old (then [`Snapshot::is_fresh`] is false), since the
    /// commit's conflict check refuses a transaction that read anything
    /// written after it. Backends that read the latest version cheaply
    /// answer [`snapshot`](Self::snapshot).
    async fn snapshot_for_commit(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        self.snapshot().await
    }
    /// A snapshot at the latest version whose checked reads
    /// ([`Snapshot::get_checked`]) may come from values the backend
    /// remembers: for a transaction that commits everything it reads
    /// before anything it learned counts (a guest's batch, see
    /// `actors::open_tx`). Its unchecked reads ([`Snapshot::get`], ranges)
    /// are the latest version's.
    async fn snapshot_remembering(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        self.snapshot().await
    }
    /// Commits if nothing in `read_conflicts` was written after `read_version`;
    /// returns only once the commit is durable. `Err(Conflict)` otherwise.
    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError>;
    /// Counters of the work done so far (name, value), for operators and the
    /// bench (`capstan cluster status`): what one operation costs the store.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Most keys one commit may write (a commit writing more fails with
    /// [`StoreError::TooManyWrites`]); unbounded unless the backend says so.
    /// Callers that gather many operations into one transaction flush
    /// before they reach it.
    fn max_commit_writes(&self) -> usize {
        usize::MAX
    }
    /// The latest version this client knows to be committed (its own
    /// commits and snapshots), if the backend tracks one: what a node tells
    /// another with a wake-up, so that the other's next snapshot for commit
    /// includes what woke it.
    fn seen_version(&self) -> Option<Version> {
        None
    }
    /// Another client committed `version` (told with a wake-up): snapshots
    /// for commit may be taken at it without asking the backend for its
    /// latest version. Nothing for backends that read the latest cheaply.
    fn learn_version(&self, _version: Version) {}
    /// Whether commits with numbers to fill in ([`Transaction::fill`]) may
    /// be sent now (a member that fills them is there to send them to).
    fn fills(&self) -> bool {
        false
    }
    /// Whether this client has commits at the relay now (or had one
    /// answered a moment ago: the etcd backend's `RECENT_RELAY`), so that
    /// its next commit met by others is likely to go there too: a commit
    /// with numbers to fill always goes to the relay, which costs a hop
    /// when the client would have sent it to the store itself.
    fn relaying_now(&self) -> bool {
        false
    }
    /// Fills in the numbers of relayed groups with `filler` from now on (or
    /// with none: groups with numbers to fill are refused): see
    /// [`crate::relay::Filler`]. Backends without relayed commits ignore it.
    fn set_filler(&self, _filler: Option<std::sync::Arc<dyn crate::relay::Filler>>) {}
    /// [`commit_relayed`](Self::commit_relayed) of a group with numbers to
    /// fill in: each entry of `fills` (a sequence, and the placeholders of
    /// its numbers in the group, in order) gets that many numbers from the
    /// filler, written over its placeholders before the group is committed;
    /// the answer, and for each entry its first number and what the filler
    /// said with it.
    async fn commit_relayed_filled(
        &self,
        _group: Vec<u8>,
        _fills: Vec<crate::relay::GroupFill>,
    ) -> Result<(Vec<u8>, Vec<crate::relay::FillAnswer>), crate::relay::RelayError> {
        Err(crate::relay::RelayError::NoFill(format!(
            "{} fills in no numbers",
            self.describe()
        )))
    }
    /// Hands groups of this client's commits to `relay` from now on (or to
    /// none): see [`crate::relay`]. Backends without relayed commits ignore it.
    fn set_relay(&self, _relay: Option<std::sync::Arc<dyn crate::relay::CommitRelay>>) {}
    /// Commits a group of commits another member's client relayed
    /// ([`crate::relay`]): the encoded answer its sender reads.
    async fn commit_relayed(&self, _group: Vec<u8>) -> Result<Vec<u8>, crate::relay::RelayError> {
        Err(crate::relay::RelayError::NotApplied(format!(
            "{} takes no relayed commits",
            self.describe()
        )))
    }
}

/// The smallest key after `key`: `key` followed by a zero byte.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

/// Smallest chunk fetched from the snapshot by a limited range read.
const MIN_RANGE_CHUNK: usize = 16;

/// A transaction in progress: snapshot reads plus buffered writes (read-your-writes).
///
/// Reads add read-conflict ranges: a `get` adds `[key, key\0)`, a range read adds
/// the part of the range it covered (with a limit, up to the last key returned).
/// Writes are validated when made; a write that fails validation changes nothing.
/// `clear`, `clear_range` and `clear_prefix` return nothing: an invalid clear
/// (reserved key, too large) is dropped and fails the transaction at commit with
/// its error.
pub struct Transaction {
    snapshot: Box<dyn Snapshot>,
    /// Keys set by this transaction (overlaying the snapshot and `cleared`).
    writes: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Disjoint, non-adjacent ranges `begin -> end` cleared by this transaction.
    cleared: BTreeMap<Vec<u8>, Vec<u8>>,
    read_conflicts: Vec<(Vec<u8>, Vec<u8>)>,
    mutations: Vec<Mutation>,
    size: usize,
    /// First error of a write that cannot report it (the clears).
    deferred: Option<StoreError>,
    /// Snapshot values read ahead by [`Transaction::prefetch`] (bounded by
    /// [`MAX_PREFETCHED`]).
    fetched: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Keys set with [`Transaction::set_fresh`]: absent from the store
    /// before this transaction, so clearing one only takes the set back;
    /// each with its order among them (a rollback forgets the later ones).
    fresh: BTreeMap<Vec<u8>, usize>,
    /// Keys taken back ([`Transaction::forget`]), each with the number of
    /// mutations made before: those of the key among them are dropped.
    forgets: Vec<(usize, Vec<u8>)>,
    /// Numbers to fill in at commit ([`Transaction::fill`]).
    fills: Vec<Fill>,
}

/// The writes of a [`Transaction`] at one moment ([`Transaction::checkpoint`]):
/// how many mutations it had (its buffered writes are a function of them).
pub struct Checkpoint {
    mutations: usize,
    forgets: usize,
    fresh: usize,
    fills: usize,
    size: usize,
    deferred: Option<StoreError>,
}

/// Most values one transaction keeps from [`Transaction::prefetch`] and
/// earlier reads.
pub const MAX_PREFETCHED: usize = 1024;
/// Largest value a transaction keeps from a read for a second read.
pub const MAX_KEPT_VALUE: usize = 16 * 1024;

impl Transaction {
    /// A transaction reading from `snapshot` (backends and tests; [`Db`] builds them).
    pub fn new(snapshot: Box<dyn Snapshot>) -> Self {
        Transaction {
            snapshot,
            writes: BTreeMap::new(),
            cleared: BTreeMap::new(),
            read_conflicts: Vec::new(),
            mutations: Vec::new(),
            size: 0,
            deferred: None,
            fetched: std::collections::HashMap::new(),
            fresh: BTreeMap::new(),
            forgets: Vec::new(),
            fills: Vec::new(),
        }
    }

    /// Reads `keys` from the snapshot all at once (one round trip where the
    /// backend batches concurrent reads, as etcd's does), so that the
    /// [`get`](Self::get)s that follow find them without waiting. Prefetching
    /// adds no read conflict: only the keys then read with `get` do. Keys
    /// this transaction wrote or cleared are skipped (its own writes win).
    pub async fn prefetch(&mut self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let wanted: Vec<&Vec<u8>> = keys
            .iter()
            .filter(|k| {
                !self.fetched.contains_key(*k)
                    && !self.writes.contains_key(*k)
                    && !self.is_cleared(k)
            })
            .take(MAX_PREFETCHED.saturating_sub(self.fetched.len()))
            .collect();
        let snapshot = &self.snapshot;
        let values =
            futures::future::try_join_all(wanted.iter().map(|k| snapshot.get_checked(k))).await?;
        for (k, v) in wanted.into_iter().zip(values) {
            self.fetched.insert(k.clone(), v);
        }
        Ok(())
    }

    /// Tells the transaction what `key` holds at its snapshot without
    /// reading it: a later [`get`](Self::get) answers `value` with no round
    /// trip (and still adds the key's read conflict, so a write after the
    /// snapshot fails the commit). For a caller that knows the key cannot
    /// have changed (a record read moments ago that is never rewritten, or
    /// a key that provably does not exist yet): a wrong prime is a wrong
    /// read. Ignored for keys this transaction wrote or cleared, and past
    /// [`MAX_PREFETCHED`] values.
    pub fn prime(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if self.fetched.len() < MAX_PREFETCHED
            && !self.writes.contains_key(&key)
            && !self.is_cleared(&key)
            && !self.fetched.contains_key(&key)
        {
            match &value {
                // Known absent: the snapshot records it as such, so that the
                // commit's check of the key (etcd: a compare on its mod
                // revision, 0) needs no read of the key either.
                None => {
                    self.snapshot.assume_absent(&key);
                }
                Some(v) => self.snapshot.primed(&key, v),
            }
            self.fetched.insert(key, value);
        }
    }

    /// Says that `key` is expected to be absent (a record under a fresh
    /// random id, an inbox slot just reserved): on a snapshot that may be
    /// stale, a backend whose reads cost a round trip takes it as absent
    /// without reading it, and its commit checks that it still is. If the
    /// key exists after all, the commit conflicts and [`Db::transact`]
    /// runs the transaction again on a fresh snapshot, where the key is
    /// read: a wrong expectation costs a retry, never a wrong answer. On a
    /// fresh snapshot, or a backend that reads cheaply, this does nothing.
    pub fn expect_absent(&mut self, key: &[u8]) {
        if self.fetched.len() < MAX_PREFETCHED
            && !self.fetched.contains_key(key)
            && !self.writes.contains_key(key)
            && !self.is_cleared(key)
            && !self.snapshot.is_fresh()
            && self.snapshot.assume_absent(key)
        {
            self.fetched.insert(key.to_vec(), None);
        }
    }

    /// Reads `key` from the snapshot as it is, ignoring this transaction's
    /// own writes and adding no read conflict (FoundationDB's snapshot
    /// reads): for what the commit's correctness does not depend on, such
    /// as a listing whose entries are checked again when used.
    pub async fn snapshot_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.snapshot.get(key).await
    }

    /// The pairs of a range as the snapshot has them, like
    /// [`snapshot_get`](Self::snapshot_get): no read conflict, this
    /// transaction's writes not seen.
    pub async fn snapshot_range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        self.snapshot.range(opt).await
    }

    /// The version of the snapshot this transaction reads.
    pub fn read_version(&self) -> Version {
        self.snapshot.version()
    }

    /// The value of `key` as this transaction sees it (its own writes included).
    ///
    /// A key this transaction wrote or cleared is answered from its own
    /// writes and adds no read conflict: the answer does not depend on the
    /// store, so a concurrent write of the key cannot make it wrong
    /// (FoundationDB's read-your-writes transactions do the same). On
    /// etcd this spares the commit a compare, and the read of the key's
    /// revision that the compare would need. (A [`rollback`](Self::rollback)
    /// undoes such a write only together with the operation that read it.)
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(Some(v.clone()));
        }
        if self.is_cleared(key) {
            return Ok(None);
        }
        self.read_conflicts.push((key.to_vec(), key_after(key)));
        if let Some(v) = self.fetched.get(key) {
            return Ok(v.clone());
        }
        let v = self.snapshot.get_checked(key).await?;
        // A snapshot never changes: keep small answers, so that a second
        // read of the key (a transaction held open across operations reads
        // the same records again) costs no round trip.
        if self.fetched.len() < MAX_PREFETCHED
            && v.as_ref().is_none_or(|v| v.len() <= MAX_KEPT_VALUE)
        {
            self.fetched.insert(key.to_vec(), v.clone());
        }
        Ok(v)
    }

    /// The pairs of a range as this transaction sees them (its own writes included).
    pub async fn get_range(&mut self, opt: RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        let RangeOption {
            begin,
            end,
            limit,
            reverse,
        } = opt;
        if begin >= end {
            return Ok(Vec::new());
        }
        let mut out: Vec<KeyValue> = Vec::new();
        // The part of [begin, end) not read yet.
        let mut lo = begin.clone();
        let mut hi = end.clone();
        loop {
            let chunk = if limit == 0 {
                0
            } else {
                (limit - out.len()).max(MIN_RANGE_CHUNK)
            };
            let rows = self
                .snapshot
                .range(&RangeOption {
                    begin: lo.clone(),
                    end: hi.clone(),
                    limit: chunk,
                    reverse,
                })
                .await?;
            let exhausted = chunk == 0 || rows.len() < chunk;
            // The window of keys this snapshot read fully covers.
            let (wlo, whi) = match rows.last() {
                Some((last, _)) if !exhausted => {
                    if reverse {
                        (last.clone(), hi.clone())
                    } else {
                        (lo.clone(), key_after(last))
                    }
                }
                _ => (lo.clone(), hi.clone()),
            };
            for kv in self.overlay(rows, &wlo, &whi, reverse) {
                out.push(kv);
                if limit != 0 && out.len() == limit {
                    let last = &out[out.len() - 1].0;
                    let covered = if reverse {
                        (last.clone(), end)
                    } else {
                        (begin, key_after(last))
                    };
                    self.read_conflicts.push(covered);
                    return Ok(out);
                }
            }
            if exhausted {
                self.read_conflicts.push((begin, end));
                return Ok(out);
            }
            if reverse {
                hi = wlo;
            } else {
                lo = whi;
            }
        }
    }

    /// Range over all keys starting with `prefix`.
    pub async fn get_prefix(
        &mut self,
        prefix: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.get_range(RangeOption {
            begin: prefix.to_vec(),
            end: crate::tuple::prefix_end(prefix),
            limit,
            reverse,
        })
        .await
    }

    /// Sets `key` to `value`. On error nothing changes.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_SIZE,
            });
        }
        self.add_size(key.len() + value.len())?;
        self.buffer(Mutation::Set(key.to_vec(), value.to_vec()));
        Ok(())
    }

    /// Sets `key`, which the caller knows the store does not hold (a key
    /// under an id this transaction made: a fresh random id cannot have
    /// been written before). Clearing it later in this transaction then
    /// only takes this set back ([`forget`](Self::forget)): the commit
    /// neither writes nor deletes it. A guest's batch that stores a counter
    /// once per message names a new value each time and unnames the one
    /// before, made earlier in the same batch: without this, each of those
    /// became a put and a deletion of a key the store never had.
    pub fn set_fresh(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.set(key, value)?;
        let n = self.fresh.len();
        if n < MAX_PREFETCHED {
            self.fresh.entry(key.to_vec()).or_insert(n);
        }
        Ok(())
    }

    /// Takes back every set of exactly `key` this transaction made so far
    /// (a clear of it stays, single or in a range): the commit carries none
    /// of them. Only for a key the store does not hold, or whose write the
    /// caller no longer needs (a guest's exactly-once records of a
    /// message whose mark commits with them: see `actors/src/open_tx.rs`).
    /// Reads of it keep their conflicts. Undone by a
    /// [`rollback`](Self::rollback) to a checkpoint taken before it.
    pub fn forget(&mut self, key: &[u8]) {
        self.writes.remove(key);
        self.forgets.push((self.mutations.len(), key.to_vec()));
    }

    /// Removes `key`. An invalid key fails the transaction at commit.
    pub fn clear(&mut self, key: &[u8]) {
        if self.fresh.contains_key(key) {
            // never in the store: taking back its set is the whole clear
            self.forget(key);
            return;
        }
        let checked = check_key(key).and_then(|()| self.add_size(key.len()));
        if let Err(e) = checked {
            self.defer(e);
            return;
        }
        self.buffer(Mutation::Clear(key.to_vec()));
    }

    /// Removes every key in `[begin, end)` (nothing if `begin >= end`). A range
    /// reaching into the system keys fails the transaction at commit.
    pub fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        let checked = if end > [SYSTEM_KEY_PREFIX].as_slice() {
            Err(StoreError::ReservedKey)
        } else if begin.len() > MAX_KEY_SIZE || end.len() > MAX_KEY_SIZE + 1 {
            Err(StoreError::KeyTooLarge {
                len: begin.len().max(end.len()),
                max: MAX_KEY_SIZE,
            })
        } else {
            self.add_size(begin.len() + end.len())
        };
        if let Err(e) = checked {
            self.defer(e);
            return;
        }
        self.buffer(Mutation::ClearRange(begin.to_vec(), end.to_vec()));
    }

    /// Records a checked mutation: in the buffered writes, then in the list.
    fn buffer(&mut self, m: Mutation) {
        self.apply(&m);
        self.mutations.push(m);
    }

    /// Applies `m` to the buffered writes (`writes`, `cleared`): what the
    /// mutations so far make of them, replayed by [`rollback`](Self::rollback).
    fn apply(&mut self, m: &Mutation) {
        match m {
            Mutation::Set(k, v) => {
                self.writes.insert(k.clone(), v.clone());
            }
            Mutation::Clear(k) => {
                self.writes.remove(k);
                self.add_cleared(k.clone(), key_after(k));
            }
            Mutation::ClearRange(begin, end) => {
                // Drop buffered sets inside the range.
                let mut tail = self.writes.split_off(begin);
                let mut after = tail.split_off(end);
                self.writes.append(&mut after);
                self.add_cleared(begin.clone(), end.clone());
            }
        }
    }

    /// Removes every key starting with `prefix` (the empty prefix: every user key).
    pub fn clear_prefix(&mut self, prefix: &[u8]) {
        let end = crate::tuple::prefix_end(prefix);
        self.clear_range(prefix, &end);
    }

    /// The transaction's writes as they are now, to [`rollback`](Self::rollback)
    /// to: for a transaction held open across several operations, where one
    /// operation that fails must leave no partial writes behind.
    ///
    /// Constant time: a guest runner's open transaction takes one before
    /// every operation of every handler of a batch, and copying the writes
    /// each time made a batch quadratic in its size. A rollback (an
    /// operation failed: rare) replays the mutations kept instead.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            mutations: self.mutations.len(),
            forgets: self.forgets.len(),
            fresh: self.fresh.len(),
            fills: self.fills.len(),
            size: self.size,
            deferred: self.deferred.clone(),
        }
    }

    /// Undoes every write made since `cp` was taken. Reads made since then
    /// keep their conflict ranges (a transaction may conflict on what it
    /// looked at, even if it then wrote nothing).
    pub fn rollback(&mut self, cp: Checkpoint) {
        if self.mutations.len() > cp.mutations || self.forgets.len() > cp.forgets {
            self.mutations.truncate(cp.mutations);
            self.forgets.truncate(cp.forgets);
            self.writes.clear();
            self.cleared.clear();
            let kept = std::mem::take(&mut self.mutations);
            let forgets = std::mem::take(&mut self.forgets);
            let mut next = forgets.iter().peekable();
            for (i, m) in kept.iter().enumerate() {
                while let Some((_, k)) = next.next_if(|(at, _)| *at <= i) {
                    self.writes.remove(k);
                }
                self.apply(m);
            }
            for (_, k) in next {
                self.writes.remove(k);
            }
            self.mutations = kept;
            self.forgets = forgets;
        }
        if self.fresh.len() > cp.fresh {
            self.fresh.retain(|_, i| *i < cp.fresh);
        }
        self.fills.truncate(cp.fills);
        self.size = cp.size;
        self.deferred = cp.deferred;
    }

    /// A number the store fills in as it commits: a placeholder to write in
    /// keys and values now (8 bytes, either byte order), which the member of
    /// the store that hands out the sequence `scope` names replaces, in the
    /// whole commit, by that sequence's next number (the numbers of an
    /// inbox, handed out by its owner as a relay merges the commit: see
    /// `actors::mail`). The number is in `filled` once the commit applied.
    /// Only a backend that says so takes such commits ([`Store::fills`]);
    /// others refuse them with [`StoreError::FillUnavailable`], as does one
    /// that finds no member to fill them in at the time: the caller then
    /// commits again with numbers of its own. A placeholder has its top bit
    /// set, so that no number handed out (they are far below) is one.
    pub fn fill(&mut self, scope: &[u8], filled: &Filled) -> u64 {
        let placeholder = crate::trace::new_id() | (1 << 63);
        self.fills.push(Fill {
            scope: scope.to_vec(),
            placeholder,
            filled: filled.clone(),
        });
        placeholder
    }

    /// Mutations so far (a key set twice counts twice: an upper bound on
    /// the keys the commit writes).
    pub fn mutation_count(&self) -> usize {
        self.mutations.len()
    }

    /// Bytes of mutations so far, counted against [`MAX_TRANSACTION_SIZE`].
    pub fn size(&self) -> usize {
        self.size
    }

    /// True when the transaction has no mutations (it needs no commit).
    pub fn is_read_only(&self) -> bool {
        self.mutations.is_empty() && self.deferred.is_none()
    }

    /// The read-conflict ranges recorded so far.
    pub fn read_conflicts(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.read_conflicts
    }

    /// What to send to [`Store::commit`]; the first deferred write error if any.
    pub fn into_commit_request(self) -> Result<CommitRequest, StoreError> {
        if let Some(e) = self.deferred {
            return Err(e);
        }
        let mut mutations = self.mutations;
        if !self.forgets.is_empty() {
            // The last forget of a key drops its sets before that point.
            let mut until: std::collections::HashMap<&[u8], usize> = Default::default();
            for (at, k) in &self.forgets {
                until.insert(k.as_slice(), *at);
            }
            let mut i = 0;
            mutations.retain(|m| {
                let key = match m {
                    Mutation::Set(k, _) => Some(k.as_slice()),
                    Mutation::Clear(_) | Mutation::ClearRange(..) => None,
                };
                let dropped = key.and_then(|k| until.get(k)).is_some_and(|at| i < *at);
                i += 1;
                !dropped
            });
        }
        Ok(CommitRequest {
            read_version: self.snapshot.version(),
            read_conflicts: self.read_conflicts,
            mutations,
            facts: self.snapshot.facts(),
            fills: self.fills,
        })
    }

    fn defer(&mut self, e: StoreError) {
        tracing::debug!(error = %e, "invalid clear; the transaction will fail at commit");
        if self.deferred.is_none() {
            self.deferred = Some(e);
        }
    }

    fn add_size(&mut self, n: usize) -> Result<(), StoreError> {
        let len = self.size + n;
        if len > MAX_TRANSACTION_SIZE {
            return Err(StoreError::TransactionTooLarge {
                len,
                max: MAX_TRANSACTION_SIZE,
            });
        }
        self.size = len;
        Ok(())
    }

    fn is_cleared(&self, key: &[u8]) -> bool {
        self.cleared
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, end)| key < end.as_slice())
    }

    fn add_cleared(&mut self, mut begin: Vec<u8>, mut end: Vec<u8>) {
        if let Some((b, e)) = self
            .cleared
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(begin.as_slice())))
            .next_back()
            && e.as_slice() >= begin.as_slice()
        {
            begin = b.clone();
            if *e > end {
                end = e.clone();
            }
        }
        let merged: Vec<Vec<u8>> = self
            .cleared
            .range::<[u8], _>((
                Bound::Included(begin.as_slice()),
                Bound::Included(end.as_slice()),
            ))
            .map(|(b, _)| b.clone())
            .collect();
        for b in merged {
            if let Some(e) = self.cleared.remove(&b)
                && e > end
            {
                end = e;
            }
        }
        self.cleared.insert(begin, end);
    }

    /// Merges snapshot `rows` (sorted in the read's direction, all inside `[lo, hi)`)
    /// with this transaction's writes in `[lo, hi)`.
    fn overlay(&self, rows: Vec<KeyValue>, lo: &[u8], hi: &[u8], reverse: bool) -> Vec<KeyValue> {
        let mut base: Vec<KeyValue> = rows
            .into_iter()
            .filter(|(k, _)| !self.writes.contains_key(k) && !self.is_cleared(k))
            .collect();
        let mut own: Vec<KeyValue> = self
            .writes
            .range::<[u8], _>((Bound::Included(lo), Bound::Excluded(hi)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if own.is_empty() {
            return base;
        }
        if reverse {
            own.reverse();
        }
        let mut out = Vec::with_capacity(base.len() + own.len());
        let mut a = std::mem::take(&mut base).into_iter().peekable();
        let mut b = own.into_iter().peekable();
        loop {
            let take_a = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => (x.0 < y.0) != reverse,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_a { a.next() } else { b.next() };
            out.extend(next);
        }
        out
    }
}

fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_SIZE {
        return Err(StoreError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_SIZE,
        });
    }
    if key.first() == Some(&SYSTEM_KEY_PREFIX) {
        return Err(StoreError::ReservedKey);
    }
    Ok(())
}

/// A boxed future borrowing a transaction, as returned by transaction closures.
pub type TxFuture<'t, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

/// Bounded exponential backoff with jitter (pure: randomness comes in).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// First delay 1 ms, doubling up to 50 ms.
    pub const fn new() -> Self {
        Backoff {
            next: Duration::from_millis(1),
            max: Duration::from_millis(50),
        }
    }
    /// The next delay: uniformly in `[d/2, d]` (from `random`) where `d` doubles each time.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(half + random % (nanos - half + 1))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// The seeded jitter of this thread (a splitmix64 state), if any.
    static SEEDED_JITTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Makes the retry jitter of transactions run on this thread come from
/// `seed` until the guard drops. For simulations only (one thread, a
/// paused clock), so that the same seed replays the same retry delays;
/// elsewhere the jitter is random, as it must be to spread retries.
#[must_use = "the jitter comes from the seed only while the guard lives"]
pub fn seed_thread_jitter(seed: u64) -> SeededJitter {
    SeededJitter {
        prev: SEEDED_JITTER.with(|s| s.replace(Some(seed))),
        _not_send: std::marker::PhantomData,
    }
}

/// While it lives, retry jitter on this thread comes from a seed.
pub struct SeededJitter {
    prev: Option<u64>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for SeededJitter {
    fn drop(&mut self) {
        SEEDED_JITTER.with(|s| s.set(self.prev));
    }
}

fn random_u64(salt: u32) -> u64 {
    use std::hash::BuildHasher;
    let seeded = SEEDED_JITTER.with(|s| {
        let mut z = s.get()?.wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(Some(z));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Some(z ^ (z >> 31))
    });
    // RandomState is seeded randomly per thread and varies per instance.
    seeded.unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(salt))
}

/// A handle on a store; cheap to clone.
#[derive(Clone)]
pub struct Db {
    store: Arc<dyn Store>,
    max_attempts: u32,
}

impl Db {
    /// A handle on `store`, retrying transactions up to [`DEFAULT_MAX_ATTEMPTS`] times.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Db {
            store,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
    /// The same handle with another bound on the attempts of [`Db::transact`] (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
    /// The backend, for direct snapshot/commit access (conformance tests, tools).
    /// See [`Store::seen_version`].
    pub fn seen_version(&self) -> Option<Version> {
        self.store.seen_version()
    }
    /// See [`Store::learn_version`].
    pub fn learn_version(&self, version: Version) {
        self.store.learn_version(version)
    }
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    /// A short description of the backend (see [`Store::describe`]).
    pub fn describe(&self) -> String {
        self.store.describe()
    }
    /// Runs `f` in a transaction and commits it, retrying (bounded, with backoff)
    /// while it conflicts. Returns only after a durable commit.
    ///
    /// `f` may run several times: it must not have effects outside the transaction
    /// (or they must be idempotent). A transaction without mutations is not sent to
    /// the backend's committer.
    pub async fn transact<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        T: Send,
        E: TxnError + Send,
        F: for<'t> FnMut(&'t mut Transaction) -> TxFuture<'t, T, E> + Send,
    {
        let mut backoff = Backoff::new();
        let mut attempt: u32 = 0;
        // The first attempt may read a slightly old snapshot (no round trip
        // for the latest version); what it read counts only if it commits.
        // An answer without a commit (nothing written, or an error) is
        // worked out again on the latest version, as is every retry.
        let mut stale_ok = true;
        loop {
            let snapshot = if std::mem::take(&mut stale_ok) {
                self.store.snapshot_for_commit().await?
            } else {
                self.store.snapshot().await?
            };
            let fresh = snapshot.is_fresh();
            let mut tx = Transaction::new(snapshot);
            let outcome = f(&mut tx).await;
            if !fresh && (outcome.is_err() || tx.is_read_only()) {
                continue;
            }
            attempt += 1;
            let retry_err = match outcome {
                Ok(value) => {
                    if tx.is_read_only() {
                        return Ok(value);
                    }
                    let req = tx.into_commit_request()?;
                    if !req.fills.is_empty() && !self.store.fills() {
                        return Err(StoreError::FillUnavailable(format!(
                            "{} takes no commits with numbers to fill in now",
                            self.store.describe()
                        ))
                        .into());
                    }
                    let timer = crate::trace::Timer::start();
                    let r = self.store.commit(req).await;
                    timer.done("commit", || match &r {
                        Ok(v) => format!("durable at version {v} (attempt {attempt})"),
                        Err(e) if e.is_retryable() => format!("{e} (attempt {attempt}): again"),
                        Err(e) => format!("{e} (attempt {attempt})"),
                    });
                    match r {
                        Ok(_) => return Ok(value),
                        Err(e) if e.is_retryable() => e,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => match e.as_store_error() {
                    Some(se) if se.is_retryable() => se.clone(),
                    _ => return Err(e),
                },
            };
            if attempt >= self.max_attempts {
                tracing::warn!(attempts = attempt, error = %retry_err, "transaction gave up");
                return Err(StoreError::TooManyRetries { attempts: attempt }.into());
            }
            let delay = backoff.next_delay(random_u64(attempt));
            tracing::debug!(attempt, error = %retry_err, ?delay, "retrying transaction");
            tokio::time::sleep(delay).await;
        }
    }
    /// Like [`read`](Self::read), on a snapshot for commit
    /// ([`Store::snapshot_for_commit`]): also says whether the snapshot was
    /// the latest version. What a stale one read must be checked again
    /// where it counts (in a transaction that commits).
    pub async fn read_for_commit<T, E, F>(&self, f: F) -> Result<(T, bool), E>
    where
        T: Send,
        E: TxnError + Send,
        F: for<'t> FnOnce(&'t mut Transaction) -> TxFuture<'t, T, E> + Send,
    {
        let snapshot = self.store.snapshot_for_commit().await?;
        let fresh = snapshot.is_fresh();
        let mut tx = Transaction::new(snapshot);
        let out = f(&mut tx).await?;
        Ok((out, fresh))
    }

    /// A read-only transaction (no commit): `f` runs once on a snapshot; any
    /// writes it makes are discarded.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send,
        E: TxnError + Send,
        F: for<'t> FnOnce(&'t mut Transaction) -> TxFuture<'t, T, E> + Send,
    {
        let mut tx = Transaction::new(self.store.snapshot().await?);
        let out = f(&mut tx).await;
        if !tx.is_read_only() {
            tracing::debug!("writes made in Db::read are discarded");
        }
        out
    }
}

#[cfg(test)]
mod placeholder_tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_in_both_byte_orders_in_one_pass() {
        let (p, q) = (0x8123_4567_89ab_cdef_u64, 0xfedc_ba98_7654_3210_u64);
        let mut bytes = [
            b"key/".as_slice(),
            &p.to_be_bytes(),
            b"|",
            &p.to_le_bytes(),
            b"|",
            &q.to_be_bytes(),
            b"tail",
        ]
        .concat();
        let numbers: rustc_hash::FxHashMap<u64, u64> = [(p, 7), (q, 8)].into_iter().collect();
        let found = replace_placeholders(&mut bytes, &numbers);
        assert_eq!(found.len(), 2);
        let want = [
            b"key/".as_slice(),
            &7u64.to_be_bytes(),
            b"|",
            &7u64.to_le_bytes(),
            b"|",
            &8u64.to_be_bytes(),
            b"tail",
        ]
        .concat();
        assert_eq!(bytes, want);
        assert!(!holds_placeholder(&bytes, p) && !holds_placeholder(&bytes, q));
        // nothing to replace: nothing found, nothing changed
        let before = bytes.clone();
        assert!(replace_placeholders(&mut bytes, &numbers).is_empty());
        assert_eq!(bytes, before);
    }

    /// The reference: every position looked up, in order.
    fn replaced_naively(bytes: &mut [u8], numbers: &rustc_hash::FxHashMap<u64, u64>) {
        let mut i = 0;
        while i + 8 <= bytes.len() {
            let w: [u8; 8] = bytes[i..i + 8].try_into().unwrap();
            if let Some(n) = numbers.get(&u64::from_be_bytes(w)) {
                bytes[i..i + 8].copy_from_slice(&n.to_be_bytes());
                i += 8;
            } else if let Some(n) = numbers.get(&u64::from_le_bytes(w)) {
                bytes[i..i + 8].copy_from_slice(&n.to_le_bytes());
                i += 8;
            } else {
                i += 1;
            }
        }
    }

    proptest::proptest! {
        /// Random bytes with placeholders written into them in either
        /// order, overlapping one another or not: the same result as
        /// looking up every position.
        #[test]
        fn placeholders_are_replaced_as_by_looking_up_every_position(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            placeholders in proptest::collection::vec(proptest::num::u64::ANY, 1..6),
            writes in proptest::collection::vec((0usize..300, proptest::bool::ANY, 0usize..6), 0..12),
        ) {
            let numbers: rustc_hash::FxHashMap<u64, u64> = placeholders
                .iter()
                .enumerate()
                .map(|(i, p)| (p | 1 << 63, i as u64))
                .collect();
            let keys: Vec<u64> = numbers.keys().copied().collect();
            let mut bytes = noise;
            for (at, be, which) in writes {
                let p = keys[which % keys.len()];
                let b = if be { p.to_be_bytes() } else { p.to_le_bytes() };
                if at + 8 <= bytes.len() {
                    bytes[at..at + 8].copy_from_slice(&b);
                }
            }
            let mut want = bytes.clone();
            replaced_naively(&mut want, &numbers);
            replace_placeholders(&mut bytes, &numbers);
            proptest::prop_assert_eq!(bytes, want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory snapshot for transaction-layer tests.
    struct MemSnap(BTreeMap<Vec<u8>, Vec<u8>>);

    #[async_trait::async_trait]
    impl Snapshot for MemSnap {
        fn version(&self) -> Version {
            7
        }
        async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.0.get(key).cloned())
        }
        async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
            if opt.begin >= opt.end {
                return Ok(vec![]);
            }
            let it = self
                .0
                .range::<[u8], _>((
                    Bound::Included(opt.begin.as_slice()),
                    Bound::Excluded(opt.end.as_slice()),
                ))
                .map(|(k, v)| (k.clone(), v.clone()));
            let lim = if opt.limit == 0 {
                usize::MAX
            } else {
                opt.limit
            };
            Ok(if opt.reverse {
                it.rev().take(lim).collect()
            } else {
                it.take(lim).collect()
            })
        }
    }

    fn tx_over(keys: &[&[u8]]) -> Transaction {
        Transaction::new(Box::new(MemSnap(
            keys.iter().map(|k| (k.to_vec(), k.to_vec())).collect(),
        )))
    }

    fn keys(rows: &[KeyValue]) -> Vec<Vec<u8>> {
        rows.iter().map(|(k, _)| k.clone()).collect()
    }

    #[tokio::test]
    async fn range_overlay_with_clears_limits_and_reverse() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        // Model check: random snapshot + random ops vs. a BTreeMap model.
        let mut runner = TestRunner::new(Config::with_cases(300));
        let op = prop_oneof![
            (0u8..24).prop_map(|k| (0u8, k, 0u8)),
            (0u8..24).prop_map(|k| (1u8, k, 0u8)),
            (0u8..24, 0u8..24).prop_map(|(a, b)| (2u8, a, b)),
        ];
        let strat = (
            proptest::collection::btree_set(0u8..24, 0..20),
            proptest::collection::vec(op, 0..12),
            0usize..8,
            any::<bool>(),
            0u8..24,
            0u8..25,
        );
        let rt = tokio::runtime::Handle::current();
        let result = tokio::task::spawn_blocking(move || {
            runner.run(&strat, |(snap, ops, limit, reverse, b, e)| {
                let snap: BTreeMap<Vec<u8>, Vec<u8>> =
                    snap.into_iter().map(|k| (vec![k], vec![k])).collect();
                let mut model = snap.clone();
                let mut tx = Transaction::new(Box::new(MemSnap(snap)));
                for (kind, a, b) in ops {
                    match kind {
                        0 => {
                            tx.set(&[a], b"w").unwrap();
                            model.insert(vec![a], b"w".to_vec());
                        }
                        1 => {
                            tx.clear(&[a]);
                            model.remove(&vec![a]);
                        }
                        _ => {
                            tx.clear_range(&[a], &[b]);
                            if a < b {
                                model.retain(|k, _| !(k[0] >= a && k[0] < b));
                            }
                        }
                    }
                }
                let got = rt
                    .block_on(
                        tx.get_range(
                            RangeOption::new(vec![b], vec![e])
                                .with_limit(limit)
                                .reversed(reverse),
                        ),
                    )
                    .unwrap();
                let mut want: Vec<KeyValue> = model
                    .iter()
                    .filter(|(k, _)| k[0] >= b && k[0] < e)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if reverse {
                    want.reverse();
                }
                if limit > 0 {
                    want.truncate(limit);
                }
                prop_assert_eq!(got, want);
                for k in 0u8..24 {
                    prop_assert_eq!(
                        rt.block_on(tx.get(&[k])).unwrap(),
                        model.get(&vec![k]).cloned()
                    );
                }
                Ok(())
            })
        })
        .await
        .unwrap();
        result.unwrap();
    }

    #[tokio::test]
    async fn rollback_undoes_the_writes_since_the_checkpoint() {
        let mut tx = tx_over(&[b"a", b"b"]);
        tx.set(b"x", b"1").unwrap();
        let cp = tx.checkpoint();
        let size = tx.size();
        // a failing operation: partial writes, a clear, an invalid clear
        tx.set(b"y", b"2").unwrap();
        tx.clear(b"a");
        tx.clear_range(b"b", b"c");
        tx.clear(&[SYSTEM_KEY_PREFIX]);
        assert!(tx.get(b"a").await.unwrap().is_none());
        tx.rollback(cp);
        assert_eq!(tx.size(), size);
        assert_eq!(tx.get(b"x").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(tx.get(b"y").await.unwrap(), None);
        assert_eq!(tx.get(b"a").await.unwrap(), Some(b"a".to_vec()));
        assert_eq!(tx.get(b"b").await.unwrap(), Some(b"b".to_vec()));
        let req = tx
            .into_commit_request()
            .expect("the invalid clear was undone");
        assert_eq!(
            req.mutations,
            vec![Mutation::Set(b"x".to_vec(), b"1".to_vec())]
        );
    }

    /// One write of a generated sequence (keys from a small alphabet).
    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u8),
        /// Only on keys the store does not hold (even ones: see `base`).
        SetFresh(u8, u8),
        Clear(u8),
        ClearRange(u8, u8),
        Forget(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..8, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
            (0u8..4, any::<u8>()).prop_map(|(k, v)| Op::SetFresh(2 * k, v)),
            (0u8..8).prop_map(Op::Clear),
            (0u8..8, 0u8..9).prop_map(|(a, b)| Op::ClearRange(a, b)),
            (0u8..8).prop_map(Op::Forget),
        ]
    }

    fn run(tx: &mut Transaction, ops: &[Op]) {
        for o in ops {
            match *o {
                Op::Set(k, v) => tx.set(&[b'k', k], &[v]).unwrap(),
                Op::SetFresh(k, v) => tx.set_fresh(&[b'k', k], &[v]).unwrap(),
                Op::Clear(k) => tx.clear(&[b'k', k]),
                Op::ClearRange(a, b) => tx.clear_range(&[b'k', a], &[b'k', b]),
                Op::Forget(k) => tx.forget(&[b'k', k]),
            }
        }
    }

    /// The store's keys the tests start from (odd ones: even keys are the
    /// ones `Op::SetFresh` may set).
    const BASE: [&[u8]; 3] = [b"k\x01", b"k\x03", b"k\x05"];

    /// What `mutations` leave of [`BASE`], as a store applies them.
    fn applied(mutations: &[Mutation]) -> Vec<KeyValue> {
        let mut m: BTreeMap<Vec<u8>, Vec<u8>> =
            BASE.iter().map(|k| (k.to_vec(), k.to_vec())).collect();
        for mu in mutations {
            match mu {
                Mutation::Set(k, v) => {
                    m.insert(k.clone(), v.clone());
                }
                Mutation::Clear(k) => {
                    m.remove(k);
                }
                Mutation::ClearRange(b, e) => m.retain(|k, _| !(k >= b && k < e)),
            }
        }
        m.into_iter().collect()
    }

    /// What a transaction shows of its writes (sets taken back and fresh
    /// keys included) is what its commit leaves in the store.
    #[test]
    fn what_commits_is_what_the_transaction_showed() {
        use proptest::prelude::*;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        proptest!(|(ops in proptest::collection::vec(op(), 0..24))| {
            rt.block_on(async {
                let mut tx = tx_over(&BASE);
                run(&mut tx, &ops);
                let shown = visible(&mut tx).await;
                let req = tx.into_commit_request().unwrap();
                assert_eq!(applied(&req.mutations), shown, "{ops:?} -> {:?}", req.mutations);
            });
        });
    }

    #[tokio::test]
    async fn a_fresh_key_set_then_cleared_reaches_no_commit() {
        let mut tx = tx_over(&BASE);
        tx.set_fresh(b"k\x02", b"v").unwrap();
        tx.set(b"k\x04", b"kept").unwrap();
        assert_eq!(tx.get(b"k\x02").await.unwrap(), Some(b"v".to_vec()));
        tx.clear(b"k\x02");
        assert_eq!(tx.get(b"k\x02").await.unwrap(), None);
        let req = tx.into_commit_request().unwrap();
        assert_eq!(
            req.mutations,
            vec![Mutation::Set(b"k\x04".to_vec(), b"kept".to_vec())]
        );
        // a key the store holds is cleared as ever
        let mut tx = tx_over(&BASE);
        tx.set(b"k\x01", b"v").unwrap();
        tx.clear(b"k\x01");
        let req = tx.into_commit_request().unwrap();
        assert_eq!(
            req.mutations.last(),
            Some(&Mutation::Clear(b"k\x01".to_vec()))
        );
    }

    async fn visible(tx: &mut Transaction) -> Vec<KeyValue> {
        tx.get_range(RangeOption {
            begin: b"k".to_vec(),
            end: b"l".to_vec(),
            limit: 0,
            reverse: false,
        })
        .await
        .unwrap()
    }

    #[test]
    fn a_rollback_leaves_what_the_writes_before_the_checkpoint_made() {
        use proptest::prelude::*;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let base = BASE;
        proptest!(|(before in proptest::collection::vec(op(), 0..12),
                    after in proptest::collection::vec(op(), 0..12),
                    again in proptest::collection::vec(op(), 0..6))| {
            rt.block_on(async {
                let mut tx = tx_over(&base);
                run(&mut tx, &before);
                let cp = tx.checkpoint();
                run(&mut tx, &after);
                tx.rollback(cp);
                run(&mut tx, &again);
                let mut model = tx_over(&base);
                run(&mut model, &before);
                run(&mut model, &again);
                assert_eq!(visible(&mut tx).await, visible(&mut model).await);
                assert_eq!(tx.size(), model.size());
                assert_eq!(tx.into_commit_request().unwrap().mutations,
                           model.into_commit_request().unwrap().mutations);
            });
        });
    }

    #[tokio::test]
    async fn a_primed_key_is_answered_without_a_read_and_still_conflicts() {
        let mut tx = tx_over(&[b"a"]);
        tx.prime(b"a".to_vec(), Some(b"primed".to_vec()));
        tx.prime(b"z".to_vec(), None);
        tx.set(b"w", b"mine").unwrap();
        tx.prime(b"w".to_vec(), Some(b"ignored".to_vec()));
        assert_eq!(tx.get(b"a").await.unwrap(), Some(b"primed".to_vec()));
        assert_eq!(tx.get(b"z").await.unwrap(), None);
        assert_eq!(tx.get(b"w").await.unwrap(), Some(b"mine".to_vec()));
        let read: Vec<&[u8]> = tx
            .read_conflicts()
            .iter()
            .map(|(b, _)| b.as_slice())
            .collect();
        // `w` was read from the transaction's own write: no conflict
        assert_eq!(read, vec![b"a".as_slice(), b"z"]);
    }

    #[tokio::test]
    async fn limited_range_conflicts_cover_only_what_was_returned() {
        let mut tx = tx_over(&[b"a", b"b", b"c", b"d"]);
        let rows = tx
            .get_range(RangeOption::new(b"a".to_vec(), b"z".to_vec()).with_limit(2))
            .await
            .unwrap();
        assert_eq!(keys(&rows), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(tx.read_conflicts(), &[(b"a".to_vec(), b"b\0".to_vec())]);
        let rows = tx
            .get_range(
                RangeOption::new(b"a".to_vec(), b"z".to_vec())
                    .with_limit(1)
                    .reversed(true),
            )
            .await
            .unwrap();
        assert_eq!(keys(&rows), vec![b"d".to_vec()]);
        assert_eq!(tx.read_conflicts()[1], (b"d".to_vec(), b"z".to_vec()));
        tx.get(b"q").await.unwrap();
        assert_eq!(tx.read_conflicts()[2], (b"q".to_vec(), b"q\0".to_vec()));
    }

    #[tokio::test]
    async fn clears_hiding_many_rows_fetch_more() {
        let ks: Vec<Vec<u8>> = (0u8..100).map(|i| vec![b'k', i]).collect();
        let refs: Vec<&[u8]> = ks.iter().map(|k| k.as_slice()).collect();
        let mut tx = tx_over(&refs);
        tx.clear_range(&[b'k', 0], &[b'k', 90]);
        let rows = tx.get_prefix(b"k", 3, false).await.unwrap();
        assert_eq!(
            keys(&rows),
            vec![vec![b'k', 90], vec![b'k', 91], vec![b'k', 92]]
        );
    }

    #[test]
    fn limits_change_nothing() {
        let mut tx = tx_over(&[]);
        let big_key = vec![b'k'; MAX_KEY_SIZE + 1];
        assert_eq!(
            tx.set(&big_key, b"v"),
            Err(StoreError::KeyTooLarge {
                len: MAX_KEY_SIZE + 1,
                max: MAX_KEY_SIZE
            })
        );
        assert!(matches!(
            tx.set(b"k", &vec![0; MAX_VALUE_SIZE + 1]),
            Err(StoreError::ValueTooLarge { .. })
        ));
        assert_eq!(tx.set(b"\xffsys", b"v"), Err(StoreError::ReservedKey));
        assert!(tx.is_read_only());
        let v = vec![0u8; MAX_VALUE_SIZE];
        let mut i = 0u32;
        let err = loop {
            match tx.set(&i.to_be_bytes(), &v) {
                Ok(()) => i += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::TransactionTooLarge { .. }));
        assert!(tx.size() <= MAX_TRANSACTION_SIZE);
        assert_eq!(tx.mutations.len(), i as usize);
        tx.clear(b"\xff");
        assert_eq!(tx.mutations.len(), i as usize);
        assert_eq!(
            tx.into_commit_request().unwrap_err(),
            StoreError::ReservedKey
        );
    }

    #[test]
    fn reserved_clear_fails_at_commit() {
        let mut tx = tx_over(&[]);
        tx.clear_range(b"a", b"\xff\x00");
        tx.clear_prefix(b"\xff");
        tx.clear_prefix(b"");
        assert!(!tx.is_read_only());
        assert_eq!(
            tx.into_commit_request().unwrap_err(),
            StoreError::ReservedKey
        );
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|i| b.next_delay(i * 7919)).collect();
        assert!(delays[0] >= Duration::from_micros(500) && delays[0] <= Duration::from_millis(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(50)));
        assert!(delays[11] >= Duration::from_millis(25));
    }

    /// A store whose commits always conflict, counting attempts.
    struct Conflicting(Mutex<u32>);

    #[async_trait::async_trait]
    impl Store for Conflicting {
        fn describe(&self) -> String {
            "conflicting".into()
        }
        async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
            Ok(Box::new(MemSnap(BTreeMap::new())))
        }
        async fn commit(&self, _req: CommitRequest) -> Result<Version, StoreError> {
            *self.0.lock().unwrap() += 1;
            Err(StoreError::Conflict)
        }
    }

    #[tokio::test]
    async fn transact_gives_up_after_bounded_retries() {
        let store = Arc::new(Conflicting(Mutex::new(0)));
        let db = Db::new(store.clone()).with_max_attempts(5);
        let r: Result<(), StoreError> = db
            .transact(|tx| Box::pin(async move { tx.set(b"k", b"v") }))
            .await;
        assert_eq!(r, Err(StoreError::TooManyRetries { attempts: 5 }));
        assert_eq!(*store.0.lock().unwrap(), 5);
        // Read-only transactions never reach the committer.
        let r: Result<Option<Vec<u8>>, StoreError> = db.transact(|tx| Box::pin(tx.get(b"k"))).await;
        assert_eq!(r, Ok(None));
        assert_eq!(*store.0.lock().unwrap(), 5);
    }
}
