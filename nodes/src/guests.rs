//! The guest commands (issue 4): `install`, `mkguest --component`,
//! `run TOOL --input JSON`, `guests`, `mkhttp`; and evaluation (issue 6):
//! `eval SOURCE SLOT=PATH…`, `endow NUMBER --bind SLOT=PATH…`.

use anyhow::{Context, bail};
use capstan_proto::RequestId;
use serde_json::json;

use crate::cli::Command;
use crate::client::Client;
use crate::output::print_json;

/// Components larger than this are refused before sending (the node's limit).
const MAX_COMPONENT_BYTES: u64 = 8 * 1024 * 1024;

/// `SLOT=PATH` arguments (`--grant`, `--with`, `--bind`, `eval`'s); `what`
/// and `example` make the error.
pub fn parse_bindings(
    list: &[String],
    what: &str,
    example: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| match s.split_once('=') {
            Some((slot, path)) if !slot.is_empty() && !path.is_empty() => {
                Ok((slot.to_string(), path.to_string()))
            }
            _ => bail!("{what} expects SLOT=PATH (e.g. {example}), got {s:?}"),
        })
        .collect()
}

/// JSON text, indented when it is an object or an array.
fn pretty(json: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(v @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) => {
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| json.to_string())
        }
        _ => json.to_string(),
    }
}

/// `eval` (number none) or `endow NUMBER`: the node's answer, one JSON object.
async fn evaluate(
    client: &Client,
    evaluator: &str,
    source: &str,
    bindings: &[(String, String)],
    number: Option<u64>,
    result_name: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let req = RequestId::random();
    let answer = client
        .call(|a| async move {
            let mut r = a.evaluate_request();
            r.get().set_req_id(&req.0);
            r.get().set_evaluator(evaluator);
            r.get().set_source(source);
            r.get().set_endow(number.is_some());
            r.get().set_number(number.unwrap_or(0));
            r.get().set_result_name(result_name.unwrap_or(""));
            let mut gl = r.get().init_bindings(bindings.len() as u32);
            for (i, (slot, path)) in bindings.iter().enumerate() {
                let mut g = gl.reborrow().get(i as u32);
                g.set_slot(slot.as_str());
                g.set_path(path.as_str());
            }
            let answer = r.send().promise.await?;
            Ok(answer.get()?.get_json()?.to_string().unwrap_or_default())
        })
        .await?;
    serde_json::from_str(&answer).context("the node answered malformed JSON")
}

pub async fn mkguest(
    client: &Client,
    path: &str,
    component: &str,
    fuel: Option<u64>,
    deadline_ms: Option<u32>,
    with: &[(String, String)],
    json: bool,
) -> anyhow::Result<()> {
    let req = RequestId::random();
    let id = client
        .call(|a| async move {
            let mut r = a.mkguest_component_request();
            r.get().set_req_id(&req.0);
            r.get().set_path(path);
            r.get().set_component(component);
            r.get().set_fuel(fuel.unwrap_or(0));
            r.get().set_deadline_ms(deadline_ms.unwrap_or(0));
            let mut gl = r.get().init_with(with.len() as u32);
            for (i, (slot, path)) in with.iter().enumerate() {
                let mut g = gl.reborrow().get(i as u32);
                g.set_slot(slot.as_str());
                g.set_path(path.as_str());
            }
            let answer = r.send().promise.await?;
            Ok(answer.get()?.get_id()?.to_vec())
        })
        .await?;
    if json {
        print_json(&json!({"id": hex::encode(&id)}));
    } else {
        let slots: Vec<&str> = with.iter().map(|(slot, _)| slot.as_str()).collect();
        let given = if slots.is_empty() {
            String::new()
        } else {
            format!(", given {}", slots.join(", "))
        };
        println!(
            "made guest {path} running component {component}{given} (id {})",
            hex::encode(&id)
        );
    }
    Ok(())
}

pub async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Install {
            file, name, grants, ..
        } => {
            let grants = parse_bindings(&grants, "--grant", "--grant docs=shared-docs")?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            if len > MAX_COMPONENT_BYTES {
                bail!(
                    "{} is {len} bytes; a component may have at most {MAX_COMPONENT_BYTES} bytes",
                    file.display()
                );
            }
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let req = RequestId::random();
            let what = format!("installing {name}: checking and compiling the component");
            let info = crate::output::with_progress(
                &what,
                client.call(|a| {
                    let (bytes, grants, name) = (&bytes, &grants, &name);
                    async move {
                        let mut r = a.install_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_name(name.as_str());
                        r.get().set_component(bytes);
                        let mut gl = r.get().init_grants(grants.len() as u32);
                        for (i, (slot, path)) in grants.iter().enumerate() {
                            let mut g = gl.reborrow().get(i as u32);
                            g.set_slot(slot.as_str());
                            g.set_path(path.as_str());
                        }
                        let answer = r.send().promise.await?;
                        let i = answer.get()?.get_info()?;
                        let texts =
                            |l: capnp::text_list::Reader<'_>| -> Result<Vec<String>, capnp::Error> {
                                l.iter()
                                    .map(|t| Ok(t?.to_string().unwrap_or_default()))
                                    .collect()
                            };
                        Ok(json!({
                            "id": hex::encode(i.get_id()?),
                            "hash": i.get_hash()?.to_string().unwrap_or_default(),
                            "world": i.get_world()?.to_string().unwrap_or_default(),
                            "size": i.get_size(),
                            "imports": texts(i.get_imports()?)?,
                            "exports": texts(i.get_exports()?)?,
                            "grants": texts(i.get_grants()?)?,
                        }))
                    }
                }),
            )
            .await?;
            if json {
                print_json(&info);
            } else {
                let list = |k: &str| {
                    info[k]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default()
                };
                println!(
                    "installed {name}: {} bytes, blake3 {}",
                    info["size"],
                    info["hash"].as_str().unwrap_or("")
                );
                println!("world    {}", info["world"].as_str().unwrap_or(""));
                println!("imports  {}", list("imports"));
                println!("exports  {}", list("exports"));
                let g = list("grants");
                println!("grants   {}", if g.is_empty() { "none".into() } else { g });
            }
        }
        Command::Mkhttp {
            name,
            allow,
            methods,
            headers,
            timeout_ms,
            max_bytes,
            insecure_http,
            ..
        } => {
            let mut hs = Vec::new();
            for h in &headers {
                let Some((n, f)) = h
                    .split_once('=')
                    .filter(|(n, f)| !n.is_empty() && !f.is_empty())
                else {
                    bail!(
                        "--header-file expects NAME=FILE (e.g. Authorization=/path/to/key), got {h:?}"
                    );
                };
                // the node reads the file: give it an absolute path
                let f = std::fs::canonicalize(f)
                    .with_context(|| format!("cannot read the key file {f}"))?;
                hs.push((n.to_string(), f.display().to_string()));
            }
            if timeout_ms == Some(0) {
                bail!("--timeout-ms must be at least 1");
            }
            if max_bytes == Some(0) {
                bail!("--max-bytes must be at least 1");
            }
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let (name, allow, methods, hs) = (&name, &allow, &methods, &hs);
                    async move {
                        let mut r = a.mkhttp_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_name(name.as_str());
                        let mut s = r.get().init_spec();
                        let mut l = s.reborrow().init_allow(allow.len() as u32);
                        for (i, u) in allow.iter().enumerate() {
                            l.set(i as u32, u.as_str());
                        }
                        let mut l = s.reborrow().init_methods(methods.len() as u32);
                        for (i, m) in methods.iter().enumerate() {
                            l.set(i as u32, m.as_str());
                        }
                        let mut l = s.reborrow().init_headers(hs.len() as u32);
                        for (i, (n, f)) in hs.iter().enumerate() {
                            let mut h = l.reborrow().get(i as u32);
                            h.set_name(n.as_str());
                            h.set_file(f.as_str());
                        }
                        s.set_timeout_ms(timeout_ms.unwrap_or(0));
                        s.set_max_bytes(max_bytes.unwrap_or(0));
                        s.set_insecure_http(insecure_http);
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            if json {
                print_json(&json!({"id": hex::encode(&id)}));
            } else {
                println!("{}", hex::encode(&id));
            }
        }
        Command::Run { tool, input, .. } => {
            let out = client
                .call(|a| {
                    let (tool, input) = (&tool, &input);
                    async move {
                        let mut r = a.run_tool_request();
                        r.get().set_name(tool.as_str());
                        r.get().set_input(input.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_output()?.to_string().unwrap_or_default())
                    }
                })
                .await?;
            if json {
                let v: serde_json::Value =
                    serde_json::from_str(&out).unwrap_or(serde_json::Value::String(out));
                print_json(&json!({ "output": v }));
            } else {
                println!("{out}");
            }
        }
        Command::Eval {
            source,
            bindings,
            evaluator,
            result_name,
            ..
        } => {
            let bindings = parse_bindings(&bindings, "eval", "doc=greeting")?;
            let v = evaluate(
                client,
                &evaluator,
                &source,
                &bindings,
                None,
                result_name.as_deref(),
            )
            .await?;
            if json {
                print_json(&v);
                if v.get("error").is_some() {
                    std::process::exit(1);
                }
            } else if let Some(r) = v["result"].as_str() {
                println!("{}", pretty(r));
            } else {
                bail!(
                    "the code threw: {}",
                    v["error"].as_str().unwrap_or("(no message)")
                );
            }
        }
        Command::Endow {
            number,
            bindings,
            evaluator,
            ..
        } => {
            let bindings = parse_bindings(&bindings, "--bind", "--bind reader=inbox-reader")?;
            let v = evaluate(client, &evaluator, "", &bindings, Some(number), None).await?;
            if json {
                print_json(&v);
            } else {
                let reply = v["reply"].as_u64().unwrap_or(0);
                match v["result"].as_str() {
                    Some(r) => println!(
                        "result: {}\nmailed to the proposer as message {reply}",
                        pretty(r)
                    ),
                    None => println!(
                        "the code threw: {}\nmailed to the proposer as message {reply}",
                        v["error"].as_str().unwrap_or("(no message)")
                    ),
                }
            }
        }
        Command::Guests { .. } => {
            let gs = client
                .call(|a| async move {
                    let answer = a.guests_request().send().promise.await?;
                    let mut out = Vec::new();
                    for g in answer.get()?.get_guests()?.iter() {
                        let t = |r: capnp::Result<capnp::text::Reader<'_>>| -> Result<String, capnp::Error> {
                            Ok(r?.to_string().unwrap_or_default())
                        };
                        out.push(json!({
                            "name": t(g.get_name())?,
                            "id": hex::encode(g.get_id()?),
                            "component": t(g.get_component())?,
                            "state": t(g.get_state())?,
                            "handled": g.get_handled(),
                            "failures": g.get_failures(),
                            "fuel_last": g.get_fuel_last(),
                            "memory_peak": g.get_memory_peak(),
                            "instantiate_ns_last": g.get_instantiate_ns_last(),
                            "call_ns_last": g.get_call_ns_last(),
                            "last_error": t(g.get_last_error())?,
                        }));
                    }
                    Ok(out)
                })
                .await?;
            if json {
                print_json(&serde_json::Value::Array(gs));
            } else if gs.is_empty() {
                println!("no guest components");
            } else {
                println!(
                    "{:<20} {:<8} {:>8} {:>8} {:>12} {:>10}  LAST ERROR",
                    "NAME", "STATE", "HANDLED", "FAILED", "FUEL(LAST)", "MEMORY"
                );
                let n = |g: &serde_json::Value, k: &str| g[k].as_u64().unwrap_or(0);
                for g in &gs {
                    let last = g["last_error"].as_str().unwrap_or("");
                    println!(
                        "{:<20} {:<8} {:>8} {:>8} {:>12} {:>10}  {}",
                        g["name"].as_str().unwrap_or(""),
                        g["state"].as_str().unwrap_or(""),
                        n(g, "handled"),
                        n(g, "failures"),
                        n(g, "fuel_last"),
                        format!("{} KiB", n(g, "memory_peak") / 1024),
                        if last.is_empty() { "-" } else { last }
                    );
                }
            }
        }
        other => bail!("internal error: {other:?} is not a guest command"),
    }
    Ok(())
}
