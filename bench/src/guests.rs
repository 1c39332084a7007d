//! The guest rows: install a component, run a tool, messages to a guest
//! agent (latency, call paths, throughput, after a restart), and the memory
//! of many guest agents.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::bail;
use capstan_proto::RequestId;
use serde_json::json;

use super::calls::{
    concurrently, follow_inbox, guest_stat, host, install, last_inbox_number, mkguest_component,
    ms, probe_call, run_tool, send, stats, store_text, wait_inbox,
};
use super::process::Daemon;
use super::{Row, Sizes, step};
use capstan::home::Paths;

/// Guests as WebAssembly components, through the daemon: install (validate
/// and compile), a tool call over the socket, a message to a guest agent
/// and its answer by mail, what the node measured inside (instantiate and
/// handler), messages per second, the first message after a restart
/// (compiled code from the disk cache), and memory per guest agent.
pub(super) async fn guest_rows(
    exe: &Path,
    base: &Path,
    wasm: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (echo, counter) = (wasm.join("echo-tool.wasm"), wasm.join("counter.wasm"));
    if !echo.exists() || !counter.exists() {
        eprintln!(
            "bench: guest section skipped: no {} (build the guests with scripts/build-guests, or pass --guests DIR)",
            counter.display()
        );
        return Ok(());
    }
    let quiet = false;
    step(quiet, "guests: install");
    let paths = Paths::resolve(Some(base.join("guests")))?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let seen = follow_inbox(&h, 0);
    let t = Instant::now();
    install(&h, &echo, "echo-tool", &[]).await?;
    let cold = t.elapsed();
    install(&h, &counter, "counter", &[]).await?;
    rows.push(Row {
        what: "guest: install a component (validate, cold compile, store)".into(),
        value: ms(cold.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": cold.as_secs_f64() * 1e6}),
    });

    step(quiet, "guests: tool calls");
    let mut lat = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let out = run_tool(&h, "echo-tool", r#"{"text":"bench"}"#).await?;
        lat.push(t.elapsed());
        if !out.contains("\"bench\"") {
            bail!("echo-tool answered {out:?}");
        }
    }
    let s = stats(lat);
    rows.push(Row {
        what: "guest: `run` a tool over the socket (fresh instance + execute)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    step(quiet, "guests: messages to a guest agent");
    mkguest_component(&h, "bot", "counter").await?;
    let mut next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let (mut rtt, mut inst, mut call) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        send(&h, "bot", "get").await?;
        // our copy of what we sent, then the guest's answer
        next += 2;
        wait_inbox(&seen, &h, next - 1).await?;
        rtt.push(t.elapsed());
        let g = guest_stat(&h, "bot").await?;
        inst.push(Duration::from_nanos(g.instantiate_ns));
        call.push(Duration::from_nanos(g.call_ns));
    }
    let (s, si, sc) = (stats(rtt), stats(inst), stats(call));
    rows.push(Row {
        what: "guest: message → guest handler → answer in the host's inbox (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    rows.push(Row {
        what: "guest: instantiate for a message (pooled, pre-instantiated; p50)".into(),
        value: ms(si.p50),
        target: "< 20 µs",
        endo: "",
        json: json!({"p50_us": si.p50, "p99_us": si.p99}),
    });
    rows.push(Row {
        what: "guest: handler run incl. its host calls (read, reply: durable; p50)".into(),
        value: ms(sc.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": sc.p50, "p99_us": sc.p99}),
    });

    let probe = wasm.join("probe.wasm");
    if probe.exists() {
        step(quiet, "guests: call paths (probe guest)");
        store_text(&h, "probe-doc", "a small stored value").await?;
        install(&h, &probe, "probe", &[("doc", "probe-doc")]).await?;
        mkguest_component(&h, "prober", "probe").await?;
        probe_call(&h, "prober", "noop").await?; // warm
        let (kind_n, read_n) = (10_000u32, 1_000u32);
        let (mut noop, mut kind, mut read) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..sizes.round_trips.min(100) {
            noop.push(probe_call(&h, "prober", "noop").await?);
            kind.push(probe_call(&h, "prober", &format!("kind {kind_n}")).await?);
            read.push(probe_call(&h, "prober", &format!("read {read_n}")).await?);
        }
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2] as f64 / 1000.0
        };
        let (noop, kind, read) = (median(noop), median(kind), median(read));
        rows.push(Row {
            what: "guest: host → guest call on the message's fresh instance (first call: lazy init, first page touches; p50)".into(),
            value: ms(noop),
            target: "< 2 µs",
            endo: "",
            json: json!({"p50_us": noop}),
        });
        let per_kind = (kind - noop).max(0.0) / kind_n as f64;
        rows.push(Row {
            what: format!("guest: guest → capability call, handle table (capability.kind(), {kind_n} in a handler)"),
            value: ms(per_kind),
            target: "< 10 µs",
            endo: "",
            json: json!({"us": per_kind}),
        });
        let per_read = (read - noop).max(0.0) / read_n as f64;
        rows.push(Row {
            what: format!("guest: guest → capability call reading a stored value (capability.read(), {read_n} in a handler)"),
            value: ms(per_read),
            target: "< 10 µs",
            endo: "",
            json: json!({"us": per_read}),
        });
        // the probe's mail added our copies to the inbox
        next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    }
    let poller = wasm.join("probe-channel.wasm");
    if poller.exists() {
        step(quiet, "guests: a warm instance (probe channel)");
        install(&h, &poller, "probe-channel", &[]).await?;
        mkguest_component(&h, "poller", "probe-channel").await?;
        // each poll (every 100 ms) is timed by the node; the first one
        // (right after on-start) is left out
        let (mut samples, mut seen) = (Vec::new(), 1u64);
        let deadline = Instant::now() + Duration::from_secs(20);
        while samples.len() < 30 && Instant::now() < deadline {
            let g = guest_stat(&h, "poller").await?;
            if g.handled > seen {
                seen = g.handled;
                samples.push(g.call_ns);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if samples.is_empty() {
            bail!("the probe channel was never polled");
        }
        samples.sort_unstable();
        let warm = samples[samples.len() / 2] as f64 / 1000.0;
        rows.push(Row {
            what: "guest: host → guest call on a live instance, one every 100 ms in the node (cold caches; `cargo bench --bench callpath`: back to back; p50)"
                .into(),
            value: ms(warm),
            target: "< 2 µs",
            endo: "",
            json: json!({"p50_us": warm, "samples": samples.len()}),
        });
    }

    step(quiet, "guests: messages per second");
    let n = sizes.round_trips * 4;
    let t = Instant::now();
    for _ in 0..n {
        send(&h, "bot", "get").await?;
    }
    next += 2 * n as u64;
    wait_inbox(&seen, &h, next - 1).await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: format!("guest: messages handled per second, one guest agent ({n})"),
        value: format!("{rate:.0} /s"),
        target: "",
        endo: "",
        json: json!({"per_s": rate, "messages": n}),
    });

    step(quiet, "guests: first message after a restart");
    drop(h);
    d.stop().await?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let seen = follow_inbox(&h, next);
    // the follower is registered before the clock starts
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    send(&h, "bot", "get").await?;
    wait_inbox(&seen, &h, next + 1).await?;
    let warm = t.elapsed();
    rows.push(Row {
        what: "guest: first message after a restart (compiled code from the disk cache)".into(),
        value: ms(warm.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": warm.as_secs_f64() * 1e6}),
    });

    let n = sizes.guests;
    step(quiet, &format!("guests: {n} guest agents"));
    let conns = Rc::new({
        let mut v = Vec::new();
        for _ in 0..sizes.senders.min(16) {
            v.push(host(&paths).await?);
        }
        v
    });
    let c2 = conns.clone();
    concurrently(
        n,
        conns.len(),
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move {
                let mut r = a.mkguest_component_request();
                r.get().set_req_id(&RequestId::random().0);
                r.get().set_path(format!("bot-{i}").as_str());
                r.get().set_component("counter");
                r.send().promise.await?;
                Ok(())
            }
        },
        "mkguest --component",
    )
    .await?;
    let before = d.rss_kib()?;
    let next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let c2 = conns.clone();
    concurrently(
        n,
        conns.len(),
        move |i| {
            let a = c2[i % c2.len()].clone();
            async move { send(&a, &format!("bot-{i}"), "get").await.map(drop) }
        },
        "wake guest agents",
    )
    .await?;
    wait_inbox(&seen, &h, next + 2 * n as u64 - 1).await?;
    let after = d.rss_kib()?;
    let per = after.saturating_sub(before) as f64 * 1024.0 / n as f64;
    rows.push(Row {
        what: format!("guest: memory per guest agent that handled a message ({n}, RSS delta)"),
        value: format!(
            "{:.1} KiB ({:.0} MB for {n})",
            per / 1024.0,
            per * n as f64 / 1e6
        ),
        target: "< 20 KB (10k in 200 MB)",
        endo: "",
        json: json!({"bytes": per, "guests": n}),
    });
    drop(conns);
    drop(h);
    d.stop().await?;
    Ok(())
}
