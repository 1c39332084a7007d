//! A store transaction held open across a guest's handlers: how the single
//! owner of a guest batches the guest's writes.
//!
//! A guest runner handles a run of messages from its inbox. Without this,
//! every effect of every handler (a stored value, a reply) and the mark
//! "handled up to N" were transactions of their own: three or more commits
//! per message, each a round trip to the replicated store. With it, the
//! runner opens one [`OpenTx`]; the handlers' operations run *inside* it
//! (their reads see the batch's earlier writes), and it commits once, with
//! the marks, when the run is done. A message's effects and its mark then
//! commit together, so a crash before the commit leaves the messages
//! unhandled and they run again from scratch: exactly once without replay.
//!
//! It commits earlier (a *flush*) when
//! - its oldest uncommitted write is older than [`FLUSH_AFTER`] (a long
//!   handler's effects become durable and visible while it still runs; the
//!   guest's epoch callback checks this every tick),
//! - it holds half of what one commit may write ([`Store::max_commit_writes`]
//!   or [`FLUSH_BYTES`]),
//! - the handler calls out of the node (a model), so that what it did
//!   before is durable and the inbox numbers it took are not held open for
//!   the length of a remote call.
//!
//! A flush in the middle of a handler commits part of its effects, as every
//! write did before batching: the message's journal goes with them, and
//! the usual replay (journal plus exactly-once records, see
//! [`crate::guest::journal`]) finishes it after a crash.
//!
//! Only that replay reads a handler's exactly-once records: a message whose
//! mark commits with its effects is never handled again. So the records a
//! handler's operations write are taken back ([`Transaction::forget`]) when
//! its message completes before the next commit, and commit only with a
//! flush in the middle of it ([`OpenTx::exactly_once`]). A counter's
//! message (a stored value and a reply) wrote two such records, of about
//! ten writes in all.
//!
//! An operation that fails is rolled back ([`Transaction::rollback`]): it
//! leaves nothing in the batch. A commit that fails (a conflict: someone
//! wrote what the batch read) *poisons* the batch: nothing of it after the
//! last flush happened, and the runner handles those messages again. Inbox
//! numbers it took are then never written: its own copies are known lost
//! (the runner skips them at once), other inboxes close the hole after
//! their grace ([`crate::rules::inbox`]).
//!
//! Effects that must wait for the commit (waking the recipient of a message)
//! are queued with [`OpenTx::after_commit`] and run after the commit.
//!
//! [`Store::max_commit_writes`]: capstan_cluster::Store::max_commit_writes

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's: virtual under a paused clock (simulations), else the system's.
use tokio::time::Instant;

use capstan_cluster::{Db, Transaction, TxFuture};

use crate::cluster::Fence;
use crate::error::Error;
use crate::journal::Journal;

/// Oldest an uncommitted write of a batch gets before the batch commits.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Bytes of writes after which a batch commits (well below one commit's
/// limit, so that the next operation still fits).
pub const FLUSH_BYTES: usize = 512 * 1024;
/// Most exactly-once records a batch takes back; past it they commit (as
/// they did before any were taken back).
const MAX_SPARED: usize = 4096;

type AfterCommit = Box<dyn FnOnce() + Send>;

/// See the module documentation.
pub(crate) struct OpenTx {
    db: Db,
    /// Checked in every transaction the batch opens (after each flush).
    fence: Option<Fence>,
    max_writes: usize,
    /// Whether its transactions start on a snapshot that answers checked
    /// reads from what the store remembers ([`Store::snapshot_remembering`]):
    /// a batch commits everything it read, so a stale value costs a
    /// conflict, never a wrong effect; a batch run again after a conflict
    /// reads afresh.
    ///
    /// [`Store::snapshot_remembering`]: capstan_cluster::Store::snapshot_remembering
    remember: bool,
    tx: tokio::sync::Mutex<Option<Transaction>>,
    side: Mutex<Side>,
}

#[derive(Default)]
struct Side {
    /// Run after the next successful commit, in order.
    after: Vec<AfterCommit>,
    /// When the oldest write not committed yet was made.
    oldest: Option<Instant>,
    /// Why the batch cannot commit (a failed commit, a store error).
    poisoned: Option<Error>,
    /// The journal of the message being handled: written with a flush.
    journal: Option<Arc<Journal>>,
    /// Own-inbox numbers of the copies this batch wrote, committed or not.
    own: BTreeSet<u64>,
    /// The same, not committed yet.
    own_pending: Vec<u64>,
    /// Messages marked handled in the uncommitted part.
    completed: u64,
    /// Messages marked handled whose mark has committed (taken by the runner).
    committed: u64,
    /// Values known without reading, for the transaction (see
    /// [`Transaction::prime`]).
    primes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Exactly-once records the message being handled wrote since the last
    /// commit.
    records: Vec<Vec<u8>>,
    /// Those of messages completed since the last commit: taken back from
    /// the transaction when it commits (their marks commit with it).
    spare: Vec<Vec<u8>>,
}

impl OpenTx {
    pub(crate) fn new(db: Db, fence: Option<Fence>) -> OpenTx {
        let max_writes = db.store().max_commit_writes();
        OpenTx {
            db,
            fence,
            max_writes,
            remember: false,
            tx: tokio::sync::Mutex::new(None),
            side: Mutex::new(Side::default()),
        }
    }

    /// The same batch, reading from what the store remembers when
    /// `remember` (see the field's documentation).
    pub(crate) fn remembering(mut self, remember: bool) -> OpenTx {
        self.remember = remember;
        self
    }

    fn side(&self) -> std::sync::MutexGuard<'_, Side> {
        self.side.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in the batch's transaction (opening one if needed); on an
    /// error, undoes what `f` wrote. A store error that a retry would cure
    /// (a conflict) poisons the batch: the runner starts the run again.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: for<'t> FnOnce(&'t mut Transaction) -> TxFuture<'t, T, Error>,
    {
        if let Some(e) = self.side().poisoned.clone() {
            return Err(e);
        }
        let full = {
            let guard = self.tx.lock().await;
            guard.as_ref().is_some_and(|tx| {
                tx.mutation_count() * 2 >= self.max_writes || tx.size() >= FLUSH_BYTES
            })
        };
        if full {
            self.flush().await?;
        }
        let mut guard = self.tx.lock().await;
        if guard.is_none() {
            *guard = Some(self.begin().await.inspect_err(|e| self.poison(e))?);
        }
        let tx = guard.as_mut().expect("opened above");
        for (k, v) in std::mem::take(&mut self.side().primes) {
            tx.prime(k, v);
        }
        let cp = tx.checkpoint();
        let before = tx.mutation_count();
        match f(tx).await {
            Ok(t) => {
                if tx.mutation_count() > before {
                    self.side().oldest.get_or_insert_with(Instant::now);
                }
                Ok(t)
            }
            Err(e) => {
                tx.rollback(cp);
                if matches!(&e, Error::Store(se) if se.is_retryable())
                    || matches!(e, Error::Fenced(_))
                {
                    self.poison(&e);
                }
                Err(e)
            }
        }
    }

    async fn begin(&self) -> Result<Transaction, Error> {
        let snapshot = if self.remember {
            self.db.store().snapshot_remembering().await?
        } else {
            self.db.store().snapshot().await?
        };
        let mut tx = Transaction::new(snapshot);
        if let Some(f) = &self.fence {
            f.check(&mut tx).await?;
        }
        Ok(tx)
    }

    fn poison(&self, e: &Error) {
        self.side().poisoned.get_or_insert_with(|| e.clone());
    }

    /// Why the batch cannot commit, if it cannot.
    pub(crate) fn poisoned(&self) -> Option<Error> {
        self.side().poisoned.clone()
    }

    /// Queues `f` to run once what the batch wrote so far has committed.
    pub(crate) fn after_commit(&self, f: impl FnOnce() + Send + 'static) {
        self.side().after.push(Box::new(f));
    }

    /// The journal of the message now handled (`None` between messages).
    pub(crate) fn set_journal(&self, j: Option<Arc<Journal>>) {
        self.side().journal = j;
    }

    /// Tells the batch what `key` holds without reading it: a message record
    /// the runner just listed (records are written once), or an
    /// exactly-once record that cannot exist yet (a handler's first run).
    /// See [`Transaction::prime`].
    pub(crate) fn prime(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let mut s = self.side();
        if s.primes.len() < capstan_cluster::store::MAX_PREFETCHED {
            s.primes.push((key, value));
        }
    }

    /// Notes a copy written to the runner's own inbox under `number`.
    pub(crate) fn own_copy(&self, number: u64) {
        let mut s = self.side();
        s.own.insert(number);
        s.own_pending.push(number);
    }

    /// Whether `number` is a copy this batch wrote to the own inbox.
    pub(crate) fn is_own_copy(&self, number: u64) -> bool {
        self.side().own.contains(&number)
    }

    /// Counts one handled message whose mark is now in the batch.
    pub(crate) fn completed(&self, message: bool) {
        let mut s = self.side();
        s.completed += u64::from(message);
        let done = std::mem::take(&mut s.records);
        if s.spare.len() + done.len() <= MAX_SPARED {
            s.spare.extend(done);
        }
    }

    /// Notes the exactly-once record `key` a handler's operation wrote in
    /// the batch (module docs: it commits only if the batch commits before
    /// the message completes).
    pub(crate) fn exactly_once(&self, key: Vec<u8>) {
        let mut s = self.side();
        if s.records.len() < MAX_SPARED {
            s.records.push(key);
        }
    }

    /// Messages whose marks committed since the last call.
    pub(crate) fn take_committed(&self) -> u64 {
        std::mem::take(&mut self.side().committed)
    }

    /// Whether the batch should commit now (its oldest write waited
    /// [`FLUSH_AFTER`]).
    pub(crate) fn due(&self) -> bool {
        self.side()
            .oldest
            .is_some_and(|t| t.elapsed() >= FLUSH_AFTER)
    }

    /// Commits what the batch holds (with the journal of the message being
    /// handled, if it has news), then runs what waited for the commit.
    pub(crate) async fn flush(&self) -> Result<(), Error> {
        let mut guard = self.tx.lock().await;
        if let Some(e) = self.side().poisoned.clone() {
            return Err(e);
        }
        let Some(mut tx) = guard.take() else {
            return Ok(());
        };
        let journal = self.side().journal.clone();
        let mut generation = None;
        if let Some(j) = &journal
            && let Some((bytes, g)) = j.pending()
            && !tx.is_read_only()
        {
            if let Err(e) = capstan_cluster::blob::set_blob(&mut tx, j.key_bytes(), &bytes).await {
                let e = Error::from(e);
                self.poison(&e);
                return Err(e);
            }
            generation = Some(g);
        }
        // (a commit that fails poisons the batch, which is then discarded
        // whole: nothing set aside here is needed again)
        for k in std::mem::take(&mut self.side().spare) {
            tx.forget(&k);
        }
        if !tx.is_read_only() {
            let committed = match tx.into_commit_request() {
                Ok(req) => self.db.store().commit(req).await.map_err(Error::from),
                Err(e) => Err(Error::from(e)),
            };
            if let Err(e) = committed {
                self.poison(&e);
                return Err(e);
            }
        }
        if let (Some(j), Some(g)) = (&journal, generation) {
            j.flushed(g);
        }
        let after = {
            let mut s = self.side();
            s.oldest = None;
            s.own_pending.clear();
            s.committed += std::mem::take(&mut s.completed);
            // committed with the message still in progress (a replay after
            // a crash finds them)
            s.records.clear();
            std::mem::take(&mut s.after)
        };
        drop(guard);
        for f in after {
            f();
        }
        Ok(())
    }

    /// Lets go of a transaction that wrote nothing, so that the next
    /// operation reads a fresh snapshot (the runner waited meanwhile).
    pub(crate) async fn reset(&self) {
        let mut guard = self.tx.lock().await;
        if guard.as_ref().is_some_and(|tx| tx.is_read_only()) {
            *guard = None;
        }
    }

    /// Gives up on the uncommitted part (after it was poisoned): its
    /// queued effects are dropped; returns the own-inbox numbers it took
    /// and will never write.
    pub(crate) async fn discard(&self) -> Vec<u64> {
        let mut guard = self.tx.lock().await;
        *guard = None;
        let mut s = self.side();
        s.after.clear();
        s.oldest = None;
        s.completed = 0;
        s.journal = None;
        s.primes.clear();
        s.records.clear();
        s.spare.clear();
        let lost = std::mem::take(&mut s.own_pending);
        for n in &lost {
            s.own.remove(n);
        }
        lost
    }
}
