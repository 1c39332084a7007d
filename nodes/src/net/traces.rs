//! Gathering a traced operation's spans from the members of the cluster
//! (`cluster` command `trace`): this node's own and each live member's
//! (`Member.spans`), asked at once, each within [`SPANS_TIMEOUT`]; a member
//! that does not answer is named in the answer, not an error; and the
//! spans as a Chrome trace file ([`chrome_trace`]).

use std::rc::Rc;
use std::time::Duration;

use capstan_cluster::trace;
use serde_json::{Value, json};

use super::Net;

/// Longest wait for one member's spans.
pub const SPANS_TIMEOUT: Duration = Duration::from_secs(2);
/// Most spans one member's answer may hold (a node keeps at most
/// `trace::MAX_SPANS_PER_TRACE`).
const MAX_SPANS_ANSWERED: u32 = trace::MAX_SPANS_PER_TRACE as u32;

/// Writes `traces` (at most what a call carries) into a call's `traces`
/// list, `init` making the list of the length given.
pub(super) fn write_traces<'a>(
    traces: &[u64],
    init: impl FnOnce(u32) -> capnp::primitive_list::Builder<'a, u64>,
) {
    let traces = trace::for_call(traces);
    if traces.is_empty() {
        return;
    }
    let mut l = init(traces.len() as u32);
    for (i, t) in traces.iter().enumerate() {
        l.set(i as u32, *t);
    }
}

/// One span as the answer lists it.
fn span_json(node: &str, name: &str, start_us: u64, dur_us: u64, detail: &str) -> Value {
    json!({"node": node, "name": name, "start_us": start_us, "dur_us": dur_us, "detail": detail})
}

impl Net {
    /// The spans of `id` this node and every live member recorded, by start:
    /// `{"trace": ID, "spans": [...], "unanswered": [names]}`.
    pub async fn gather_spans(self: &Rc<Self>, id: u64) -> Value {
        let me = self
            .runtime()
            .membership()
            .map(|c| c.cfg.name.clone())
            .unwrap_or_else(|| "this node".into());
        let mut spans: Vec<Value> = trace::spans_of(id)
            .iter()
            .map(|s| span_json(&me, s.name, s.start_us, s.dur_us, &s.detail))
            .collect();
        let others = self
            .runtime()
            .membership()
            .map(|c| c.others())
            .unwrap_or_default();
        let asked = others.iter().map(|m| async move {
            let got = tokio::time::timeout(SPANS_TIMEOUT, self.spans_at(&m.addr, id)).await;
            (m.name.clone(), got)
        });
        let mut unanswered = Vec::new();
        for (name, got) in futures::future::join_all(asked).await {
            match got {
                Ok(Ok(list)) => spans.extend(
                    list.into_iter()
                        .map(|(n, s, d, det)| span_json(&name, &n, s, d, &det)),
                ),
                Ok(Err(e)) => unanswered.push(json!({"node": name, "error": e})),
                Err(_) => unanswered.push(json!({"node": name, "error": "no answer"})),
            }
        }
        spans.sort_by_key(|s| s["start_us"].as_u64().unwrap_or(0));
        json!({"trace": trace::format_id(id), "spans": spans, "unanswered": unanswered})
    }

    /// The spans the member at `addr` recorded of `id`: (name, start, duration, detail).
    async fn spans_at(
        self: &Rc<Self>,
        addr: &str,
        id: u64,
    ) -> Result<Vec<(String, u64, u64, String)>, String> {
        let m = self.member(addr).await?;
        let mut r = m.spans_request();
        r.get().set_trace(id);
        let a = r.send().promise.await.map_err(|e| e.to_string())?;
        let a = a.get().map_err(|e| e.to_string())?;
        let l = a.get_spans().map_err(|e| e.to_string())?;
        if l.len() > MAX_SPANS_ANSWERED {
            return Err(format!(
                "answered {} spans, more than a node keeps",
                l.len()
            ));
        }
        let text = |t: capnp::Result<capnp::text::Reader<'_>>| {
            t.ok()
                .and_then(|t| t.to_str().ok().map(str::to_string))
                .unwrap_or_default()
        };
        Ok(l.iter()
            .map(|s| {
                (
                    text(s.get_name()),
                    s.get_start_us(),
                    s.get_dur_us(),
                    text(s.get_detail()),
                )
            })
            .collect())
    }
}

/// Spans (each with its thread: the CLI puts one trace on thread 1, the
/// bench each traced send on its own) in Chrome's trace event format:
/// complete events (`ph: X`), one process per node, named by metadata
/// events. What Perfetto and chrome://tracing open.
pub fn chrome_trace<'a>(spans: impl Iterator<Item = (u64, &'a Value)> + Clone) -> Value {
    let mut nodes: Vec<&str> = spans
        .clone()
        .filter_map(|(_, s)| s["node"].as_str())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let pid = |n: &str| nodes.iter().position(|m| *m == n).unwrap_or(0) + 1;
    let mut events: Vec<Value> = nodes
        .iter()
        .map(|n| json!({"name": "process_name", "ph": "M", "pid": pid(n), "args": {"name": n}}))
        .collect();
    for (thread, s) in spans {
        events.push(json!({
            "name": s["name"],
            "ph": "X",
            "ts": s["start_us"],
            "dur": s["dur_us"],
            "pid": pid(s["node"].as_str().unwrap_or("?")),
            "tid": thread,
            "args": {"detail": s["detail"]},
        }));
    }
    json!({"traceEvents": events, "displayTimeUnit": "ms"})
}
