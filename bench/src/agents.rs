//! The evaluator and LLM agent rows (the agent's model is the end-to-end
//! tests' model server on loopback, `capstan_tests::llm_server`, scripted
//! to answer every turn at once).

use std::path::Path;
use std::time::{Duration, Instant};

use capstan_proto::RequestId;
use serde_json::json;

use super::calls::{
    eval, follow_inbox, host, install, last_inbox_number, mkguest_component, ms, send, stats,
    store_text, wait_inbox,
};
use super::process::Daemon;
use super::{Row, Sizes, step};
use capstan::home::Paths;

/// The evaluator (a JavaScript engine as a guest) and the LLM agent:
/// evaluator start and a small script, a script using a bound capability,
/// and one agent turn against a model that answers at once (the agent's
/// own overhead per turn: mail in, checkpointed conversation, the model
/// call through the node, the reply).
pub(super) async fn agent_rows(
    exe: &Path,
    base: &Path,
    wasm: &Path,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (evaluator, llm_agent) = (wasm.join("evaluator.wasm"), wasm.join("llm-agent.wasm"));
    if !evaluator.exists() || !llm_agent.exists() {
        eprintln!(
            "bench: evaluator and LLM agent section skipped: no {} (scripts/build-guests)",
            evaluator.display()
        );
        return Ok(());
    }
    let quiet = false;
    step(quiet, "evaluator: install");
    let paths = Paths::resolve(Some(base.join("agents")))?;
    let (d, _) = Daemon::spawn(exe, &paths).await?;
    let h = host(&paths).await?;
    let seen = follow_inbox(&h, 0);
    let t = Instant::now();
    install(&h, &evaluator, "evaluator", &[]).await?;
    let cold = t.elapsed();
    rows.push(Row {
        what: format!(
            "evaluator: install (Boa, {} KB component; cold compile)",
            std::fs::metadata(&evaluator)?.len() / 1000
        ),
        value: ms(cold.as_secs_f64() * 1e6),
        target: "",
        endo: "",
        json: json!({"us": cold.as_secs_f64() * 1e6}),
    });

    step(quiet, "evaluator: small scripts");
    store_text(&h, "doc", "the quick brown fox jumps over the lazy dog").await?;
    let script = "[1, 2, 3, 4].map(x => x * x).reduce((a, b) => a + b, 0)";
    let (mut e2e, mut inst, mut run) = (Vec::new(), Vec::new(), Vec::new());
    let mut fuel = 0;
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        let v = eval(&h, script, &[]).await?;
        e2e.push(t.elapsed());
        inst.push(Duration::from_nanos(
            v["instantiate_ns"].as_u64().unwrap_or(0),
        ));
        run.push(Duration::from_nanos(v["run_ns"].as_u64().unwrap_or(0)));
        fuel = v["fuel"].as_u64().unwrap_or(0);
    }
    let (s, si, sr) = (stats(e2e), stats(inst), stats(run));
    rows.push(Row {
        what: "evaluator: `eval` of a small script over the socket (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    rows.push(Row {
        what: "evaluator: start (fresh instance of the engine; p50)".into(),
        value: ms(si.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": si.p50, "p99_us": si.p99}),
    });
    rows.push(Row {
        what: format!("evaluator: engine setup + the script's run (p50; {fuel} fuel)"),
        value: ms(sr.p50),
        target: "",
        endo: "",
        json: json!({"p50_us": sr.p50, "p99_us": sr.p99, "fuel": fuel}),
    });
    let mut lat = Vec::new();
    for _ in 0..sizes.round_trips {
        let t = Instant::now();
        eval(&h, "doc.text().split(' ').length", &[("doc", "doc")]).await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "evaluator: script calling a bound capability (value.text()) (p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });

    step(quiet, "llm agent: turns against an instant model");
    // The tests' scripted model server, speaking Ollama's chat protocol:
    // every answer queued before the turns, so each is answered at once (a
    // turn makes one model call; the spare answers cover retries).
    let model = capstan_tests::llm_server::LlmServer::start();
    for _ in 0..sizes.round_trips * 2 + 16 {
        model.push(capstan_tests::llm_server::Reply::text("ok"));
    }
    {
        let mut r = h.llm_request();
        r.get().set_req_id(&RequestId::random().0);
        r.get().set_command("add");
        r.get().set_args(
            json!({"name": "local", "provider": "ollama", "url": model.url()})
                .to_string()
                .as_str(),
        );
        r.send().promise.await?;
    }
    install(&h, &llm_agent, "llm-agent", &[("llm", "local")]).await?;
    mkguest_component(&h, "helper", "llm-agent").await?;
    let mut next = last_inbox_number(&h).await?.map_or(0, |n| n + 1);
    let mut lat = Vec::new();
    for i in 0..sizes.round_trips {
        let t = Instant::now();
        send(&h, "helper", &format!("question {i}")).await?;
        next += 2;
        wait_inbox(&seen, &h, next - 1).await?;
        lat.push(t.elapsed());
    }
    let s = stats(lat);
    rows.push(Row {
        what: "llm agent: one turn, model excluded (mail → checkpointed conversation → model call → reply; p50 / p99)".into(),
        value: format!("{} / {}", ms(s.p50), ms(s.p99)),
        target: "",
        endo: "",
        json: json!({"p50_us": s.p50, "p99_us": s.p99}),
    });
    drop(model);
    drop(h);
    d.stop().await?;
    Ok(())
}
