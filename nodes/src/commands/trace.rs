//! A traced operation's spans (`capstan send --trace`, `capstan cluster
//! trace ID`): fetched from the node the CLI talks to, which gathers them
//! from every live member (`nodes/src/net/traces.rs`), and shown as a
//! waterfall, as JSON, or written as a Chrome trace file.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::client::Client;
use crate::output::print_json;

/// How long `send --trace` waits after its answer before fetching the
/// spans: the wake-ups of the other nodes go out just after the commit.
pub const SETTLE: Duration = Duration::from_millis(200);

/// The spans of trace `id` as the node gathers them (one JSON value:
/// `trace`, `spans`, `unanswered`).
pub async fn fetch(client: &Client, id: u64) -> anyhow::Result<Value> {
    let arg = capstan_cluster::trace::format_id(id);
    let text = client
        .call(|a| {
            let arg = arg.clone();
            async move {
                let mut r = a.cluster_request();
                r.get().set_command("trace");
                r.get().set_arg(arg.as_str());
                let answer = r.send().promise.await?;
                Ok(answer.get()?.get_json()?.to_string()?)
            }
        })
        .await?;
    serde_json::from_str(&text).context("the node sent bad JSON")
}

/// Shows the spans `v` holds: JSON with `json`, else a waterfall (offsets
/// from the first span's start); writes a Chrome trace to `chrome` if given.
pub fn show(v: &Value, chrome: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let spans = v["spans"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if let Some(path) = chrome {
        let file = crate::net::traces::chrome_trace(spans.iter().map(|s| (1, s)));
        std::fs::write(path, serde_json::to_vec(&file)?)
            .with_context(|| format!("cannot write the Chrome trace to {}", path.display()))?;
    }
    if json {
        print_json(v);
        return Ok(());
    }
    let id = v["trace"].as_str().unwrap_or("?");
    let nodes: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|s| s["node"].as_str()).collect();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    println!(
        "trace {id}: {} span{} on {} node{}",
        spans.len(),
        plural(spans.len()),
        nodes.len(),
        plural(nodes.len())
    );
    let t0 = spans
        .iter()
        .filter_map(|s| s["start_us"].as_u64())
        .min()
        .unwrap_or(0);
    println!(
        "  {:>9}  {:>9}  {:<12} {:<40} DETAIL",
        "AT ms", "TOOK ms", "NODE", "SPAN"
    );
    for s in spans {
        let at = s["start_us"].as_u64().unwrap_or(0).saturating_sub(t0);
        println!(
            "  {:>9.3}  {:>9.3}  {:<12} {:<40} {}",
            at as f64 / 1e3,
            s["dur_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            s["node"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("?"),
            s["detail"].as_str().unwrap_or("")
        );
    }
    for u in v["unanswered"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        println!(
            "  node {} did not answer ({}): its spans are missing",
            u["node"].as_str().unwrap_or("?"),
            u["error"].as_str().unwrap_or("?")
        );
    }
    if let Some(p) = chrome {
        println!("wrote {} (open it in https://ui.perfetto.dev)", p.display());
    }
    Ok(())
}
