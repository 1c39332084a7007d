//! The search rows (`capstan bench --only search`, and part of the full
//! table): a search index over a corpus of values.

use std::time::{Duration, Instant};

use anyhow::bail;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::agent;
use serde_json::json;

use super::calls::{concurrently, ms, stats, store_text};
use super::{Row, Sizes, step};

/// Words for the search corpus: each value is a few of them and a number.
pub(super) const SEARCH_WORDS: [&str; 24] = [
    "invoice",
    "weather",
    "flight",
    "recipe",
    "doctor",
    "engine",
    "guitar",
    "apartment",
    "budget",
    "meeting",
    "garden",
    "server",
    "report",
    "ticket",
    "coffee",
    "library",
    "market",
    "river",
    "planet",
    "window",
    "letter",
    "camera",
    "bridge",
    "forest",
];

/// `capstan search` latency over `sizes.names` values (a search capability
/// over a directory of them, full text): p50 and p99 of searches after the
/// first (which builds the index; its time is reported apart).
pub(super) async fn search_rows(
    h: &agent::Client,
    conns: &[agent::Client],
    sizes: &Sizes,
    quiet: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    step(quiet, &format!("storing {} values to search", sizes.names));
    let mut r = h.mkdir_request();
    r.get().set_req_id(&RequestId::random().0);
    r.get().set_path("corpus");
    r.send().promise.await?;
    let c2 = conns.to_vec();
    concurrently(
        sizes.names,
        sizes.senders,
        move |i| {
            let a = c2[i % c2.len()].clone();
            let w = |k: usize| SEARCH_WORDS[(i / k + k) % SEARCH_WORDS.len()];
            let text = format!(
                "note {i}: {} {} and {} for order ORD-{i:06} filed by the team",
                w(1),
                w(7),
                w(31)
            );
            async move { store_text(&a, &format!("corpus.n-{i}"), &text).await }
        },
        "store",
    )
    .await?;
    let search = |cmd: &'static str, args: serde_json::Value| {
        let h = h.clone();
        async move {
            let mut r = h.search_request();
            r.get().set_req_id(&RequestId::random().0);
            r.get().set_command(cmd);
            r.get().set_args(args.to_string().as_str());
            let a = r.send().promise.await?;
            let v: serde_json::Value = serde_json::from_str(a.get()?.get_json()?.to_str()?)?;
            anyhow::Ok(v)
        }
    };
    search("make", json!({"name": "corpus-search", "over": "corpus"})).await?;
    step(quiet, "search (first: builds the index)");
    let t = Instant::now();
    let first = search(
        "query",
        json!({"name": "corpus-search", "query": "invoice", "k": 10}),
    )
    .await?;
    let build = t.elapsed();
    let indexed = first["indexed"].as_u64().unwrap_or(0);
    // "full text", or "full text + local vectors" with `--embed-model`.
    let how = match first["vectors"].as_str() {
        Some(v) if first["mode"] == "fused" => format!(
            "full text + vectors ({})",
            if v.starts_with("local model") {
                "local model"
            } else {
                "provider"
            }
        ),
        Some(_) => bail!("the search has a vector source but answered full text: {first}"),
        None => "full text".to_string(),
    };
    if (indexed as usize) < sizes.names {
        bail!(
            "the search index holds {indexed} values, expected {}",
            sizes.names
        );
    }
    let mut lat = Vec::new();
    let (mut refresh, mut rank) = (Vec::new(), Vec::new());
    for i in 0..200usize {
        let q = if i % 2 == 0 {
            format!(
                "{} {}",
                SEARCH_WORDS[i % SEARCH_WORDS.len()],
                SEARCH_WORDS[(i * 7) % SEARCH_WORDS.len()]
            )
        } else {
            format!("ORD-{:06}", (i * 37) % sizes.names)
        };
        let t = Instant::now();
        let v = search(
            "query",
            json!({"name": "corpus-search", "query": q, "k": 10}),
        )
        .await?;
        lat.push(t.elapsed());
        if v["hits"].as_array().is_none_or(|a| a.is_empty()) {
            bail!("search {q:?} found nothing");
        }
        refresh.push(Duration::from_micros(v["refresh_us"].as_u64().unwrap_or(0)));
        rank.push(Duration::from_micros(v["rank_us"].as_u64().unwrap_or(0)));
    }
    let s = stats(lat);
    let (refresh, rank) = (stats(refresh), stats(rank));
    rows.push(Row {
        what: format!("search over {indexed} values, {how}, k = 10 (p50 / p99)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "p50 < 10 ms",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "values": indexed,
            "refresh_p50_us": refresh.p50, "rank_p50_us": rank.p50}),
    });
    rows.push(Row {
        what: "  of which: check the directory for changes / rank (p50)".into(),
        value: format!("{} / {}", ms(refresh.p50), ms(rank.p50)),
        target: "",
        endo: "",
        json: json!({"refresh_p50_us": refresh.p50, "rank_p50_us": rank.p50}),
    });
    // Right after a write: the store changed, so the search reads the
    // directory's change log and indexes the new value (the write is not
    // timed).
    let mut lat = Vec::new();
    let mut refresh = Vec::new();
    for i in 0..50usize {
        store_text(
            h,
            &format!("corpus.late-{i}"),
            &format!("late note {i} about a garden"),
        )
        .await?;
        let q = format!("late note {i}");
        let t = Instant::now();
        let v = search(
            "query",
            json!({"name": "corpus-search", "query": q, "k": 10}),
        )
        .await?;
        lat.push(t.elapsed());
        refresh.push(Duration::from_micros(v["refresh_us"].as_u64().unwrap_or(0)));
        if v["hits"][0]["name"] != format!("late-{i}") {
            bail!("the search after storing corpus.late-{i} did not find it first: {v}");
        }
    }
    let s = stats(lat);
    let refresh = stats(refresh);
    rows.push(Row {
        what: format!("search right after a store, over {indexed} values (p50 / p99)"),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "p50 < 10 ms",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99, "refresh_p50_us": refresh.p50}),
    });
    rows.push(Row {
        what: "  of which: catch up with the write (p50)".into(),
        value: ms(refresh.p50),
        target: "",
        endo: "",
        json: json!({"refresh_p50_us": refresh.p50}),
    });
    rows.push(Row {
        what: format!("first search: builds the index of {indexed} values ({how})"),
        value: ms(build.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": build.as_secs_f64() * 1e6, "values": indexed}),
    });
    Ok(())
}
