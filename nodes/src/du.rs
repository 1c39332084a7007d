//! `capstan du`: what the store holds, by kind of key.
//!
//! The node scans its store a page at a time (`Node.usage`); this end adds
//! the pages up, so memory stays bounded on both ends, and shows progress on
//! stderr once a scan has taken more than a second.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::usage_page;
use crate::home::Paths;
use crate::output::{bytes_human, print_json};

/// Keys the node scans per call.
const PAGE_KEYS: u32 = 10_000;
/// A scan shows progress once it has run this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

pub async fn du(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut totals: Vec<(String, u64, u64)> = Vec::new();
    let mut start = Vec::new();
    let mut progress = false;
    loop {
        let (kinds, next) = usage_page(paths, &start, PAGE_KEYS).await?;
        for (kind, keys, bytes) in kinds {
            match totals.iter_mut().find(|(k, _, _)| *k == kind) {
                Some(t) => {
                    t.1 += keys;
                    t.2 += bytes;
                }
                None => totals.push((kind, keys, bytes)),
            }
        }
        let Some(next) = next else { break };
        start = next;
        if started.elapsed() >= PROGRESS_AFTER {
            progress = true;
            let keys: u64 = totals.iter().map(|t| t.1).sum();
            let bytes: u64 = totals.iter().map(|t| t.2).sum();
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\rscanned {keys} keys, {} ({:.0} s)…",
                human(bytes),
                started.elapsed().as_secs_f64()
            );
            let _ = err.flush();
        }
    }
    if progress {
        eprintln!();
    }
    let total_keys: u64 = totals.iter().map(|t| t.1).sum();
    let total_bytes: u64 = totals.iter().map(|t| t.2).sum();
    if json {
        let kinds: Vec<_> = totals
            .iter()
            .map(|(k, keys, bytes)| json!({"kind": k, "keys": keys, "bytes": bytes}))
            .collect();
        print_json(&json!({
            "kinds": kinds,
            "total_keys": total_keys,
            "total_bytes": total_bytes,
        }));
    } else {
        println!(
            "{:<10} {:>10} {:>14} {:>10}",
            "KIND", "KEYS", "BYTES", "SIZE"
        );
        for (k, keys, bytes) in &totals {
            println!("{k:<10} {keys:>10} {bytes:>14} {:>10}", human(*bytes));
        }
        println!(
            "{:<10} {total_keys:>10} {total_bytes:>14} {:>10}",
            "total",
            human(total_bytes)
        );
    }
    Ok(())
}

fn human(n: u64) -> String {
    bytes_human(usize::try_from(n).unwrap_or(usize::MAX))
}

/// `capstan gc`: one collection pass on the node; what it freed.
pub async fn gc(paths: &Paths, keep_answers_secs: u64, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let call = crate::client::gc(paths, keep_answers_secs.saturating_mul(1000));
    tokio::pin!(call);
    let mut progress = false;
    let report = loop {
        tokio::select! {
            r = &mut call => break r?,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if started.elapsed() >= PROGRESS_AFTER {
                    progress = true;
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\rcollecting garbage ({:.0} s)…", started.elapsed().as_secs_f64());
                    let _ = err.flush();
                }
            }
        }
    };
    if progress {
        eprintln!();
    }
    let get = |k: &str| {
        report
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if json {
        let obj: serde_json::Map<String, serde_json::Value> = report
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        print_json(&serde_json::Value::Object(obj));
    } else {
        let n = |k: &str| get(k).as_u64().unwrap_or(0);
        println!(
            "freed {} formulas ({} values) and {} answers: {} keys, {} ({} bytes)",
            n("formulas"),
            n("values"),
            n("answers"),
            n("keys"),
            human(n("bytes")),
            n("bytes")
        );
        println!(
            "scanned {} formulas, {} reachable, {} kept (referenced during the pass), {:.1} s",
            n("scanned"),
            n("reachable"),
            n("kept"),
            n("elapsed_ms") as f64 / 1000.0
        );
        if get("interrupted").as_bool() == Some(true) {
            println!(
                "stopped early: a writer referenced a condemned formula; run `capstan gc` again"
            );
        }
    }
    Ok(())
}
