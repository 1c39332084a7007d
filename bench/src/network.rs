//! The network rows: two nodes on loopback (locators, calls and mail
//! between clusters), and federated mail to a live peer behind a dead
//! peer's backlog.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::agent;
use serde_json::json;

use super::calls::{concurrently, host, inbox_len, ms, send, stats, store_text};
use super::process::Daemon;
use super::{Row, Sizes, step};
use capstan::home::Paths;

/// `inviter` invites `invitee` (names it `as_invitee`); `invitee` accepts
/// (names the inviter `as_inviter`).
pub(super) async fn pair(
    inviter: &agent::Client,
    as_invitee: &str,
    invitee: &agent::Client,
    as_inviter: &str,
) -> anyhow::Result<()> {
    let mut r = inviter.invite_request();
    r.get().set_name(as_invitee);
    r.get().set_req_id(&RequestId::random().0);
    let answer = r.send().promise.await?;
    let invitation = answer.get()?.get_invitation()?.to_string()?;
    let mut r = invitee.accept_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_invitation(invitation.as_str());
    r.get().set_name(as_inviter);
    r.send().promise.await?;
    Ok(())
}

/// Federated mail to a live peer while another peer is dead with a backlog:
/// node A mails C once with an empty outbox, then again after 300 messages
/// to a stopped B queued ahead of it; each time, how long until C has it.
pub(super) async fn federation_rows(
    exe: &Path,
    base: &Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    step(false, "federation: a dead peer's backlog and a live peer");
    let mut nodes = Vec::new();
    for n in ["fed-a", "fed-b", "fed-c"] {
        let p = Paths::resolve(Some(base.join(n)))?;
        std::fs::create_dir_all(&p.home)?;
        std::fs::write(p.home.join("listen"), "127.0.0.1:0\n")?;
        let (d, _) = Daemon::spawn(exe, &p).await?;
        let h = host(&p).await?;
        nodes.push((d, p, h));
    }
    let (a, b, c) = (nodes[0].2.clone(), nodes[1].2.clone(), nodes[2].2.clone());
    let (a, c) = (&a, &c);
    pair(a, "bob", &b, "alice").await?;
    pair(a, "carol", c, "alice").await?;
    // Time from A's send to C's inbox having it.
    let to_c = |text: String| async move {
        let before = inbox_len(c).await?;
        let t = Instant::now();
        send(a, "carol", &text).await?;
        while inbox_len(c).await? <= before {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("carol's message did not arrive within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, anyhow::Error>(t.elapsed())
    };
    let quiet = to_c("no backlog".into()).await?;
    let backlog = 300;
    let b_daemon = nodes.remove(1).0;
    b_daemon.kill9()?;
    for i in 0..backlog {
        send(a, "bob", &format!("queued {i}")).await?;
    }
    let behind = to_c("behind a dead peer's backlog".into()).await?;
    rows.push(Row {
        what: format!(
            "federation: A → live peer C, empty outbox / behind {backlog} messages for a dead peer B"
        ),
        value: format!(
            "{} / {}",
            ms(quiet.as_secs_f64() * 1e6),
            ms(behind.as_secs_f64() * 1e6)
        ),
        target: "unaffected",
        endo: "",
        json: json!({
            "empty_outbox_us": quiet.as_secs_f64() * 1e6,
            "behind_backlog_us": behind.as_secs_f64() * 1e6,
            "backlog": backlog,
        }),
    });
    for (d, _, _) in nodes {
        d.stop().await?;
    }
    Ok(())
}

/// Calls across QUIC, side by side with the same calls over the local socket.
///
/// Node A is a daemon process listening on loopback; the bench process is
/// node B: its own identity (a separate cluster) and endpoint, dialling A
/// exactly as a daemon does, so the figures are the network path alone.
pub(super) async fn net_rows(
    exe: &Path,
    base: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use capstan::net::Net;
    use capstan::net::identity::Identity;
    step(false, "network: two nodes on loopback");
    let pa = Paths::resolve(Some(base.join("net-a")))?;
    std::fs::create_dir_all(&pa.home)?;
    std::fs::write(pa.home.join("listen"), "127.0.0.1:0\n")?;
    let (a, _) = Daemon::spawn(exe, &pa).await?;
    let h = host(&pa).await?;
    store_text(&h, "small", "0123456789abcdef").await?;
    let big = "x".repeat(1 << 20);
    store_text(&h, "big", &big).await?;
    let locate = |name: &'static str| {
        let h = h.clone();
        async move {
            let mut r = h.locate_request();
            r.get().set_path(name);
            let answer = r.send().promise.await?;
            let l: capstan_proto::Locator = answer.get()?.get_locator()?.to_str()?.parse()?;
            Ok::<_, anyhow::Error>(capstan_actors::RemoteRec {
                cluster: l.cluster,
                swiss: l.swiss,
                addrs: l.addrs,
            })
        }
    };
    step(false, "network: locating");
    let small = locate("small").await?;
    let bigref = locate("big").await?;

    // Node B: a runtime on its own store, and its own endpoint.
    let home_b = base.join("net-b");
    std::fs::create_dir_all(&home_b)?;
    let db = capstan_cluster::open(&home_b.join("store.redb").to_string_lossy()).await?;
    let rt = capstan_actors::Runtime::open(db, capstan_actors::RuntimeOptions::default()).await?;
    let id_b = || Identity::load_or_create(&home_b);
    let net = Net::bind(rt.clone(), id_b()?, None, None)?;

    step(false, "network: round trips");
    // Round trips, 16-byte payload.
    let n = sizes.round_trips * 10;
    let payload = [7u8; 16];
    net.ping(&small, &payload)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        net.ping(&small, &payload)
            .await
            .map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: Gateway.ping round trip, 16 B (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "< 120 µs",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        net.cat(&small).await.map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: cat of a 16 B remote value, live capability (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut r = h.cat_request();
        r.get().set_path("small");
        r.send().promise.await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "local socket: cat of the same value on A (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    // Throughput: 64 calls in flight on one connection.
    let g = net.gateway(&small).await.map_err(anyhow::Error::msg)?;
    let total = n * 10;
    let t = Instant::now();
    let g2 = g.clone();
    concurrently(
        total,
        64,
        move |_| {
            let g = g2.clone();
            async move {
                let mut r = g.ping_request();
                r.get().set_payload(&[7u8; 16]);
                r.send().promise.await.map(drop)
            }
        },
        "ping",
    )
    .await?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    rows.push(Row {
        what: "QUIC: calls per second, 64 in flight, one connection".into(),
        value: format!("{rate:.0} /s"),
        target: "> 50,000 /s",
        endo: "",
        json: json!({"per_s": rate}),
    });

    // Pipelining: restore(swiss).cat() in one round trip, versus two.
    let mut piped = Vec::new();
    let mut seq = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let mut r = g.restore_request();
        r.get().set_swiss(&small.swiss);
        let o = r.send().pipeline.get_object();
        o.cat_request().send().promise.await?;
        piped.push(t.elapsed());
        let t = Instant::now();
        let mut r = g.restore_request();
        r.get().set_swiss(&small.swiss);
        let o = r.send().promise.await?.get()?.get_object()?;
        o.cat_request().send().promise.await?;
        seq.push(t.elapsed());
    }
    let (p, q) = (stats(piped), stats(seq));
    rows.push(Row {
        what: "QUIC: restore(swiss).cat() pipelined vs two round trips (p50)".into(),
        value: format!("{} vs {}", ms(p.p50), ms(q.p50)),
        target: "one round trip",
        endo: "",
        json: json!({"pipelined_p50_us": p.p50, "sequential_p50_us": q.p50}),
    });

    // 1 MiB value.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (_, data) = net.cat(&bigref).await.map_err(anyhow::Error::msg)?;
        if data.len() != big.len() {
            bail!("1 MiB cat returned {} bytes", data.len());
        }
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: cat of a 1 MiB remote value (p50)".into(),
        value: format!("{} ({:.0} MiB/s)", ms(s.p50), 1e6 / s.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50}),
    });
    net.close().await;

    // Connect + TLS 1.3 + first call, with a fresh endpoint each time.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let fresh = Net::bind(rt.clone(), id_b()?, None, None)?;
        let t = Instant::now();
        fresh
            .ping(&small, &payload)
            .await
            .map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
        fresh.close().await;
    }
    let s = stats(lat);
    rows.push(Row {
        what: "QUIC: connect + TLS 1.3 (mutual, cluster check) + first call (p50)".into(),
        value: ms(s.p50),
        target: "~1.7 ms floor",
        endo: "",
        json: json!({"p50_us": s.p50}),
    });
    drop(h);
    rt.shutdown().await;
    a.stop().await?;
    Ok(())
}
