//! The name commands: `list`, `show`, `cat`, `store`, `remove`, `move`,
//! `copy`, `mkdir`, `mkhost`, `mkguest` and `cancel`.

use std::io::{Read, Write};

use anyhow::{Context, anyhow, bail};
use capnp::Error as CapError;
use capstan_actors::api::MAX_VALUE_BYTES;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::ValueKind;
use serde_json::json;

use super::{print_done, print_made};
use crate::cli::{Command, StoreArgs};
use crate::client::{Client, read_entry};
use crate::output::{self, bytes_human, print_json};

fn kind_name(k: ValueKind) -> &'static str {
    match k {
        ValueKind::Text => "text",
        ValueKind::Json => "json",
        ValueKind::Bytes => "bytes",
    }
}

/// Runs a name command.
pub(super) async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::List { path, .. } => {
            let path = path.unwrap_or_default();
            let entries = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.list_request();
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        let mut out = Vec::new();
                        for e in answer.get()?.get_entries()?.iter() {
                            out.push(read_entry(e)?);
                        }
                        Ok(out)
                    }
                })
                .await?;
            if json {
                print_json(&entries.iter().map(output::entry_json).collect());
            } else {
                print!("{}", output::entries_human(&entries));
            }
        }
        Command::Show { path, .. } => {
            let entry = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.show_request();
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        read_entry(answer.get()?.get_entry()?)
                    }
                })
                .await?;
            if json {
                print_json(&output::entry_json(&entry));
            } else {
                print!("{}", output::entry_human(&entry));
            }
        }
        Command::Cat { path, .. } => {
            let (kind, data) = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.cat_request();
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        let answer = answer.get()?;
                        let kind = answer.get_kind().map_err(|_| {
                            CapError::failed("the node sent an unknown value kind".into())
                        })?;
                        Ok((kind, answer.get_data()?.to_vec()))
                    }
                })
                .await?;
            if json {
                print_json(&output::cat_json(kind_name(kind), &data));
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)
                    .and_then(|()| out.flush())
                    .context("cannot write to stdout")?;
            }
        }
        Command::Store(s) => {
            let (kind, data) = read_store_source(&s)?;
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let (name, data) = (s.name.clone(), &data);
                    async move {
                        let mut r = a.store_request();
                        let mut p = r.get();
                        p.set_req_id(&req.0);
                        p.set_path(name.as_str());
                        p.set_kind(kind);
                        p.set_data(data);
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(
                json,
                &format!(
                    "stored {}: {}, {}",
                    s.name,
                    kind_name(kind),
                    bytes_human(data.len())
                ),
                &id,
            );
        }
        Command::Remove { path, .. } => {
            let req = RequestId::random();
            client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.remove_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(path.as_str());
                        r.send().promise.await.map(drop)
                    }
                })
                .await?;
            print_done(
                json,
                &format!("removed the name {path}"),
                json!({"removed": path}),
            );
        }
        Command::Move { from, to, .. } => {
            let req = RequestId::random();
            client
                .call(|a| {
                    let (from, to) = (from.clone(), to.clone());
                    async move {
                        let mut r = a.move_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_from(from.as_str());
                        r.get().set_to(to.as_str());
                        r.send().promise.await.map(drop)
                    }
                })
                .await?;
            print_done(
                json,
                &format!("moved {from} to {to}"),
                json!({"moved": from, "to": to}),
            );
        }
        Command::Copy { from, to, .. } => {
            let req = RequestId::random();
            client
                .call(|a| {
                    let (from, to) = (from.clone(), to.clone());
                    async move {
                        let mut r = a.copy_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_from(from.as_str());
                        r.get().set_to(to.as_str());
                        r.send().promise.await.map(drop)
                    }
                })
                .await?;
            print_done(
                json,
                &format!("copied {from} to {to} (both name the same thing)"),
                json!({"copied": from, "to": to}),
            );
        }
        Command::Mkdir { path, .. } => {
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.mkdir_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(json, &format!("made directory {path}"), &id);
        }
        Command::Mkhost { path, .. } => {
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.mkhost_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(json, &format!("made host {path}"), &id);
        }
        Command::Mkguest {
            path,
            component: Some(component),
            fuel,
            deadline_ms,
            with,
            ..
        } => {
            let with = crate::guests::parse_bindings(&with, "--with", "--with llm=claude")?;
            crate::guests::mkguest(client, &path, &component, fuel, deadline_ms, &with, json)
                .await?
        }
        Command::Mkguest { path, .. } => {
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.mkguest_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(json, &format!("made guest {path}"), &id);
        }
        Command::Cancel { path, .. } => {
            let req = RequestId::random();
            let n = client
                .call(|a| {
                    let path = &path;
                    async move {
                        let mut r = a.cancel_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        let a = answer.get()?;
                        let more = if a.has_cancelled() {
                            a.get_cancelled()?.to_string()?
                        } else {
                            String::new()
                        };
                        Ok((a.get_count(), more))
                    }
                })
                .await?;
            let (n, more) = n;
            let more: serde_json::Value = serde_json::from_str(&more)
                .unwrap_or_else(|_| json!({"cancelled": [], "rejected": 0}));
            let cancelled = more["cancelled"].as_array().cloned().unwrap_or_default();
            let rejected = more["rejected"].as_u64().unwrap_or(0);
            if json {
                print_json(&json!({"revoked": n, "cancelled": cancelled, "rejected": rejected}));
            } else {
                println!("revoked {n} locator(s) of {path}");
                for c in &cancelled {
                    let id = c["id"].as_str().unwrap_or("");
                    println!(
                        "cancelled {} {}: {}",
                        c["type"].as_str().unwrap_or(""),
                        &id[..id.len().min(8)],
                        c["reason"].as_str().unwrap_or("")
                    );
                }
                if rejected > 0 {
                    println!("rejected {rejected} pending request(s)");
                }
            }
        }
        other => bail!("internal error: {other:?} is not a name command"),
    }
    Ok(())
}

fn read_store_source(s: &StoreArgs) -> anyhow::Result<(ValueKind, Vec<u8>)> {
    if s.source_count() != 1 {
        bail!("give exactly one of --text T, --json J, --file F or --stdin");
    }
    let (kind, data) = if let Some(t) = &s.text {
        (ValueKind::Text, t.clone().into_bytes())
    } else if let Some(j) = s.json_value().map_err(|e| anyhow!(e))? {
        serde_json::from_str::<serde::de::IgnoredAny>(j)
            .map_err(|e| anyhow!("invalid JSON: {e}"))?;
        (ValueKind::Json, j.as_bytes().to_vec())
    } else if let Some(f) = &s.file {
        let data = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        (ValueKind::Bytes, data)
    } else {
        let mut data = Vec::new();
        std::io::stdin()
            .lock()
            .take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut data)
            .context("cannot read stdin")?;
        (ValueKind::Bytes, data)
    };
    check_value_size(data.len())?;
    Ok((kind, data))
}

/// The node's limit on one value (`MAX_VALUE_BYTES`), checked before
/// anything is sent; the error says what to do instead.
fn check_value_size(len: usize) -> anyhow::Result<()> {
    if len > MAX_VALUE_BYTES {
        bail!(
            "the value is {} ({len} bytes), over the limit of {} ({MAX_VALUE_BYTES} bytes) for one value; \
             split it into several values of at most {} each",
            bytes_human(len),
            bytes_human(MAX_VALUE_BYTES),
            bytes_human(MAX_VALUE_BYTES),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_sources() {
        let mut s = StoreArgs {
            text: None,
            json: vec!["{\"a\":".into()],
            file: None,
            stdin: false,
            name: "x".into(),
        };
        let e = read_store_source(&s).unwrap_err().to_string();
        assert!(e.starts_with("invalid JSON: "), "{e}");
        s.json = vec![" [1, 2] ".into()];
        let (k, d) = read_store_source(&s).unwrap();
        assert_eq!(k, ValueKind::Json);
        assert_eq!(d, b" [1, 2] ");
        s.text = Some("hi".into());
        assert!(read_store_source(&s).is_err());
    }
}
