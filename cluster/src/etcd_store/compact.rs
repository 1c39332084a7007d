//! Compacting etcd's history.
//!
//! Etcd keeps every revision of every key, deleted keys included, until
//! the history is compacted, and stops taking writes once its database
//! reaches its quota (2 GiB by default; then every member answers
//! "mvcc: database space exceeded"). A Capstan cluster writes all the time,
//! idle or not: each node renews its lease (a put of its member record and
//! a commit marker, five times a second), and every commit leaves its
//! marker behind, deleted later by its lease. Without compaction an idle
//! three-node cluster grows etcd's database without bound and one day
//! stops taking writes (measured in stop 38: see the README). Etcd compacts
//! on its own only when its members were started with
//! `--auto-compaction-*`; an operator's etcd may not be.
//!
//! So the store compacts what it no longer needs. A transaction reads at
//! one revision (its snapshot) and commits with compares against it, so a
//! revision may go once no transaction can still be reading at it: the
//! store keeps [`super::EtcdConfig::history`] (spec option `history-ms`, default
//! [`DEFAULT_HISTORY`]; 0: never compact, the operator does). Every tenth
//! of that, each client notes the latest revision it saw; once it holds a
//! note older than the history, it compacts to the newest such revision,
//! unless another client of the cluster did within the last tenth: the
//! clients take turns through the record `PREFIX/k` (`MS:REVISION`, the
//! time and revision of the last compaction), claimed with a compare on
//! its mod revision, so three nodes compact about once per tenth, not
//! three times. A read at a compacted revision fails as a conflict and its
//! transaction runs again on a fresh snapshot; one that takes longer than
//! the history (a backup of a large store) is refused so, over and over:
//! give such a store a longer history. Compaction is etcd-wide: stores
//! with other prefixes on the same etcd keep the shortest history of any.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{Failure, Inner, bump};
use crate::etcd_rpc::{Compare, RequestOp, TxnRequest, compare_result};
use crate::store::Version;

/// How long the store keeps etcd's history by default.
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(600);
/// The longest history a spec may ask for (a week).
pub const MAX_HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Notes of the latest revision seen, and the turns taken, per history.
const NOTES_PER_HISTORY: u32 = 10;

/// The time between notes for `history`: a tenth of it, within 20 ms and
/// 60 s.
pub(super) fn period(history: Duration) -> Duration {
    (history / NOTES_PER_HISTORY).clamp(Duration::from_millis(20), Duration::from_secs(60))
}

/// Starts the compactor of `inner` (nothing when its history is 0): a task
/// on the store's runtime that ends with the store.
pub(super) fn start(inner: &Arc<Inner>) {
    let history = inner.config.history;
    if history.is_zero() {
        return;
    }
    let weak = Arc::downgrade(inner);
    inner.runtime.spawn(run(weak, history));
}

async fn run(weak: Weak<Inner>, history: Duration) {
    let period = period(history);
    let mut notes: VecDeque<(Instant, Version)> = VecDeque::new();
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = weak.upgrade() else { return };
        let latest = inner.latest.load(Ordering::Acquire);
        if latest > 0 {
            notes.push_back((Instant::now(), latest));
        }
        // The newest note older than the history (the older ones go).
        let now = Instant::now();
        let mut due = None;
        while let Some(&(at, v)) = notes.front() {
            if now.duration_since(at) < history {
                break;
            }
            due = Some((at, v));
            notes.pop_front();
        }
        let Some((at, target)) = due else { continue };
        match compact(&inner, target, period).await {
            Ok(Some(to)) => tracing::debug!(revision = to, "compacted etcd's history"),
            // another client's turn
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("could not compact etcd's history (tried again later): {e}");
                notes.push_front((at, target));
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The record of the last compaction: when (ms since the epoch) and to
/// which revision; `None` for a value of another form.
fn parse_record(v: &[u8]) -> Option<(u64, Version)> {
    let (ms, rev) = std::str::from_utf8(v).ok()?.split_once(':')?;
    Some((ms.parse().ok()?, rev.parse().ok()?))
}

/// Whether a client that would compact to `target` at `now` (ms since
/// the epoch) takes the turn, given the record of the last compaction:
/// not when that went as far, nor when it was less than nine tenths of a
/// period ago. A record time ahead of this clock by more than a period is
/// another node's skewed clock (or junk) and holds no turn: the others
/// would otherwise wait for that clock.
fn my_turn(last: Option<(u64, Version)>, target: Version, now: u64, period: Duration) -> bool {
    let period_ms = period.as_millis() as u64;
    match last {
        None => true,
        Some((_, rev)) if rev >= target => false,
        Some((ms, _)) if ms > now.saturating_add(period_ms) => true,
        Some((ms, _)) => now >= ms.saturating_add(period_ms * 9 / 10),
    }
}

/// Compacts to `target` unless another client compacted within `period`
/// or as far already: `Some(revision)` when this client did.
async fn compact(
    inner: &Arc<Inner>,
    target: Version,
    period: Duration,
) -> Result<Option<Version>, String> {
    let key = inner.compacted_key.clone();
    let got = inner
        .get_key("compaction record read", &key)
        .await
        .map_err(|e| super::to_store_error(e).to_string())?;
    let (mod_revision, last) = match &got {
        Some(kv) => (kv.mod_revision, parse_record(&kv.value)),
        None => (0, None),
    };
    let now = now_ms();
    if !my_turn(last, target, now, period) {
        return Ok(None);
    }
    // Claim the turn: the record unchanged since it was read.
    let value = format!("{now}:{target}").into_bytes();
    let claimed = inner
        .endpoints
        .call("compaction claim", |kv| {
            let req = TxnRequest {
                compare: vec![Compare::mod_revision(
                    key.clone(),
                    compare_result::EQUAL,
                    mod_revision,
                )],
                success: vec![RequestOp::put(key.clone(), value.clone(), 0)],
                failure: vec![],
            };
            async move { kv.txn(req).await }
        })
        .await
        .map_err(|e| super::to_store_error(e).to_string())?;
    if !claimed.succeeded {
        return Ok(None);
    }
    let revision = i64::try_from(target).map_err(|_| "revision out of range".to_string())?;
    match inner
        .endpoints
        .call("compaction", |kv| async move { kv.compact(revision).await })
        .await
    {
        Ok(_) => {}
        // compacted as far already (by an operator, or etcd itself)
        Err(Failure::Compacted) => return Ok(None),
        Err(e) => return Err(super::to_store_error(e).to_string()),
    }
    bump(&inner.counters.compactions, 1);
    inner
        .counters
        .compacted_to
        .fetch_max(target, Ordering::Relaxed);
    Ok(Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_junk_is_none() {
        assert_eq!(
            parse_record(b"1700000000000:42"),
            Some((1_700_000_000_000, 42))
        );
        assert_eq!(parse_record(b"42"), None);
        assert_eq!(parse_record(b"x:1"), None);
        assert_eq!(parse_record(&[0xff, b':', b'1']), None);
    }

    #[test]
    fn turns_go_to_whoever_comes_a_period_after_the_last() {
        let p = Duration::from_secs(60);
        let t = 1_700_000_000_000;
        assert!(my_turn(None, 10, t, p));
        // compacted as far already, however long ago
        assert!(!my_turn(Some((t - 3_600_000, 10)), 10, t, p));
        // another client's turn a moment ago, then nine tenths of a period
        assert!(!my_turn(Some((t - 1_000, 5)), 10, t, p));
        assert!(my_turn(Some((t - 54_000, 5)), 10, t, p));
        // a clock an hour ahead holds no turn; one a little ahead does
        assert!(my_turn(Some((t + 3_600_000, 5)), 10, t, p));
        assert!(!my_turn(Some((t + 30_000, 5)), 10, t, p));
    }

    #[test]
    fn notes_come_a_tenth_of_the_history_apart_within_bounds() {
        assert_eq!(period(Duration::from_secs(600)), Duration::from_secs(60));
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(
            period(Duration::from_millis(500)),
            Duration::from_millis(50)
        );
        assert_eq!(period(Duration::from_millis(50)), Duration::from_millis(20));
    }
}
