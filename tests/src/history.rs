//! A workload's history and its checker (issue 17).
//!
//! Clients record each operation they run: what, through which node, when
//! it started and ended (since the history began), and its outcome:
//!
//! - `Ok`: the command succeeded (acknowledged);
//! - `Failed`: it exited with an error (the error text is kept; a failed
//!   command may still have been applied, e.g. "outcome unknown" errors,
//!   so the checker treats it as at most once);
//! - `Unknown`: it did not finish in time and was killed.
//!
//! After the test, [`History::check_inbox`] compares the sends with the
//! recipient's inbox: every acknowledged send is there exactly once, every
//! other at most once, nothing is there that nobody sent, inbox numbers do
//! not repeat, and a send acknowledged before another one started has the
//! lower number (the inbox is appended to in real-time order). A violation
//! panics with the shortest history showing it: the operations involved
//! and the inbox entries they produced. [`check_counts`] checks a counter
//! guest's replies: no message skipped, none handled twice.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Node;

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    Unknown,
}

/// One operation of the workload.
#[derive(Debug, Clone)]
pub struct Op {
    /// Its index in the history.
    pub n: usize,
    /// The node (host) the command went through.
    pub via: String,
    /// `send`, …
    pub kind: String,
    /// The recipient.
    pub to: String,
    /// The text (unique per history: it identifies the operation).
    pub text: String,
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match &self.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Failed(e) => format!("failed: {}", e.trim()),
            Outcome::Unknown => "unknown (timed out)".to_string(),
        };
        write!(
            f,
            "#{} [{:>8.3}s – {:>8.3}s] via {} {} {} {:?} -> {}",
            self.n,
            self.start.as_secs_f64(),
            self.end.as_secs_f64(),
            self.via,
            self.kind,
            self.to,
            self.text,
            outcome
        )
    }
}

/// What [`History::check_inbox`] found (all invariants held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Failed or unknown sends that were applied all the same (once).
    pub applied_anyway: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acknowledged, {} failed, {} unknown; {} of the failed/unknown were applied (once)",
            self.ok, self.failed, self.unknown, self.applied_anyway
        )
    }
}

/// The operations of a workload (shared by its client threads).
pub struct History {
    t0: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            t0: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Time since the history began.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Runs `capstan send TO TEXT EXTRA…` on `node` (called `via`) for at
    /// most `timeout` and records it.
    pub fn send(
        &self,
        node: &Node,
        via: &str,
        to: &str,
        text: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Outcome {
        let mut args: Vec<&OsStr> = vec![OsStr::new("send"), OsStr::new(to), OsStr::new(text)];
        args.extend(extra.iter().map(OsStr::new));
        let start = self.now();
        let outcome = match node.run_for(&args, timeout) {
            Some(r) if r.success() => Outcome::Ok,
            Some(r) => Outcome::Failed(r.stderr.trim().to_string()),
            None => Outcome::Unknown,
        };
        let end = self.now();
        self.record("send", via, to, text, start, end, outcome.clone());
        outcome
    }

    /// Records an operation run by other means.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        kind: &str,
        via: &str,
        to: &str,
        text: &str,
        start: Duration,
        end: Duration,
        outcome: Outcome,
    ) {
        let mut ops = self.ops.lock().unwrap();
        let n = ops.len();
        ops.push(Op {
            n,
            via: via.to_string(),
            kind: kind.to_string(),
            to: to.to_string(),
            text: text.to_string(),
            start,
            end,
            outcome,
        });
    }

    /// Every operation so far, in the order they were recorded.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    /// Checks the sends to `to` against its inbox (see the module
    /// documentation). `ours` says which inbox texts the workload could have
    /// sent (others, sent before it, are ignored). Panics on a violation.
    pub fn check_inbox(&self, to: &str, inbox: &[Value], ours: impl Fn(&str) -> bool) -> Summary {
        let ops: Vec<Op> = self
            .ops()
            .into_iter()
            .filter(|o| o.kind == "send" && o.to == to)
            .collect();
        let mut by_text: BTreeMap<&str, &Op> = BTreeMap::new();
        for o in &ops {
            assert!(
                by_text.insert(&o.text, o).is_none(),
                "the workload sent {:?} twice: texts must identify operations",
                o.text
            );
        }
        // Inbox entries per text, and number uniqueness.
        let mut found: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        let mut numbers: BTreeMap<u64, &Value> = BTreeMap::new();
        for m in inbox {
            let text = m["text"].as_str().unwrap_or("").to_string();
            if let Some(n) = m["number"].as_u64()
                && let Some(prev) = numbers.insert(n, m)
            {
                panic!("{to}'s inbox number {n} is used twice:\n  {prev}\n  {m}");
            }
            if ours(&text) {
                found.entry(text).or_default().push(m);
            }
        }
        let mut s = Summary::default();
        let mut problems = Vec::new();
        for (text, entries) in &found {
            match by_text.get(text.as_str()) {
                None => problems.push(format!(
                    "{to}'s inbox holds {text:?}, which no operation sent:\n  {}",
                    show(entries)
                )),
                Some(o) if entries.len() > 1 => problems.push(format!(
                    "applied {} times:\n  {o}\n  {}",
                    entries.len(),
                    show(entries)
                )),
                Some(_) => {}
            }
        }
        for o in &ops {
            let times = found.get(&o.text).map_or(0, Vec::len);
            match o.outcome {
                Outcome::Ok => {
                    s.ok += 1;
                    if times == 0 {
                        problems.push(format!("acknowledged but not in {to}'s inbox:\n  {o}"));
                    }
                }
                Outcome::Failed(_) => s.failed += 1,
                Outcome::Unknown => s.unknown += 1,
            }
            if o.outcome != Outcome::Ok && times == 1 {
                s.applied_anyway += 1;
            }
        }
        // Real-time order: a send acknowledged before another began is numbered lower.
        let number = |o: &Op| -> Option<u64> {
            let e = found.get(&o.text)?;
            (e.len() == 1).then(|| e[0]["number"].as_u64()).flatten()
        };
        let mut acked: Vec<(&Op, u64)> = ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok)
            .filter_map(|o| number(o).map(|n| (o, n)))
            .collect();
        acked.sort_by_key(|(o, _)| o.end);
        'order: for (i, (a, na)) in acked.iter().enumerate() {
            for (b, nb) in &acked[i + 1..] {
                if b.start > a.end && nb < na {
                    problems.push(format!(
                        "out of real-time order: the second send began after the first was acknowledged, but has the lower number:\n  {a}  => number {na}\n  {b}  => number {nb}"
                    ));
                    break 'order;
                }
            }
        }
        if !problems.is_empty() {
            panic!(
                "history check of {to}'s inbox failed ({} problem(s); {s}); the shortest history showing each:\n{}",
                problems.len(),
                problems.join("\n")
            );
        }
        s
    }
}

/// Checks the replies of a counter guest (`count = N`, in its host's inbox
/// order) to the `increment`s sent to it: `1, 2, …, K` each once, in order
/// (a gap is a message the guest skipped, a repeat one handled twice), with
/// `acked ≤ K ≤ acked + unsure` (every acknowledged increment handled; the
/// failed or unknown ones at most once). Returns K; panics otherwise.
pub fn check_counts(replies: &[u64], acked: usize, unsure: usize) -> usize {
    for (i, &n) in replies.iter().enumerate() {
        let want = i as u64 + 1;
        if n != want {
            let from = i.saturating_sub(2);
            panic!(
                "the guest's replies go {:?} at position {i}: {}; expected count = {want}",
                &replies[from..(i + 1).min(replies.len())],
                if n > want {
                    "a message was skipped"
                } else {
                    "a message was handled twice"
                }
            );
        }
    }
    let k = replies.len();
    assert!(
        acked <= k && k <= acked + unsure,
        "the guest handled {k} increments; {acked} were acknowledged and {unsure} failed or timed out"
    );
    k
}

fn show(entries: &[&Value]) -> String {
    entries
        .iter()
        .map(|m| format!("inbox #{} {:?}", m["number"], m["text"]))
        .collect::<Vec<_>>()
        .join("\n  ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h() -> History {
        let h = History::new();
        let ms = Duration::from_millis;
        h.record("send", "n1", "a", "m0", ms(0), ms(10), Outcome::Ok);
        h.record("send", "n1", "a", "m1", ms(20), ms(30), Outcome::Ok);
        h.record("send", "n2", "a", "m2", ms(25), ms(90), Outcome::Unknown);
        h.record(
            "send",
            "n2",
            "a",
            "m3",
            ms(40),
            ms(50),
            Outcome::Failed("x".into()),
        );
        h
    }

    fn inbox(entries: &[(u64, &str)]) -> Vec<Value> {
        entries
            .iter()
            .map(|(n, t)| json!({"number": n, "text": t}))
            .collect()
    }

    #[test]
    fn a_good_history_passes() {
        let s = h().check_inbox("a", &inbox(&[(0, "m0"), (1, "m1"), (2, "m2")]), |t| {
            t.starts_with('m')
        });
        assert_eq!(
            s,
            Summary {
                ok: 2,
                failed: 1,
                unknown: 1,
                applied_anyway: 1
            }
        );
    }

    #[test]
    #[should_panic(expected = "acknowledged but not in")]
    fn a_lost_send_fails() {
        h().check_inbox("a", &inbox(&[(0, "m0")]), |_| true);
    }

    #[test]
    #[should_panic(expected = "applied 2 times")]
    fn a_doubled_unknown_send_fails() {
        h().check_inbox(
            "a",
            &inbox(&[(0, "m0"), (1, "m1"), (2, "m2"), (3, "m2")]),
            |_| true,
        );
    }

    #[test]
    #[should_panic(expected = "out of real-time order")]
    fn reordered_sends_fail() {
        h().check_inbox("a", &inbox(&[(1, "m0"), (0, "m1")]), |_| true);
    }

    #[test]
    fn counts_in_order_pass_and_gaps_or_repeats_fail() {
        assert_eq!(check_counts(&[1, 2, 3], 2, 1), 3);
        for bad in [&[1, 3][..], &[1, 2, 2]] {
            let r = std::panic::catch_unwind(|| check_counts(bad, 0, 3));
            assert!(r.is_err(), "{bad:?} passed");
        }
        assert!(std::panic::catch_unwind(|| check_counts(&[1], 2, 0)).is_err());
    }

    #[test]
    #[should_panic(expected = "no operation sent")]
    fn a_phantom_message_fails() {
        h().check_inbox("a", &inbox(&[(0, "m0"), (1, "m1"), (2, "m9")]), |_| true);
    }
}
