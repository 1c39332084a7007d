//! `capstan llm …` (issue 6): LLM providers held by a host.
//!
//! Client side: [`run`] reads the arguments (and the key file, once), calls
//! `Agent.llm(reqId, command, args, secret)` and renders the JSON answer.
//! Node side: [`command`] decodes the arguments and calls the
//! [`AgentHandle`]'s `llm_*` methods. The key travels only in `secret`, on
//! the local control socket, and is never echoed, logged or shown.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use capstan_actors::AgentHandle;
use capstan_actors::llm::{ChatRequest, ProviderSpec, Secret, safety::usd};
use capstan_proto::RequestId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::LlmCommand;
use crate::client::Client;
use crate::output::{print_json, str_field as s};

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// USD (a decimal like `3` or `0.25`) as micro-USD.
fn parse_usd(s: &str, what: &str) -> anyhow::Result<u64> {
    let bad = || anyhow!("invalid {what} {s:?}: a price in USD like 3 or 0.25");
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if frac.len() > 6
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    let mut data = Vec::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    if data.len() as u64 > MAX_KEY_FILE {
        bail!(
            "the key file {} is larger than {MAX_KEY_FILE} bytes; it should hold one API key",
            path.display()
        );
    }
    // Checked here too, so a bad file is refused before the node is asked.
    Secret::new(&data).map_err(|e| anyhow!("{e} ({})", path.display()))?;
    Ok(data)
}

/// Runs `capstan llm …` against the node.
pub async fn run(client: &Client, command: LlmCommand, json_out: bool) -> anyhow::Result<()> {
    let mut secret = Vec::new();
    let (cmd, args) = match &command {
        LlmCommand::Add {
            name,
            provider,
            key_file,
            url,
            model,
            max_tokens,
            timeout,
            price_input,
            price_output,
            ..
        } => {
            // Checked before the key file is read: a typo costs nothing.
            provider.parse::<capstan_actors::llm::ProviderKind>()?;
            let price_input = price_input
                .as_deref()
                .map(|p| parse_usd(p, "--price-input"))
                .transpose()?;
            let price_output = price_output
                .as_deref()
                .map(|p| parse_usd(p, "--price-output"))
                .transpose()?;
            if let Some(f) = key_file {
                secret = read_key_file(f)?;
            }
            (
                "add",
                json!({"name": name, "provider": provider, "url": url, "model": model,
                       "max_tokens": max_tokens, "timeout_secs": timeout,
                       "price_input": price_input, "price_output": price_output}),
            )
        }
        LlmCommand::List { .. } => ("list", json!({})),
        LlmCommand::Remove { name, .. } => ("remove", json!({"name": name})),
        LlmCommand::Ask {
            name,
            prompt,
            system,
            max_tokens,
            ..
        } => (
            "ask",
            json!({"name": name, "prompt": prompt.join(" "), "system": system, "max_tokens": max_tokens}),
        ),
        LlmCommand::Audit { limit, .. } => ("audit", json!({"limit": limit})),
        LlmCommand::Budget {
            agent,
            tokens,
            cost,
            reset,
            injection,
            ..
        } => {
            let cost = cost
                .as_deref()
                .map(|c| parse_usd(c, "--cost"))
                .transpose()?;
            (
                "budget",
                json!({"agent": agent, "tokens": tokens, "cost": cost, "reset": reset, "injection": injection}),
            )
        }
    };
    let req = RequestId::random();
    let args = args.to_string();
    let text = client
        .call(|a| {
            let (args, secret) = (args.clone(), secret.clone());
            async move {
                let mut r = a.llm_request();
                let mut p = r.get();
                p.set_req_id(&req.0);
                p.set_command(cmd);
                p.set_args(args.as_str());
                p.set_secret(&secret);
                let answer = r.send().promise.await?;
                Ok(answer.get()?.get_json()?.to_string()?)
            }
        })
        .await?;
    let v: Value = serde_json::from_str(&text).context("the node sent bad JSON")?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    print!("{}", human(cmd, &v));
    if cmd == "ask"
        && let Some(kinds) = v["redacted"].as_array().filter(|k| !k.is_empty())
    {
        let kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
        eprintln!(
            "capstan: note: credentials were redacted from the reply ({})",
            kinds.join(", ")
        );
    }
    Ok(())
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn limit_text(used: u64, limit: u64) -> String {
    if limit == 0 {
        format!("{used} (no limit)")
    } else {
        format!("{used} of {limit}")
    }
}

/// The human rendering of an answer.
pub fn human(cmd: &str, v: &Value) -> String {
    let mut out = String::new();
    match cmd {
        "add" => {
            out.push_str(&format!(
                "added LLM provider {}: {} {} at {}{}\n",
                s(v, "name"),
                s(v, "provider"),
                s(v, "model"),
                s(v, "url"),
                if v["key_set"].as_bool() == Some(true) {
                    " (key set)"
                } else {
                    ""
                }
            ));
        }
        "list" => {
            let rows = v.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                out.push_str(
                    "no LLM providers; add one with `capstan llm add NAME --provider …`\n",
                );
            }
            let w = rows.iter().map(|r| s(r, "name").len()).max().unwrap_or(0);
            for r in &rows {
                out.push_str(&format!(
                    "{:w$}  {:9}  {}  {}  {}\n",
                    s(r, "name"),
                    s(r, "provider"),
                    s(r, "model"),
                    s(r, "url"),
                    if r["key_set"].as_bool() == Some(true) {
                        "key set"
                    } else {
                        "no key"
                    },
                ));
            }
        }
        "remove" => {}
        "ask" => {
            let text = s(v, "text");
            out.push_str(text);
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
            for c in v["tool_calls"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "[tool call {} {}]\n",
                    s(c, "name"),
                    c["arguments"]
                ));
            }
        }
        "audit" => {
            for e in v.as_array().into_iter().flatten() {
                let at = e["at_ms"].as_u64().unwrap_or(0);
                out.push_str(&format!(
                    "#{} {} {} ({} {}) tokens {}+{} (estimated {}){} {} ms: {}\n",
                    e["number"],
                    utc(at),
                    s(e, "provider"),
                    s(e, "kind"),
                    s(e, "model"),
                    e["input_tokens"],
                    e["output_tokens"],
                    e["estimated_tokens"],
                    match e["cost_micros"].as_u64() {
                        Some(c) if c > 0 => format!(" ${}", usd(c)),
                        _ => String::new(),
                    },
                    e["duration_ms"],
                    s(e, "outcome"),
                ));
            }
        }
        "budget" => {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "{}: tokens {}; cost ${} of {}; {} calls; injection policy {}\n",
                s(v, "agent"),
                limit_text(n("tokens_used"), n("token_limit")),
                usd(n("cost_used")),
                if n("cost_limit") == 0 {
                    "no limit".to_string()
                } else {
                    format!("${}", usd(n("cost_limit")))
                },
                n("calls"),
                v["injection"].as_str().unwrap_or("warn"),
            ));
            if n("tokens_reserved") > 0 || n("cost_reserved") > 0 {
                out.push_str(&format!(
                    "  held by calls in flight: {} tokens, ${}\n",
                    n("tokens_reserved"),
                    usd(n("cost_reserved"))
                ));
            }
        }
        _ => out.push_str(&format!("{v}\n")),
    }
    out
}

#[derive(Deserialize)]
struct AddArgs {
    name: String,
    provider: String,
    url: Option<String>,
    model: Option<String>,
    max_tokens: Option<u32>,
    timeout_secs: Option<u64>,
    price_input: Option<u64>,
    price_output: Option<u64>,
}

#[derive(Deserialize)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
struct AskArgs {
    name: String,
    prompt: String,
    system: Option<String>,
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct AuditArgs {
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct BudgetArgs {
    agent: Option<String>,
    tokens: Option<u64>,
    cost: Option<u64>,
    #[serde(default)]
    reset: bool,
    injection: Option<String>,
}

fn parse<T: for<'de> Deserialize<'de>>(command: &str, args: &str) -> Result<T, String> {
    serde_json::from_str(args).map_err(|e| format!("bad arguments for llm {command}: {e}"))
}

/// Serves `Agent.llm` on the node: one JSON answer, or a one-line error.
pub async fn command(
    handle: &AgentHandle,
    req: RequestId,
    cmd: &str,
    args: &str,
    secret: &[u8],
) -> Result<Value, String> {
    let err = |e: capstan_actors::Error| e.to_string();
    if cmd != "add" && !secret.is_empty() {
        return Err(format!("llm {cmd} takes no key"));
    }
    match cmd {
        "add" => {
            let a: AddArgs = parse(cmd, args)?;
            let key = if secret.is_empty() {
                None
            } else {
                Some(Secret::new(secret).map_err(err)?)
            };
            let spec = ProviderSpec {
                kind: a.provider,
                url: a.url,
                model: a.model,
                max_tokens: a.max_tokens,
                timeout_secs: a.timeout_secs,
                price_input: a.price_input,
                price_output: a.price_output,
            };
            handle
                .llm_add(req, &a.name, &spec, key)
                .await
                .map_err(err)?;
            let info = handle
                .llm_list()
                .await
                .map_err(err)?
                .into_iter()
                .find(|p| p.name == a.name);
            Ok(match info {
                Some(i) => serde_json::to_value(i).map_err(|e| e.to_string())?,
                // Added under a path in a sub-directory: not in the top-level list.
                None => json!({"name": a.name}),
            })
        }
        "list" => {
            let l = handle.llm_list().await.map_err(err)?;
            serde_json::to_value(l).map_err(|e| e.to_string())
        }
        "remove" => {
            let a: NameArgs = parse(cmd, args)?;
            handle.llm_remove(req, &a.name).await.map_err(err)?;
            Ok(json!({}))
        }
        "ask" => {
            let a: AskArgs = parse(cmd, args)?;
            let mut r = ChatRequest::prompt(a.prompt);
            r.system = a.system;
            r.max_tokens = a.max_tokens;
            let reply = handle.llm_chat(&a.name, r).await.map_err(err)?;
            let resp = &reply.response;
            Ok(json!({
                "text": resp.text,
                "tool_calls": resp.tool_calls,
                "stop": resp.stop.as_str(),
                "usage": resp.usage,
                "model": resp.model,
                "provider": reply.provider,
                "configured_model": reply.model,
                "estimated_tokens": reply.estimated_tokens,
                "cost_micros": reply.cost_micros,
                "redacted": reply.redacted,
                "budget": reply.budget,
            }))
        }
        "audit" => {
            let a: AuditArgs = parse(cmd, args)?;
            let l = handle
                .llm_audit(a.limit.unwrap_or(100))
                .await
                .map_err(err)?;
            serde_json::to_value(l).map_err(|e| e.to_string())
        }
        "budget" => {
            let a: BudgetArgs = parse(cmd, args)?;
            let agent = a.agent.unwrap_or_else(|| "SELF".into());
            let injection = a
                .injection
                .as_deref()
                .map(str::parse::<capstan_actors::llm::InjectionPolicy>)
                .transpose()?;
            let b = if a.tokens.is_none() && a.cost.is_none() && !a.reset && injection.is_none() {
                handle.llm_budget(&agent).await.map_err(err)?
            } else {
                handle
                    .llm_set_budget(req, &agent, a.tokens, a.cost, a.reset, injection)
                    .await
                    .map_err(err)?
            };
            let mut v = serde_json::to_value(b).map_err(|e| e.to_string())?;
            v["agent"] = json!(agent);
            Ok(v)
        }
        other => Err(format!(
            "unknown llm command {other:?}: use add, list, remove, ask, audit or budget"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_to_micros() {
        assert_eq!(parse_usd("3", "p").unwrap(), 3_000_000);
        assert_eq!(parse_usd("0.25", "p").unwrap(), 250_000);
        assert_eq!(parse_usd(".5", "p").unwrap(), 500_000);
        assert_eq!(parse_usd("15.000001", "p").unwrap(), 15_000_001);
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "1.0000001",
            "abc",
            "99999999999999999999",
        ] {
            assert!(parse_usd(bad, "p").is_err(), "{bad}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn renders_answers() {
        let list = json!([{"name": "claude", "provider": "anthropic", "model": "m", "url": "http://x", "key_set": true}]);
        let t = human("list", &list);
        assert!(t.contains("claude") && t.contains("key set"), "{t}");
        assert!(human("list", &json!([])).contains("no LLM providers"));
        let b = json!({"agent": "SELF", "token_limit": 10, "tokens_used": 4, "cost_limit": 0, "cost_used": 0, "calls": 1});
        assert_eq!(
            human("budget", &b),
            "SELF: tokens 4 of 10; cost $0.000000 of no limit; 1 calls; injection policy warn\n"
        );
        let a = json!({"text": "hi", "tool_calls": [{"name": "t", "arguments": {"a": 1}}]});
        assert_eq!(human("ask", &a), "hi\n[tool call t {\"a\":1}]\n");
    }
}
