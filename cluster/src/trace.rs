//! Tracing one operation across the nodes of a cluster: the spans of its
//! hops (the call a client made, a number reserved at an inbox's owner, a
//! commit waiting for etcd, a group at the relay, a wake-up), each recorded
//! by the process that did the work, under the operation's trace id, and
//! gathered from every member afterwards (`capstan send --trace`,
//! `capstan cluster trace ID`, `capstan bench --cluster … --trace FILE`).
//!
//! An operation is traced only when its client asks (a trace id on the
//! call): the id travels in the task that serves it (a task-local, see
//! [`scope`]) and in the calls between members that work for it (reserve,
//! relay, wake). Untraced work costs one task-local lookup per hop and
//! records nothing.
//!
//! Spans live in this process's memory, in one bounded log shared by the
//! process ([`MAX_SPANS`], oldest dropped first; at most
//! [`MAX_SPANS_PER_TRACE`] per trace): a node is one process, and the log
//! belongs to the process the way `tracing`'s global dispatcher does, so
//! that the store (whose tasks run the commits) and the node record into
//! the same place without either holding the other. Times are the wall
//! clock's microseconds: spans of one trace from several hosts line up as
//! well as their clocks do.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Spans a process keeps (all traces together).
pub const MAX_SPANS: usize = 16_384;
/// Spans one trace keeps in one process (a hop repeated more is dropped).
pub const MAX_SPANS_PER_TRACE: usize = 256;
/// Traces one call between members or one task carries (a relayed group of
/// many traced commits carries the first ones only).
pub const MAX_TRACES_PER_CALL: usize = 64;
/// Longest detail kept for a span, in bytes.
pub const MAX_DETAIL: usize = 200;

/// One hop of a traced operation, as this process recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub trace: u64,
    /// What the hop was (`reserve at owner`, `etcd Txn`, …).
    pub name: &'static str,
    /// When it began: microseconds since the Unix epoch (this host's clock).
    pub start_us: u64,
    pub dur_us: u64,
    /// Its particulars (`3 numbers in 1a2b…'s inbox`), at most [`MAX_DETAIL`] bytes.
    pub detail: String,
}

/// The traces a task works for (usually one; a relayed group's several).
pub type Traces = Arc<[u64]>;

tokio::task_local! {
    static CURRENT: Traces;
}

static LOG: Mutex<VecDeque<Span>> = Mutex::new(VecDeque::new());

/// Runs `f` as work for `traces` (none: untraced, as it was).
pub async fn scope<F: Future>(traces: &[u64], f: F) -> F::Output {
    let traces = clean(traces);
    if traces.is_empty() {
        return f.await;
    }
    CURRENT.scope(traces.into(), f).await
}

/// Runs `f` (synchronous) as work for `traces`.
pub fn sync_scope<R>(traces: &[u64], f: impl FnOnce() -> R) -> R {
    let traces = clean(traces);
    if traces.is_empty() {
        return f();
    }
    CURRENT.sync_scope(traces.into(), f)
}

/// The nonzero ids of `traces`, each once, at most [`MAX_TRACES_PER_CALL`].
fn clean(traces: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for t in traces {
        if *t != 0 && !out.contains(t) && out.len() < MAX_TRACES_PER_CALL {
            out.push(*t);
        }
    }
    out
}

/// The first [`MAX_TRACES_PER_CALL`] of `traces`: what a call carries.
pub fn for_call(traces: &[u64]) -> &[u64] {
    &traces[..traces.len().min(MAX_TRACES_PER_CALL)]
}

/// The traces the current task works for (empty: untraced).
pub fn current() -> Vec<u64> {
    CURRENT.try_with(|t| t.to_vec()).unwrap_or_default()
}

/// Whether the current task works for any trace.
pub fn active() -> bool {
    CURRENT.try_with(|t| !t.is_empty()).unwrap_or(false)
}

/// `n` and `what`, plural unless `n` is 1 (`1 commit`, `3 commits`): for details.
pub fn count(n: impl Into<u64>, what: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Microseconds since the Unix epoch now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Times a hop for some traces: [`Timer::done`] records it. Costs nothing
/// when there are none.
pub struct Timer {
    on: Option<(Vec<u64>, u64, Instant)>,
}

impl Timer {
    /// A hop of the current task's traces.
    pub fn start() -> Timer {
        Timer::start_for(current())
    }

    /// A hop of the one trace `id` (0: none, nothing is recorded).
    pub fn start_one(id: u64) -> Timer {
        Timer {
            on: (id != 0).then(|| (vec![id], now_us(), Instant::now())),
        }
    }

    /// A hop of `traces` (empty: nothing is recorded).
    pub fn start_for(traces: Vec<u64>) -> Timer {
        let traces = clean(&traces);
        Timer {
            on: (!traces.is_empty()).then(|| (traces, now_us(), Instant::now())),
        }
    }

    /// The traces it times.
    pub fn traces(&self) -> &[u64] {
        self.on.as_ref().map(|(t, ..)| t.as_slice()).unwrap_or(&[])
    }

    /// Records the hop, named `name`, with the detail `detail` makes (only
    /// called when something is recorded).
    pub fn done(self, name: &'static str, detail: impl FnOnce() -> String) {
        let Some((traces, start_us, started)) = self.on else {
            return;
        };
        let dur_us = started.elapsed().as_micros() as u64;
        let detail = truncate(detail());
        for trace in traces {
            record(Span {
                trace,
                name,
                start_us,
                dur_us,
                detail: detail.clone(),
            });
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Keeps `span` in this process's log (within the bounds above).
pub fn record(mut span: Span) {
    if span.trace == 0 {
        return;
    }
    span.detail = truncate(span.detail);
    let Ok(mut log) = LOG.lock() else {
        return;
    };
    if log.iter().filter(|s| s.trace == span.trace).count() >= MAX_SPANS_PER_TRACE {
        return;
    }
    if log.len() >= MAX_SPANS {
        log.pop_front();
    }
    log.push_back(span);
}

/// The spans this process keeps of `trace`, by start.
pub fn spans_of(trace: u64) -> Vec<Span> {
    let Ok(log) = LOG.lock() else {
        return Vec::new();
    };
    let mut out: Vec<Span> = log.iter().filter(|s| s.trace == trace).cloned().collect();
    out.sort_by_key(|s| s.start_us);
    out
}

/// A fresh trace id (nonzero), written as 16 hex digits by [`format_id`].
/// Not a secret (reading spans takes a node's control socket): ids only
/// need to differ, which a randomly keyed hash of the clock and a counter
/// gives.
pub fn new_id() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = std::collections::hash_map::RandomState::new().hash_one((now_us(), n));
    id.max(1)
}

/// `id` as operators write it: 16 hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses an id as [`format_id`] writes it (1 to 16 hex digits, not zero).
pub fn parse_id(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "bad trace id {s:?}: expected up to 16 hex digits, as `capstan send --trace` prints"
        ));
    }
    match u64::from_str_radix(t, 16) {
        Ok(0) | Err(_) => Err(format!("bad trace id {s:?}: zero is no trace")),
        Ok(id) => Ok(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scope_carries_its_traces_and_only_its_own() {
        let id = new_id();
        assert!(current().is_empty());
        scope(&[id, 0, id], async {
            assert_eq!(current(), vec![id]);
            Timer::start().done("hop", || "x".into());
        })
        .await;
        assert!(current().is_empty());
        // untraced work records nothing
        Timer::start().done("hop", || unreachable!("no detail without a trace"));
        let spans = spans_of(id);
        assert_eq!(spans.len(), 1);
        assert_eq!((spans[0].name, spans[0].detail.as_str()), ("hop", "x"));
        assert!(spans[0].start_us > 0);
    }

    #[test]
    fn the_log_is_bounded_per_trace_and_details_are_cut() {
        let id = new_id();
        for _ in 0..MAX_SPANS_PER_TRACE + 10 {
            Timer::start_for(vec![id]).done("again", || "é".repeat(MAX_DETAIL));
        }
        let spans = spans_of(id);
        assert_eq!(spans.len(), MAX_SPANS_PER_TRACE);
        assert!(spans.iter().all(|s| s.detail.len() <= MAX_DETAIL));
        assert!(LOG.lock().unwrap().len() <= MAX_SPANS);
    }

    #[test]
    fn ids_read_back_and_bad_ones_are_refused() {
        let id = new_id();
        assert_eq!(parse_id(&format_id(id)), Ok(id));
        for bad in ["", "0", "xyz", "12345678901234567", "-1"] {
            assert!(parse_id(bad).is_err(), "{bad:?}");
        }
    }
}
