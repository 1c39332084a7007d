//! `capstan routine …` (issue 20): mail on a schedule.
//!
//! Client side: [`run`] checks the schedule, calls
//! `Agent.routine(reqId, command, args)` and renders the JSON answer.
//! Node side: [`command`] decodes the arguments and calls the
//! [`AgentHandle`]'s `routine_*` methods.

use capstan_actors::AgentHandle;
use capstan_actors::routines::{Schedule, utc_text};
use capstan_proto::RequestId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::RoutineCommand;
use crate::client::Client;
use crate::output::str_field as s;

/// Runs `capstan routine …` against the node.
pub async fn run(client: &Client, command: RoutineCommand, json_out: bool) -> anyhow::Result<()> {
    let (cmd, args) = match &command {
        RoutineCommand::Add {
            name,
            to,
            every,
            cron,
            text,
            ..
        } => {
            // Checked here too: a bad schedule is refused before the node is asked.
            match (every, cron) {
                (Some(e), None) => {
                    Schedule::every(e)?;
                }
                (None, Some(c)) => {
                    Schedule::cron(c)?;
                }
                _ => anyhow::bail!("give one of --every DURATION or --cron EXPR"),
            }
            (
                "add",
                json!({"name": name, "to": to, "every": every, "cron": cron, "text": text}),
            )
        }
        RoutineCommand::List { .. } => ("list", json!({})),
        RoutineCommand::Remove { name, .. } => ("remove", json!({"name": name})),
    };
    let req = RequestId::random();
    let args = args.to_string();
    let text = client
        .call(|a| {
            let args = args.clone();
            async move {
                let mut r = a.routine_request();
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

fn when(v: &Value) -> String {
    v.as_u64().map(utc_text).unwrap_or_else(|| "never".into())
}

/// The human rendering of an answer.
pub fn human(cmd: &str, v: &Value) -> String {
    match cmd {
        "add" => format!(
            "routine {}: mails {} {}; next tick {}\n",
            s(v, "name"),
            s(v, "to"),
            s(v, "schedule"),
            when(&v["next_ms"])
        ),
        "list" => {
            let rows = v.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                return "no routines; add one with `capstan routine add NAME --to AGENT --every 1h --text TEXT`\n".into();
            }
            let mut out = String::new();
            for r in rows {
                out.push_str(&format!(
                    "{}\tto {}\t{}\tfired {}\tnext {}{}\t{}\n",
                    s(&r, "name"),
                    s(&r, "to"),
                    s(&r, "schedule"),
                    r["fired"].as_u64().unwrap_or(0),
                    when(&r["next_ms"]),
                    if s(&r, "last_error").is_empty() {
                        String::new()
                    } else {
                        format!("\tlast error: {}", s(&r, "last_error"))
                    },
                    s(&r, "text"),
                ));
            }
            out
        }
        _ => String::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    name: String,
    to: String,
    every: Option<String>,
    cron: Option<String>,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

fn parse<T: for<'de> Deserialize<'de>>(cmd: &str, args: &str) -> Result<T, String> {
    serde_json::from_str(args).map_err(|e| format!("bad arguments for routine {cmd}: {e}"))
}

/// Runs one routine command on the node, as `handle`.
pub async fn command(
    handle: &AgentHandle,
    req: RequestId,
    cmd: &str,
    args: &str,
) -> Result<Value, String> {
    let err = |e: capstan_actors::Error| e.to_string();
    match cmd {
        "add" => {
            let a: AddArgs = parse(cmd, args)?;
            let schedule = match (a.every, a.cron) {
                (Some(e), None) => Schedule::every(&e).map_err(err)?,
                (None, Some(c)) => Schedule::cron(&c).map_err(err)?,
                _ => return Err("give one of --every DURATION or --cron EXPR".into()),
            };
            let r = handle
                .routine_add(req, &a.name, &a.to, schedule, &a.text)
                .await
                .map_err(err)?;
            Ok(r.to_json())
        }
        "list" => {
            let rs = handle.routine_list().await.map_err(err)?;
            Ok(Value::Array(rs.iter().map(|r| r.to_json()).collect()))
        }
        "remove" => {
            let a: NameArgs = parse(cmd, args)?;
            handle.routine_remove(&a.name).await.map_err(err)?;
            Ok(json!({"removed": a.name}))
        }
        _ => Err(format!("unknown routine command {cmd:?}")),
    }
}
