//! `capstan bench --soak N` (the store's size and the daemon's memory under
//! sends, with or without dismissals and gc) and `capstan bench --gc N`
//! (one gc pass over N formulas).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp::Error as CapError;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::agent;
use serde_json::json;

use super::calls::{as_agent, concurrently, host, mkguest, ms, remove, send, stats, store_text};
use super::process::Daemon;
use super::{Row, print_rows, step};
use capstan::client;
use capstan::home::Paths;
use capstan::output::print_json;

pub(super) async fn dismiss(a: &agent::Client, number: u64) -> Result<(), CapError> {
    let mut r = a.dismiss_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_number(number);
    r.send().promise.await?;
    Ok(())
}

/// The numbers of every message in `a`'s inbox, a page at a time.
pub(super) async fn inbox_numbers(a: &agent::Client) -> Result<Vec<u64>, CapError> {
    let (mut out, mut from) = (Vec::new(), 0u64);
    loop {
        let mut r = a.inbox_request();
        r.get().set_from(from);
        r.get().set_limit(10_000);
        let answer = r.send().promise.await?;
        let answer = answer.get()?;
        for m in answer.get_messages()?.iter() {
            out.push(m.get_number());
            from = from.max(m.get_number() + 1);
        }
        if !answer.get_more() {
            return Ok(out);
        }
    }
}

/// Keys and bytes the store holds (the `du` scan).
pub(super) async fn store_size(paths: &Paths) -> anyhow::Result<(u64, u64)> {
    let (mut keys, mut bytes, mut start) = (0, 0, Vec::new());
    loop {
        let (kinds, next) = client::usage_page(paths, &start, 100_000).await?;
        for (_, k, b) in kinds {
            keys += k;
            bytes += b;
        }
        match next {
            Some(n) => start = n,
            None => return Ok((keys, bytes)),
        }
    }
}

/// Dismisses every message of `who`'s inbox, `width` at a time.
pub(super) async fn dismiss_all(who: &agent::Client, width: usize) -> anyhow::Result<usize> {
    let numbers = Rc::new(inbox_numbers(who).await?);
    let n = numbers.len();
    let who = who.clone();
    concurrently(
        n,
        width,
        move |i| {
            let (who, numbers) = (who.clone(), numbers.clone());
            async move { dismiss(&who, numbers[i]).await }
        },
        "dismiss",
    )
    .await?;
    Ok(n)
}

/// `capstan bench --soak N`: N sends from 16 connections into one guest's
/// inbox, in 20 rounds; after each round (unless `keep`) every message is
/// dismissed (the guest's and the host's copies) and a gc pass runs
/// (dropping exactly-once answers). Prints the store's size and the
/// daemon's resident memory after each round: with dismissals and gc both
/// stay flat; with `keep` (no dismissals, no gc) the memory shows what the
/// daemon holds per stored message.
pub async fn soak(
    dir: Option<PathBuf>,
    total: usize,
    keep: bool,
    store_cache_bytes: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let exe = crate::capstan_exe()?;
    let tmp;
    let base = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("capstan-soak").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let paths = Paths::resolve(Some(base.join("soak")))?;
    let cache = store_cache_bytes.map(|n| n.to_string());
    let mut extra = vec![];
    if let Some(c) = &cache {
        extra.extend(["--store-cache-bytes", c.as_str()]);
    }
    let (d, _) = Daemon::spawn_with(&exe, &paths, &extra).await?;
    let h = host(&paths).await?;
    mkguest(&h, "g0").await?;
    let g = as_agent(&h, "g0");
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(host(&paths).await?);
    }
    let rounds = 20usize;
    let per = total.div_ceil(rounds).max(1);
    let rss_start = d.rss_kib()?;
    let (keys0, bytes0) = store_size(&paths).await?;
    let mut lines = Vec::new();
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut max_send = Duration::ZERO;
    while sent < total {
        let n = per.min(total - sent);
        let c = conns.clone();
        let base_i = sent;
        let lat = concurrently(
            n,
            16,
            move |i| {
                let a = c[i % c.len()].clone();
                async move {
                    send(&a, "g0", &format!("soak message {}", base_i + i))
                        .await
                        .map(drop)
                }
            },
            "send",
        )
        .await?;
        max_send = max_send.max(lat.iter().copied().max().unwrap_or_default());
        sent += n;
        if !keep {
            dismiss_all(&g, 16).await?;
            dismiss_all(&h, 16).await?;
            client::gc(&paths, 0).await?;
        }
        let (keys, bytes) = store_size(&paths).await?;
        let rss = d.rss_kib()?;
        let file = std::fs::metadata(paths.home.join("store.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        let line = json!({
            "sent": sent,
            "secs": t0.elapsed().as_secs_f64(),
            "store_keys": keys,
            "store_bytes": bytes,
            "store_file_bytes": file,
            "rss_kib": rss,
        });
        if !json {
            eprintln!(
                "soak: {sent:>9} sent  {:>7.1} s  store {keys:>8} keys {:>9.1} MiB live, file {:>7.1} MiB  rss {:>7.1} MiB",
                t0.elapsed().as_secs_f64(),
                bytes as f64 / 1048576.0,
                file as f64 / 1048576.0,
                rss as f64 / 1024.0
            );
        }
        lines.push(line);
    }
    let last = lines.last().cloned().unwrap_or_default();
    let keys1 = last["store_keys"].as_u64().unwrap_or(0);
    let rss1 = last["rss_kib"].as_u64().unwrap_or(0);
    let summary = json!({
        "sends": total,
        "keep": keep,
        "secs": t0.elapsed().as_secs_f64(),
        "per_s": total as f64 / t0.elapsed().as_secs_f64(),
        "max_send_ms": max_send.as_secs_f64() * 1000.0,
        "store_keys_before": keys0,
        "store_bytes_before": bytes0,
        "store_keys_after": keys1,
        "rss_kib_start": rss_start,
        "rss_kib_end": rss1,
        "rss_bytes_per_send": (rss1 as f64 - rss_start as f64) * 1024.0 / total as f64,
        "rounds": lines,
    });
    d.stop().await?;
    if json {
        print_json(&summary);
    } else {
        println!(
            "soak of {total} sends ({}): store {keys0} → {keys1} keys; rss {:.1} → {:.1} MiB ({:.0} bytes per send); {:.0} sends/s; slowest send {:.1} ms",
            if keep {
                "messages kept"
            } else {
                "dismissed, gc after each round"
            },
            rss_start as f64 / 1024.0,
            rss1 as f64 / 1024.0,
            summary["rss_bytes_per_send"].as_f64().unwrap_or(0.0),
            summary["per_s"].as_f64().unwrap_or(0.0),
            max_send.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// `capstan bench --gc-formulas N`: N values stored in one directory, the
/// directory removed (all N unreachable), then one gc pass timed while one
/// sender sends back to back; the slowest send during the pass is the
/// longest stall gc caused (targets: pass < 2 s for 100,000, stall ≤ 50 ms).
pub async fn gc_row(dir: Option<PathBuf>, formulas: usize, json: bool) -> anyhow::Result<()> {
    let exe = crate::capstan_exe()?;
    let tmp;
    let base = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new()
                .prefix("capstan-gcbench")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let paths = Paths::resolve(Some(base.join("gc")))?;
    let (d, _) = Daemon::spawn(&exe, &paths).await?;
    let h = host(&paths).await?;
    mkguest(&h, "g0").await?;
    let mut r = h.mkdir_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path("d");
    r.send().promise.await?;
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(host(&paths).await?);
    }
    step(false, &format!("storing {formulas} values"));
    let c = conns.clone();
    concurrently(
        formulas,
        16,
        move |i| {
            let a = c[i % c.len()].clone();
            async move { store_text(&a, &format!("d.v-{i}"), "x").await }
        },
        "store",
    )
    .await?;
    remove(&h, "d").await?;
    // Sends before the pass: the baseline latency.
    let mut before = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        send(&h, "g0", &format!("before {i}")).await?;
        before.push(t.elapsed());
    }
    step(false, "gc pass with a concurrent sender");
    let done = Rc::new(std::cell::Cell::new(false));
    let (d2, h2) = (done.clone(), h.clone());
    let t = Instant::now();
    let sender = tokio::task::spawn_local(async move {
        let mut lat = Vec::new();
        let mut i = 0u64;
        while !d2.get() {
            let s = Instant::now();
            send(&h2, "g0", &format!("during {i}")).await?;
            lat.push((s - t, s.elapsed()));
            i += 1;
        }
        Ok::<_, CapError>(lat)
    });
    let report = client::gc(&paths, 86_400_000).await?;
    let took = t.elapsed();
    done.set(true);
    let timed = sender.await??;
    // When in the pass the slowest sends started (to match with the
    // daemon's `gc:` log lines, e.g. CAPSTAN_BENCH_LOG=info and --dir).
    let mut slowest = timed.clone();
    slowest.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    let slowest: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|(at, d)| format!("{} at +{} ms", ms(d.as_secs_f64() * 1e6), at.as_millis()))
        .collect();
    step(false, &format!("slowest sends: {}", slowest.join(", ")));
    let during: Vec<Duration> = timed.into_iter().map(|(_, d)| d).collect();
    let freed = report
        .iter()
        .find(|(k, _)| *k == "formulas")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(0);
    let max_during = during.iter().copied().max().unwrap_or_default();
    let sb = stats(before);
    let sd = stats(during.clone());
    d.stop().await?;
    let rows = vec![
        Row {
            what: format!("gc pass over {formulas} unreachable formulas (freed {freed})"),
            value: format!("{:.0} ms", took.as_secs_f64() * 1000.0),
            target: "< 2 s",
            endo: "",
            json: json!({"ms": took.as_secs_f64() * 1000.0, "freed": freed, "formulas": formulas}),
        },
        Row {
            what: format!(
                "slowest send during it ({} sends; p50 {} / p99 {}; before: p50 {})",
                during.len(),
                ms(sd.p50),
                ms(sd.p99),
                ms(sb.p50)
            ),
            value: format!("{:.1} ms", max_during.as_secs_f64() * 1000.0),
            target: "≤ 50 ms",
            endo: "",
            json: json!({"max_ms": max_during.as_secs_f64() * 1000.0, "sends": during.len(), "p50_us": sd.p50, "p99_us": sd.p99, "before_p50_us": sb.p50}),
        },
    ];
    print_rows(&rows, json, "redb, one node");
    Ok(())
}
