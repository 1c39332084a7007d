//! An in-memory backend with seeded fault injection, for tests and simulations.
//!
//! [`MemStore`] keeps everything in the process: nothing survives the process,
//! and two stores never share data (`mem:` in [`crate::open`] is a fresh, empty,
//! fault-free store every time). It implements the same model as the durable
//! backends, so the conformance suite runs against it unchanged (less the checks
//! that reopen a store, see [`crate::conformance_tests!`]).
//!
//! # Model
//!
//! - A multi-version map: each key has its values by commit [`Version`] (a
//!   clear is a tombstone), and a snapshot at version `v` reads the newest value
//!   at or below `v`. Every commit with mutations gets the next version; a commit
//!   without mutations answers the current one.
//! - Commits are serializable, FoundationDB's rule: a request whose
//!   read-conflict ranges overlap a key range written by a commit after its
//!   `read_version` is refused with [`StoreError::Conflict`]. The written ranges
//!   of recent commits are kept in a write log for that check. Accepted
//!   mutations are applied atomically, under one lock, in order. Requests are
//!   validated like the redb backend's ([`crate::redb_store`]'s limits).
//!
//! # Retained history ("transaction too old")
//!
//! Memory is bounded by a *history window* of [`DEFAULT_HISTORY_WINDOW`]
//! versions ([`MemStore::with_history_window`]) and by [`MAX_LOG_RANGES`]:
//!
//! - the write log keeps the ranges written by the last `window` commits (fewer
//!   if they exceed [`MAX_LOG_RANGES`] ranges). A commit that read something at a
//!   version older than the log (the *log horizon*) is refused with
//!   [`StoreError::Conflict`]: its conflicts can no longer be checked, so it is
//!   treated as conflicting (retrying it with a fresh snapshot succeeds);
//! - old values are kept only as far back as the oldest live snapshot (a
//!   snapshot is live until dropped), and never further back than the log
//!   horizon. With no snapshot alive, only the newest value of each key is kept.
//!   A snapshot older than that, one that stayed alive across more than
//!   `window` commits, fails every read with [`StoreError::Conflict`], like
//!   FoundationDB's `transaction_too_old`: a snapshot never reads wrong data.
//!
//! # Faults
//!
//! [`MemStore::with_faults`] injects faults drawn from a small deterministic
//! generator (splitmix64) seeded by [`Faults::seed`]: the same seed and the same
//! sequence of calls give the same faults. Each call draws at fixed points, so
//! the sequence only depends on the order of calls (with concurrent callers,
//! on how they interleave):
//!
//! - *delays* of reads ([`Store::snapshot`], [`Snapshot::get`],
//!   [`Snapshot::range`]) and commits, with `tokio::time::sleep`: under tokio's
//!   paused clock a delay advances virtual time only;
//! - *spurious conflicts*: a commit that read something refused with
//!   [`StoreError::Conflict`] although nothing conflicts; nothing is applied
//!   (blind writes never conflict, on any backend, so they get none);
//! - *maybe committed*: the caller gets [`StoreError::MaybeCommitted`], and the
//!   commit was applied or not, decided by the seed (a commit that really
//!   conflicts is never applied);
//! - *stopped* ([`MemStore::stop`], [`MemStore::start`]): while stopped, every
//!   call, reads of snapshots taken before included, fails with
//!   [`StoreError::Io`], the error the network backends give when the store
//!   cannot be reached. It is not retried by [`crate::Db::transact`]; a call
//!   delayed across a `stop` fails too; nothing is lost: after `start` the store
//!   answers again with the same data.
//!
//! What was injected is counted ([`MemStore::fault_counts`]).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::redb_store::validate;
use crate::store::{
    CommitRequest, KeyValue, Mutation, RangeOption, Snapshot, Store, StoreError, Version,
};

/// Versions of history kept by default (see the module docs).
pub const DEFAULT_HISTORY_WINDOW: Version = 100_000;
/// Written ranges kept in the write log, at most; beyond, the oldest commits are
/// forgotten (reads older than them conflict).
pub const MAX_LOG_RANGES: usize = 100_000;
/// A probability of 1 in parts per million: a fault with this rate (or more) always happens.
pub const PPM: u32 = 1_000_000;

/// Faults to inject, with probabilities in parts per million ([`PPM`] = always).
///
/// Build with struct update syntax: `Faults { conflict_ppm: 50_000, ..Faults::seeded(7) }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Seed of the generator that decides every fault.
    pub seed: u64,
    /// Commits with read-conflict ranges refused with [`StoreError::Conflict`]
    /// although nothing conflicts (blind writes get none).
    pub conflict_ppm: u32,
    /// Commits answered [`StoreError::MaybeCommitted`], applied or not (decided by the seed).
    pub maybe_committed_ppm: u32,
    /// Reads (`snapshot`, `get`, `range`) delayed by up to [`Faults::max_delay`].
    pub read_delay_ppm: u32,
    /// Commits delayed by up to [`Faults::max_delay`] before being decided.
    pub commit_delay_ppm: u32,
    /// Longest delay; each delay is drawn uniformly in `(0, max_delay]`. Zero: no delays.
    pub max_delay: Duration,
}

impl Faults {
    /// No faults (seed 0).
    pub const fn none() -> Self {
        Faults::seeded(0)
    }

    /// No faults yet, with `seed`: the base to set rates on.
    pub const fn seeded(seed: u64) -> Self {
        Faults {
            seed,
            conflict_ppm: 0,
            maybe_committed_ppm: 0,
            read_delay_ppm: 0,
            commit_delay_ppm: 0,
            max_delay: Duration::ZERO,
        }
    }

    /// True when no fault can happen.
    pub fn is_none(&self) -> bool {
        let delays = !self.max_delay.is_zero() && (self.read_delay_ppm | self.commit_delay_ppm) > 0;
        self.conflict_ppm == 0 && self.maybe_committed_ppm == 0 && !delays
    }
}

/// Faults injected so far by a [`MemStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounts {
    /// Commits refused with a conflict that did not exist.
    pub spurious_conflicts: u64,
    /// Commits answered "maybe committed" that were applied.
    pub maybe_committed_applied: u64,
    /// Commits answered "maybe committed" that were not applied.
    pub maybe_committed_dropped: u64,
    /// Reads delayed.
    pub read_delays: u64,
    /// Commits delayed.
    pub commit_delays: u64,
    /// Sum of all delays.
    pub delayed: Duration,
    /// Calls refused because the store was stopped.
    pub refused_while_stopped: u64,
}

/// What a [`MemStore`] holds now (to check that its memory stays bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryStats {
    /// The latest committed version.
    pub version: Version,
    /// Snapshots at versions below this fail their reads (too old).
    pub oldest_readable: Version,
    /// Commits that read at versions below this conflict (older writes are forgotten).
    pub log_horizon: Version,
    /// Keys with at least one retained version (tombstones included).
    pub keys: usize,
    /// Retained versions of values and tombstones, over all keys.
    pub versions: usize,
    /// Ranges in the write log.
    pub log_ranges: usize,
    /// Snapshots not yet dropped.
    pub live_snapshots: usize,
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to decide faults.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `ppm` in a million; draws nothing when `ppm` is 0.
    fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.next_u64() % u64::from(PPM) < u64::from(ppm)
    }
}

/// The versions of one key, oldest first; `None` is a tombstone (cleared).
type History = Vec<(Version, Option<Vec<u8>>)>;
/// A key range `[begin, end)`.
type KeyRange = (Vec<u8>, Vec<u8>);

/// The in-memory store (see the module docs). Cheap to share: wrap it in an `Arc`.
pub struct MemStore {
    shared: Arc<Shared>,
}

struct Shared {
    describe: String,
    faults: Faults,
    stopped: AtomicBool,
    state: Mutex<State>,
}

struct State {
    version: Version,
    data: BTreeMap<Vec<u8>, History>,
    /// Ranges written by each commit with a version above `log_horizon`, oldest first.
    log: VecDeque<(Version, Vec<KeyRange>)>,
    log_ranges: usize,
    log_horizon: Version,
    /// Oldest readable version (`>= log_horizon`): every key keeps its newest
    /// version at or below it, and all versions above it.
    floor: Version,
    /// Live snapshots by version (reference counts).
    live: BTreeMap<Version, usize>,
    window: Version,
    rng: SplitMix64,
    counts: FaultCounts,
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Read,
    Commit,
}

impl MemStore {
    /// An empty store without faults.
    pub fn new() -> Self {
        MemStore::with_faults(Faults::none())
    }

    /// An empty store injecting `faults` (see the module docs).
    pub fn with_faults(faults: Faults) -> Self {
        let describe = if faults.is_none() {
            "mem:".to_string()
        } else {
            format!("mem: (seeded faults, seed {})", faults.seed)
        };
        MemStore {
            shared: Arc::new(Shared {
                describe,
                faults,
                stopped: AtomicBool::new(false),
                state: Mutex::new(State {
                    version: 0,
                    data: BTreeMap::new(),
                    log: VecDeque::new(),
                    log_ranges: 0,
                    log_horizon: 0,
                    floor: 0,
                    live: BTreeMap::new(),
                    window: DEFAULT_HISTORY_WINDOW,
                    rng: SplitMix64(faults.seed),
                    counts: FaultCounts::default(),
                }),
            }),
        }
    }

    /// The same store keeping `versions` versions of history instead of
    /// [`DEFAULT_HISTORY_WINDOW`] (see the module docs; 0 keeps only the latest).
    pub fn with_history_window(self, versions: Version) -> Self {
        {
            let mut st = self.shared.lock_anyway();
            st.window = versions;
            st.collect();
        }
        self
    }

    /// The faults this store injects.
    pub fn faults(&self) -> Faults {
        self.shared.faults
    }

    /// Faults injected so far.
    pub fn fault_counts(&self) -> FaultCounts {
        self.shared.lock_anyway().counts
    }

    /// What the store retains now.
    pub fn history_stats(&self) -> HistoryStats {
        let st = self.shared.lock_anyway();
        HistoryStats {
            version: st.version,
            oldest_readable: st.floor,
            log_horizon: st.log_horizon,
            keys: st.data.len(),
            versions: st.data.values().map(Vec::len).sum(),
            log_ranges: st.log_ranges,
            live_snapshots: st.live.values().sum(),
        }
    }

    /// Makes the store unreachable: every call fails with [`StoreError::Io`] until [`MemStore::start`].
    pub fn stop(&self) {
        tracing::debug!(store = %self.shared.describe, "stopped");
        self.shared.stopped.store(true, Ordering::SeqCst);
    }

    /// Makes a stopped store answer again, with the data it had.
    pub fn start(&self) {
        tracing::debug!(store = %self.shared.describe, "started");
        self.shared.stopped.store(false, Ordering::SeqCst);
    }

    /// True between [`MemStore::stop`] and [`MemStore::start`].
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// The latest committed value of `key` and the store's version, read at
    /// once without faults or delays: for a checker that must see the state
    /// right after a commit (a simulation's invariants), not for callers of
    /// the [`Store`] model.
    pub fn peek(&self, key: &[u8]) -> (Option<Vec<u8>>, Version) {
        let st = self.shared.lock_anyway();
        (st.value_at(key, st.version), st.version)
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| {
            StoreError::Io(format!(
                "{}: state poisoned by a panic in the store",
                self.describe
            ))
        })
    }

    /// The state even if poisoned (for counters and statistics).
    fn lock_anyway(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse_if_stopped(&self) -> Result<(), StoreError> {
        if !self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.lock()?.counts.refused_while_stopped += 1;
        Err(StoreError::Io(format!(
            "{} is stopped (unreachable); it answers again after MemStore::start",
            self.describe
        )))
    }

    /// Refuses the call if stopped, then waits out a delay if one is drawn.
    async fn enter(&self, call: Call) -> Result<(), StoreError> {
        self.refuse_if_stopped()?;
        let delay = self.lock()?.draw_delay(&self.faults, call);
        if let Some(delay) = delay {
            tracing::trace!(store = %self.describe, ?call, ?delay, "injected delay");
            tokio::time::sleep(delay).await;
            self.refuse_if_stopped()?;
        }
        Ok(())
    }
}

impl State {
    fn draw_delay(&mut self, faults: &Faults, call: Call) -> Option<Duration> {
        let ppm = match call {
            Call::Read => faults.read_delay_ppm,
            Call::Commit => faults.commit_delay_ppm,
        };
        if faults.max_delay.is_zero() || !self.rng.chance(ppm) {
            return None;
        }
        let max = u64::try_from(faults.max_delay.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(1 + self.rng.next_u64() % max);
        match call {
            Call::Read => self.counts.read_delays += 1,
            Call::Commit => self.counts.commit_delays += 1,
        }
        self.counts.delayed += delay;
        Some(delay)
    }

    fn check_readable(&self, version: Version) -> Result<(), StoreError> {
        if version < self.floor {
            tracing::debug!(
                version,
                oldest_readable = self.floor,
                "snapshot too old: its history is no longer kept"
            );
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    fn value_at(&self, key: &[u8], version: Version) -> Option<Vec<u8>> {
        value_in(self.data.get(key)?, version).cloned()
    }

    fn range_at(&self, opt: &RangeOption, version: Version) -> Vec<KeyValue> {
        if opt.begin >= opt.end {
            return Vec::new();
        }
        let limit = if opt.limit == 0 {
            usize::MAX
        } else {
            opt.limit
        };
        let iter = self.data.range::<[u8], _>((
            Bound::Included(opt.begin.as_slice()),
            Bound::Excluded(opt.end.as_slice()),
        ));
        let visible =
            |(k, h): (&Vec<u8>, &History)| value_in(h, version).map(|v| (k.clone(), v.clone()));
        if opt.reverse {
            iter.rev().filter_map(visible).take(limit).collect()
        } else {
            iter.filter_map(visible).take(limit).collect()
        }
    }

    /// True if `req` read something written after its read version (or older than the log).
    fn conflicts(&self, req: &CommitRequest) -> bool {
        let reads = &req.read_conflicts;
        if reads.is_empty() {
            return false;
        }
        if req.read_version < self.log_horizon {
            tracing::debug!(
                read_version = req.read_version,
                log_horizon = self.log_horizon,
                "commit read older than the write log: conflict"
            );
            return true;
        }
        self.log
            .iter()
            .rev()
            .take_while(|(v, _)| *v > req.read_version)
            .any(|(_, written)| {
                written
                    .iter()
                    .any(|w| reads.iter().any(|r| r.0 < w.1 && w.0 < r.1))
            })
    }

    /// Applies `mutations` at the next version (none: nothing, the current version).
    fn apply(&mut self, mutations: &[Mutation]) -> Version {
        if mutations.is_empty() {
            return self.version;
        }
        let v = self.version + 1;
        for m in mutations {
            match m {
                Mutation::Set(k, val) => {
                    let h = self.data.entry(k.clone()).or_default();
                    match h.last_mut() {
                        Some((last, old)) if *last == v => *old = Some(val.clone()),
                        _ => h.push((v, Some(val.clone()))),
                    }
                }
                Mutation::Clear(k) => {
                    if let Some(h) = self.data.get_mut(k) {
                        tombstone(h, v);
                    }
                }
                Mutation::ClearRange(b, e) if b < e => {
                    for (_, h) in self.data.range_mut::<[u8], _>((
                        Bound::Included(b.as_slice()),
                        Bound::Excluded(e.as_slice()),
                    )) {
                        tombstone(h, v);
                    }
                }
                Mutation::ClearRange(..) => {}
            }
        }
        let written: Vec<KeyRange> = mutations.iter().map(Mutation::written_range).collect();
        self.version = v;
        self.log_ranges += written.len();
        self.log.push_back((v, written));
        self.collect();
        v
    }

    /// Forgets what no snapshot and no commit check can need any more.
    fn collect(&mut self) {
        let horizon = self
            .log_horizon
            .max(self.version.saturating_sub(self.window));
        let oldest_live = self.live.keys().next().copied().unwrap_or(self.version);
        self.advance_floor(oldest_live.max(horizon));
        self.forget_log_through(horizon);
        while self.log_ranges > MAX_LOG_RANGES {
            let Some(&(oldest, _)) = self.log.front() else {
                break;
            };
            self.advance_floor(oldest);
            self.forget_log_through(oldest);
        }
    }

    /// Raises the oldest readable version to `floor`, dropping the versions of
    /// keys written since the previous one that only older snapshots could read.
    fn advance_floor(&mut self, floor: Version) {
        if floor <= self.floor {
            return;
        }
        let old = self.floor;
        let start = self.log.partition_point(|(v, _)| *v <= old);
        let end = self.log.partition_point(|(v, _)| *v <= floor);
        let data = &mut self.data;
        for (_, written) in self.log.range(start..end) {
            for (b, e) in written {
                prune_range(data, b, e, floor);
            }
        }
        self.floor = floor;
    }

    /// Drops the log entries at or below `horizon` (which must not exceed the floor).
    fn forget_log_through(&mut self, horizon: Version) {
        debug_assert!(horizon <= self.floor);
        while let Some((v, written)) = self.log.front() {
            if *v > horizon {
                break;
            }
            self.log_ranges -= written.len();
            self.log.pop_front();
        }
        self.log_horizon = self.log_horizon.max(horizon);
    }

    fn register(&mut self) -> Version {
        *self.live.entry(self.version).or_default() += 1;
        self.version
    }

    fn release(&mut self, version: Version) {
        if let Some(n) = self.live.get_mut(&version) {
            *n -= 1;
            if *n == 0 {
                self.live.remove(&version);
                self.collect();
            }
        }
    }
}

/// The value of a key at `version` (its newest version at or below it).
fn value_in(h: &History, version: Version) -> Option<&Vec<u8>> {
    h.iter()
        .rev()
        .find(|(v, _)| *v <= version)
        .and_then(|(_, val)| val.as_ref())
}

/// Clears a key at version `v` (if it has a value to clear).
fn tombstone(h: &mut History, v: Version) {
    let Some((last, val)) = h.last_mut() else {
        return;
    };
    if *last == v {
        *val = None;
    } else if val.is_some() {
        h.push((v, None));
    }
}

/// Keeps, for each key in `[b, e)`, its newest version at or below `floor` (none
/// if that is a tombstone) and the versions above; removes keys left empty.
fn prune_range(data: &mut BTreeMap<Vec<u8>, History>, b: &[u8], e: &[u8], floor: Version) {
    if b >= e {
        return;
    }
    let mut emptied = Vec::new();
    for (k, h) in data.range_mut::<[u8], _>((Bound::Included(b), Bound::Excluded(e))) {
        let at_or_below = h.partition_point(|(v, _)| *v <= floor);
        if at_or_below > 0 {
            h.drain(..at_or_below - 1);
            if h[0].1.is_none() {
                h.remove(0);
            }
        }
        if h.is_empty() {
            emptied.push(k.clone());
        }
    }
    for k in emptied {
        data.remove(&k);
    }
}

struct MemSnapshot {
    shared: Arc<Shared>,
    version: Version,
}

impl Drop for MemSnapshot {
    fn drop(&mut self) {
        self.shared.lock_anyway().release(self.version);
    }
}

#[async_trait::async_trait]
impl Snapshot for MemSnapshot {
    fn version(&self) -> Version {
        self.version
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.shared.enter(Call::Read).await?;
        let st = self.shared.lock()?;
        st.check_readable(self.version)?;
        Ok(st.value_at(key, self.version))
    }

    async fn range(&self, opt: &RangeOption) -> Result<Vec<KeyValue>, StoreError> {
        self.shared.enter(Call::Read).await?;
        let st = self.shared.lock()?;
        st.check_readable(self.version)?;
        Ok(st.range_at(opt, self.version))
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    fn describe(&self) -> String {
        self.shared.describe.clone()
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        self.shared.enter(Call::Read).await?;
        let version = self.shared.lock()?.register();
        Ok(Box::new(MemSnapshot {
            shared: self.shared.clone(),
            version,
        }))
    }

    async fn commit(&self, req: CommitRequest) -> Result<Version, StoreError> {
        self.shared.refuse_if_stopped()?;
        crate::redb_store::refuse_fills(&req, "in-memory")?;
        validate(&req)?;
        self.shared.enter(Call::Commit).await?;
        let faults = &self.shared.faults;
        let mut st = self.shared.lock()?;
        // Blind writes never conflict, on any backend: no spurious conflict either.
        if !req.read_conflicts.is_empty() && st.rng.chance(faults.conflict_ppm) {
            st.counts.spurious_conflicts += 1;
            tracing::debug!(store = %self.shared.describe, "injected conflict");
            return Err(StoreError::Conflict);
        }
        let conflicts = st.conflicts(&req);
        if st.rng.chance(faults.maybe_committed_ppm) {
            let applied = st.rng.next_u64() & 1 == 1 && !conflicts;
            if applied {
                let version = st.apply(&req.mutations);
                st.counts.maybe_committed_applied += 1;
                tracing::debug!(store = %self.shared.describe, version, "injected maybe-committed (applied)");
            } else {
                st.counts.maybe_committed_dropped += 1;
                tracing::debug!(store = %self.shared.describe, "injected maybe-committed (not applied)");
            }
            return Err(StoreError::MaybeCommitted);
        }
        if conflicts {
            return Err(StoreError::Conflict);
        }
        Ok(st.apply(&req.mutations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference() {
        // First outputs of the reference implementation for seed 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut r = SplitMix64(1);
        assert!(!r.chance(0));
        assert!(r.chance(PPM));
        assert!(r.chance(u32::MAX));
        let hits = (0..100_000).filter(|_| r.chance(250_000)).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }

    fn key(i: u64) -> Vec<u8> {
        vec![b'k', (i % 12) as u8]
    }

    /// Random sets, clears and range clears, with snapshots taken and dropped at
    /// random, each checked against a copy of the model taken with it.
    #[tokio::test]
    async fn snapshots_read_their_version_while_history_is_pruned() {
        let store = MemStore::new().with_history_window(40);
        let mut rng = SplitMix64(99);
        type Model = BTreeMap<Vec<u8>, Vec<u8>>;
        let mut model = Model::new();
        let mut snaps: Vec<(Box<dyn Snapshot>, Model)> = Vec::new();
        let everything = RangeOption::new(Vec::new(), vec![0xFF]);
        let (mut checked, mut too_old) = (0, 0);
        for step in 0..3000u64 {
            let n = 1 + rng.next_u64() % 3;
            let mut mutations = Vec::new();
            for _ in 0..n {
                let k = key(rng.next_u64());
                match rng.next_u64() % 4 {
                    0 | 1 => {
                        let v = step.to_be_bytes().to_vec();
                        model.insert(k.clone(), v.clone());
                        mutations.push(Mutation::Set(k, v));
                    }
                    2 => {
                        model.remove(&k);
                        mutations.push(Mutation::Clear(k));
                    }
                    _ => {
                        let e = key(rng.next_u64());
                        if k < e {
                            model.retain(|x, _| !(*x >= k && *x < e));
                        }
                        mutations.push(Mutation::ClearRange(k, e));
                    }
                }
            }
            let req = CommitRequest {
                facts: Default::default(),
                fills: Vec::new(),
                read_version: 0,
                read_conflicts: vec![],
                mutations,
            };
            store.commit(req).await.unwrap();
            match rng.next_u64() % 8 {
                0 if snaps.len() < 6 => {
                    snaps.push((store.snapshot().await.unwrap(), model.clone()));
                }
                1 if !snaps.is_empty() => {
                    let i = (rng.next_u64() % snaps.len() as u64) as usize;
                    snaps.swap_remove(i);
                }
                _ => {}
            }
            let version = store.history_stats().version;
            for (snap, seen) in &snaps {
                let got = snap.range(&everything).await;
                if snap.version() + 40 < version {
                    assert_eq!(got, Err(StoreError::Conflict), "too old at {step}");
                    too_old += 1;
                    continue;
                }
                let want: Vec<KeyValue> =
                    seen.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(got.unwrap(), want, "snapshot {} at {step}", snap.version());
                let k = key(rng.next_u64());
                assert_eq!(snap.get(&k).await.unwrap(), seen.get(&k).cloned());
                checked += 1;
            }
            let stats = store.history_stats();
            assert!(stats.log_ranges <= 40 * 3, "{stats:?}");
            assert!(stats.keys <= 12, "{stats:?}");
        }
        assert!(
            checked > 1000 && too_old > 100,
            "{checked} checked, {too_old} too old"
        );
        drop(snaps);
        let stats = store.history_stats();
        assert_eq!(stats.live_snapshots, 0);
        assert_eq!(stats.oldest_readable, stats.version);
        assert_eq!(
            stats.keys,
            model.len(),
            "only live keys are left: {stats:?}"
        );
        assert_eq!(stats.versions, model.len(), "one version each: {stats:?}");
    }
}
