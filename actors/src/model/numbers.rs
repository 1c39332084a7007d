//! Inbox numbers in the store: the next one to hand out (past the last
//! message, the dismissals' mark and, to find the last message cheaply,
//! the inbox's hint), and whether a guest is behind.

use capstan_cluster::Transaction;
use capstan_cluster::tuple::TupleReader;
use capstan_proto::FormulaId;

use crate::error::Error;
use crate::keys;

/// Every so many message numbers, the message written records its number
/// as the inbox's hint (`keys::inbox_hint`): one more key in one send of
/// 1,024, and the search for the inbox's last message reads from there on
/// (see [`next_message_number`]).
pub const INBOX_HINT_EVERY: u64 = 1024;

/// The interval this process writes hints at: [`INBOX_HINT_EVERY`] unless
/// [`set_inbox_hint_every`] changed it.
static HINT_EVERY: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(INBOX_HINT_EVERY);

/// Writes an inbox hint every `n` numbers (at least 1) in this process
/// from now on, instead of every [`INBOX_HINT_EVERY`]. For simulations
/// and tests, whose inboxes stay small: a hint only says where the search
/// for the last message starts, so any interval gives the same numbers,
/// and a small one makes every take-over of an inbox start from a hint.
pub fn set_inbox_hint_every(n: u64) {
    HINT_EVERY.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Whether the message numbered `number` records its number as the
/// inbox's hint.
pub(crate) fn writes_hint(number: u64) -> bool {
    let every = HINT_EVERY.load(std::sync::atomic::Ordering::Relaxed);
    number > 0 && number.is_multiple_of(every) && number < PLACEHOLDER_NUMBERS
}

/// Numbers at and above this are placeholders that a relay fills in at
/// commit (`capstan_cluster::Transaction::fill`), never an inbox's: a
/// sender's own copy may take one (`crate::mail`), and no hint records one.
pub(crate) const PLACEHOLDER_NUMBERS: u64 = 1 << 63;

/// The next unused message number of an inbox: above the last message and
/// above the high-water mark left by dismissals, so numbers are never reused.
///
/// The last message is found with a reverse read, which etcd answers by
/// reading and sorting every key of the range whatever the limit (about
/// 100 ms for an inbox of 100,000 messages, measured with etcd 3.4). The
/// read therefore starts at the inbox's hint, a number written within the
/// last [`INBOX_HINT_EVERY`] numbers, and covers the whole inbox only when
/// there is no hint or nothing at or above it (its messages dismissed).
pub async fn next_message_number(tx: &mut Transaction, agent: &FormulaId) -> Result<u64, Error> {
    let (hint_key, mark_key) = (keys::inbox_hint(agent), keys::inbox_mark(agent));
    tx.prefetch(&[hint_key.clone(), mark_key.clone()]).await?;
    let hint = match tx.get(&hint_key).await? {
        Some(b) => match <[u8; 8]>::try_from(b.as_slice()) {
            Ok(b) => Some(u64::from_be_bytes(b)),
            Err(_) => {
                // (only a hint: the whole inbox is read instead)
                tracing::warn!(agent = %agent.short(), "ignoring a malformed inbox hint of {} bytes", b.len());
                None
            }
        },
        None => None,
    };
    let mut last = None;
    if let Some(h) = hint {
        last = last_message_from(tx, agent, h).await?;
    }
    if last.is_none() {
        last = last_message_from(tx, agent, 0).await?;
    }
    let mut next = last.map_or(0, |n| n + 1);
    if let Some(b) = tx.get(&mark_key).await? {
        next = next.max(inbox_mark_value(&b)?);
    }
    Ok(next)
}

/// The number of the last message of an inbox numbered `from` or above.
async fn last_message_from(
    tx: &mut Transaction,
    agent: &FormulaId,
    from: u64,
) -> Result<Option<u64>, Error> {
    let rows = tx
        .get_range(capstan_cluster::RangeOption {
            begin: keys::message(agent, from),
            end: capstan_cluster::tuple::prefix_end(&keys::inbox(agent)),
            limit: 1,
            reverse: true,
        })
        .await?;
    let Some((k, _)) = rows.first() else {
        return Ok(None);
    };
    let mut r = TupleReader::new(k);
    let n = (|| -> Result<u64, capstan_cluster::tuple::TupleError> {
        r.str()?;
        r.bytes()?;
        r.u64()
    })()
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(Some(n))
}

/// Whether an inbox holds a message numbered `number` or above: one
/// forward read of a single key. (A guest is behind when it does; asking
/// [`next_message_number`] instead would read the inbox's last key with a
/// reverse read, which etcd answers by reading and sorting every message of
/// the inbox whatever the limit.)
pub async fn has_message_from(
    tx: &Transaction,
    agent: &FormulaId,
    number: u64,
) -> Result<bool, Error> {
    // (at the snapshot: `get_range` would read a chunk of pairs for a
    // limit of one, and note a read conflict a look does not need)
    let rows = tx
        .snapshot_range(
            &capstan_cluster::RangeOption::new(
                keys::message(agent, number),
                capstan_cluster::tuple::prefix_end(&keys::inbox(agent)),
            )
            .with_limit(1),
        )
        .await?;
    Ok(!rows.is_empty())
}

/// A stored inbox mark's value.
pub(crate) fn inbox_mark_value(b: &[u8]) -> Result<u64, Error> {
    b.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt("inbox mark is not 8 bytes".into()))
}

/// An inbox's mark read at the snapshot (no read conflict): every number
/// below it is written or stays empty (`put_message` refuses it).
pub async fn inbox_mark_snapshot(tx: &mut Transaction, agent: &FormulaId) -> Result<u64, Error> {
    match tx.snapshot_get(&keys::inbox_mark(agent)).await? {
        Some(b) => inbox_mark_value(&b),
        None => Ok(0),
    }
}

/// Records that numbers below `number + 1` are used (before a dismissal).
pub async fn raise_inbox_mark(
    tx: &mut Transaction,
    agent: &FormulaId,
    number: u64,
) -> Result<(), Error> {
    let key = keys::inbox_mark(agent);
    let cur = match tx.get(&key).await? {
        Some(b) => u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8])),
        None => 0,
    };
    if number + 1 > cur {
        tx.set(&key, &(number + 1).to_be_bytes())?;
    }
    Ok(())
}
