//! `capstan mksearch` and `capstan search` (issue 20).
//!
//! Client side: [`run`] calls `Agent.search(reqId, command, args)` and
//! renders the JSON answer. Node side: [`command`] decodes the arguments
//! and calls the [`AgentHandle`]'s `mksearch` / `search`.

use capstan_actors::AgentHandle;
use capstan_proto::RequestId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::Command;
use crate::client::Client;
use crate::output::str_field as s;

/// Runs `capstan mksearch …` or `capstan search …` against the node.
pub async fn run(client: &Client, command: Command, json_out: bool) -> anyhow::Result<()> {
    let (cmd, args) = match &command {
        Command::Mksearch {
            name,
            over,
            mail,
            embed,
            embed_model,
            ..
        } => (
            "make",
            json!({"name": name, "over": over, "mail": mail, "embed": embed, "embed_model": embed_model}),
        ),
        Command::Search { name, query, k, .. } => {
            // Checked here too: bad input is refused before the node is asked.
            capstan_actors::search::check_query(query, *k)?;
            ("query", json!({"name": name, "query": query, "k": k}))
        }
        _ => anyhow::bail!("not a search command"),
    };
    let req = RequestId::random();
    let args = args.to_string();
    let text = client
        .call(|a| {
            let args = args.clone();
            async move {
                let mut r = a.search_request();
                let mut p = r.get();
                p.set_req_id(&req.0);
                p.set_command(cmd);
                p.set_args(args.as_str());
                let answer = r.send().promise.await?;
                Ok(answer.get()?.get_json()?.to_string()?)
            }
        })
        .await?;
    crate::output::print_answer(&text, json_out, |v| human(cmd, v))?;
    Ok(())
}

/// The human rendering of an answer.
pub fn human(cmd: &str, v: &Value) -> String {
    match cmd {
        "make" => format!(
            "made search capability {} over {} ({})\n",
            s(v, "name"),
            s(v, "over"),
            s(v, "mode")
        ),
        "query" => {
            let mut out = String::new();
            let hits = v["hits"].as_array().cloned().unwrap_or_default();
            if hits.is_empty() {
                out.push_str(&format!(
                    "no hits among {} indexed values\n",
                    v["indexed"].as_u64().unwrap_or(0)
                ));
            }
            for h in hits {
                out.push_str(&format!(
                    "{:.4}\t{}\t{}\n",
                    h["score"].as_f64().unwrap_or(0.0),
                    s(&h, "path"),
                    s(&h, "snippet")
                ));
            }
            for n in v["notes"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!("note: {}\n", n.as_str().unwrap_or("")));
            }
            out
        }
        _ => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MakeArgs {
    name: String,
    over: String,
    #[serde(default)]
    mail: bool,
    embed: Option<String>,
    embed_model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryArgs {
    name: String,
    query: String,
    k: u32,
}

fn parse<T: for<'de> Deserialize<'de>>(cmd: &str, args: &str) -> Result<T, String> {
    serde_json::from_str(args).map_err(|e| format!("bad arguments for search {cmd}: {e}"))
}

/// Runs one search command on the node, as `handle`.
pub async fn command(
    handle: &AgentHandle,
    req: RequestId,
    cmd: &str,
    args: &str,
) -> Result<Value, String> {
    let err = |e: capstan_actors::Error| e.to_string();
    match cmd {
        "make" => {
            let a: MakeArgs = parse(cmd, args)?;
            let id = handle
                .mksearch(
                    req,
                    &a.name,
                    &a.over,
                    a.mail,
                    a.embed.as_deref(),
                    a.embed_model.as_deref(),
                )
                .await
                .map_err(err)?;
            Ok(json!({
                "name": a.name,
                "id": id.to_hex(),
                "over": a.over,
                "mail": a.mail,
                "embed": a.embed,
                "mode": if a.embed.is_some() { "full text + vectors (RRF)" } else { "full text" },
            }))
        }
        "query" => {
            let a: QueryArgs = parse(cmd, args)?;
            let r = handle.search(&a.name, &a.query, a.k).await.map_err(err)?;
            Ok(r.to_json())
        }
        _ => Err(format!("unknown search command {cmd:?}")),
    }
}
