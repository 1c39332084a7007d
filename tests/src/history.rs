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
//! guest's replies: no message skipped, none handled twice;
//! [`History::check_settled`] that requests are settled at most once.

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

    /// Settles request NUMBER of the acting agent's inbox on `node`:
    /// `resolve NUMBER VALUE` when `value` is given, else `reject NUMBER
    /// REASON`; recorded as kind `resolve`/`reject` to `request NUMBER`.
    pub fn settle(
        &self,
        node: &Node,
        via: &str,
        number: u64,
        value: Option<&str>,
        timeout: Duration,
    ) -> Outcome {
        let n = number.to_string();
        let reason = format!("rejected through {via}");
        let (kind, args) = match value {
            Some(v) => ("resolve", vec!["resolve", n.as_str(), v]),
            None => ("reject", vec!["reject", n.as_str(), reason.as_str()]),
        };
        let start = self.now();
        let outcome = match node.run_for(&args, timeout) {
            Some(r) if r.success() => Outcome::Ok,
            Some(r) => Outcome::Failed(r.stderr.trim().to_string()),
            None => Outcome::Unknown,
        };
        let end = self.now();
        let text = format!("{kind} {n} via {via}");
        self.record(
            kind,
            via,
            &format!("request {n}"),
            &text,
            start,
            end,
            outcome.clone(),
        );
        outcome
    }

    /// Checks the settling of requests against the inbox holding them
    /// (`state` of each request message): each request settled at most
    /// once (at most one `resolve`/`reject` acknowledged), its state that
    /// of the acknowledged one, or, with none acknowledged, pending or that
    /// of one that failed or timed out. Returns how many were settled.
    pub fn check_settled(&self, inbox: &[Value]) -> usize {
        let ops: Vec<Op> = self
            .ops()
            .into_iter()
            .filter(|o| o.kind == "resolve" || o.kind == "reject")
            .collect();
        let mut by_request: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for o in &ops {
            by_request.entry(&o.to).or_default().push(o);
        }
        let mut settled = 0;
        let mut problems = Vec::new();
        for (req, ops) in by_request {
            let number: u64 = req["request ".len()..].parse().expect("request N");
            let Some(m) = inbox.iter().find(|m| m["number"] == number) else {
                problems.push(format!("{req} is not in the inbox"));
                continue;
            };
            let state = m["state"].as_str().unwrap_or("");
            let kind_of = |state: &str| {
                if state.starts_with("resolved") {
                    Some("resolve")
                } else if state.starts_with("rejected") {
                    Some("reject")
                } else {
                    None
                }
            };
            let shown: Vec<String> = ops.iter().map(|o| format!("  {o}")).collect();
            let oks: Vec<&&Op> = ops.iter().filter(|o| o.outcome == Outcome::Ok).collect();
            let ok = match oks.as_slice() {
                [] => true,
                [o] => kind_of(state) == Some(o.kind.as_str()),
                _ => false,
            };
            let unsure_ok = oks.is_empty()
                && (kind_of(state).is_none()
                    || ops.iter().any(|o| Some(o.kind.as_str()) == kind_of(state)));
            if !(ok && (!oks.is_empty() || unsure_ok)) {
                problems.push(format!("{req} is {state:?} after:\n{}", shown.join("\n")));
            }
            if kind_of(state).is_some() {
                settled += 1;
            }
        }
        assert!(
            problems.is_empty(),
            "requests settled more than once or not as acknowledged; the shortest history showing each:\n{}",
            problems.join("\n")
        );
        settled
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
    fn a_request_settled_twice_fails() {
        let h = History::new();
        let ms = Duration::from_millis;
        let req = "request 4";
        h.record("resolve", "n1", req, "r", ms(0), ms(5), Outcome::Ok);
        h.record("reject", "n2", req, "j", ms(1), ms(6), Outcome::Unknown);
        let inbox = |state: &str| vec![json!({"number": 4, "state": state})];
        assert_eq!(h.check_settled(&inbox("resolved")), 1);
        for bad in ["rejected: x", "pending"] {
            let r = std::panic::catch_unwind(|| h.check_settled(&inbox(bad)));
            assert!(r.is_err(), "{bad} passed");
        }
        h.record("reject", "n3", req, "k", ms(7), ms(9), Outcome::Ok);
        let r = std::panic::catch_unwind(|| h.check_settled(&inbox("resolved")));
        assert!(r.is_err(), "two acknowledged settlements passed");
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
