//! The mail commands: `send`, `reply`, `request`, `resolve`, `reject`,
//! `adopt`, `dismiss`, `quota` and `inbox` (`--follow` included).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::Write;
use std::rc::Rc;

use anyhow::{anyhow, bail};
use capnp::Error as CapError;
use capstan_actors::api::{DEFAULT_INBOX_PAGE, MAX_INBOX_PAGE, MAX_MESSAGE_REFS, MAX_MESSAGE_TEXT};
use capstan_proto::RequestId;
use capstan_proto::api_capnp::message_sink;
use serde_json::json;

use super::{print_done, print_made};
use crate::cli::Command;
use crate::client::{Client, read_message};
use crate::output::{self, Message, bytes_human, print_json};
use crate::text;

/// Runs a mail command.
pub(super) async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Send {
            to, text, trace, ..
        } => {
            let id = trace.then(capstan_cluster::trace::new_id);
            let number = send(client, &to, &text.join(" "), None, id).await?;
            match id {
                None => print_number(json, number),
                Some(id) => {
                    // (wake-ups go out just after the commit: give them a moment)
                    tokio::time::sleep(super::trace::SETTLE).await;
                    let mut v = super::trace::fetch(client, id).await?;
                    if json {
                        v["number"] = json!(number);
                        print_json(&v);
                    } else {
                        println!("sent message {number}");
                        super::trace::show(&v, None, false)?;
                    }
                }
            }
        }
        Command::Reply { number, text, .. } => {
            let n = send(client, "", &text.join(" "), Some(number), None).await?;
            print_number(json, n);
        }
        Command::Request {
            to,
            description,
            name,
            wait,
            ..
        } => {
            let description = description.join(" ");
            check_text_size("the description", description.len())?;
            let name = name.unwrap_or_default();
            let req = RequestId::random();
            let (number, promise) = client
                .call(|a| {
                    let (to, description, name) = (to.clone(), description.clone(), name.clone());
                    async move {
                        let mut r = a.request_request();
                        let mut p = r.get();
                        p.set_req_id(&req.0);
                        p.set_to(to.as_str());
                        p.set_description(description.as_str());
                        p.set_result_name(name.as_str());
                        let answer = r.send().promise.await?;
                        let answer = answer.get()?;
                        Ok((answer.get_number(), answer.get_promise()?.to_vec()))
                    }
                })
                .await?;
            if !wait {
                if json {
                    print_json(&json!({"number": number, "promise": hex::encode(&promise)}));
                } else {
                    println!("sent request {number} (promise {})", hex::encode(&promise));
                }
                return Ok(());
            }
            let (state, id) = client
                .call(|a| async move {
                    let mut r = a.wait_request_request();
                    r.get().set_number(number);
                    let answer = r.send().promise.await?;
                    let answer = answer.get()?;
                    Ok((answer.get_state()?.to_string()?, answer.get_id()?.to_vec()))
                })
                .await?;
            if let Some(why) = state.strip_prefix("rejected: ") {
                bail!("request {number} was rejected: {why}");
            }
            if state != "resolved" {
                bail!("request {number} is {state}");
            }
            if json {
                print_json(&json!({"number": number, "state": state, "id": hex::encode(&id)}));
            } else {
                println!("request {number} resolved: {}", hex::encode(&id));
            }
        }
        Command::Resolve { number, path, .. } => {
            let req = RequestId::random();
            client
                .call(|a| {
                    let path = path.clone();
                    async move {
                        let mut r = a.resolve_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_number(number);
                        r.get().set_path(path.as_str());
                        r.send().promise.await.map(drop)
                    }
                })
                .await?;
            print_done(
                json,
                &format!("resolved request {number} with {path}"),
                json!({"number": number, "resolved": path}),
            );
        }
        Command::Reject { number, reason, .. } => {
            let reason = reason.join(" ");
            check_text_size("the reason", reason.len())?;
            let req = RequestId::random();
            client
                .call(|a| {
                    let reason = reason.clone();
                    async move {
                        let mut r = a.reject_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_number(number);
                        r.get().set_reason(reason.as_str());
                        r.send().promise.await.map(drop)
                    }
                })
                .await?;
            let line = if reason.is_empty() {
                format!("rejected request {number} (no reason given)")
            } else {
                format!("rejected request {number}: {reason}")
            };
            print_done(json, &line, json!({"number": number, "rejected": reason}));
        }
        Command::Adopt {
            number, edge, name, ..
        } => {
            let name = name.unwrap_or_else(|| edge.clone());
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let (edge, name) = (edge.clone(), name.clone());
                    async move {
                        let mut r = a.adopt_request();
                        let mut p = r.get();
                        p.set_req_id(&req.0);
                        p.set_number(number);
                        p.set_edge_name(edge.as_str());
                        p.set_path(name.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(
                json,
                &format!("adopted {edge} of message {number} as {name}"),
                &id,
            );
        }
        Command::Dismiss { number, .. } => {
            let req = RequestId::random();
            client
                .call(|a| async move {
                    let mut r = a.dismiss_request();
                    r.get().set_req_id(&req.0);
                    r.get().set_number(number);
                    r.send().promise.await.map(drop)
                })
                .await?;
            print_done(
                json,
                &format!("dismissed message {number}"),
                json!({"dismissed": number}),
            );
        }
        Command::Quota {
            agent,
            messages,
            bytes,
            default,
            ..
        } => {
            let req = RequestId::random();
            let set = default || messages.is_some() || bytes.is_some();
            let answer = client
                .call(|a| {
                    let agent = &agent;
                    async move {
                        let mut r = a.quota_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(agent.as_str());
                        r.get().set_set(set);
                        r.get().set_max_messages(messages.unwrap_or(0));
                        r.get().set_max_bytes(bytes.unwrap_or(0));
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_json()?.to_string()?)
                    }
                })
                .await?;
            let v: serde_json::Value = serde_json::from_str(&answer)
                .map_err(|e| anyhow::anyhow!("the node answered bad JSON: {e}"))?;
            if json {
                print_json(&v);
            } else {
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                println!(
                    "inbox of {agent}: {} of {} messages, {} of {} bytes{}",
                    n("messages"),
                    n("max_messages"),
                    n("bytes"),
                    n("max_bytes"),
                    if v["default"].as_bool() == Some(true) {
                        " (the default quota)"
                    } else {
                        ""
                    }
                );
            }
        }
        Command::Inbox {
            thread,
            follow,
            limit,
            after,
            ..
        } => {
            let thread = thread.as_deref().map(parse_thread).transpose()?;
            let from = match after {
                None => 0,
                Some(m) => m
                    .checked_add(1)
                    .ok_or_else(|| anyhow!("--after {m}: no message is numbered above it"))?,
            };
            if follow {
                return follow_inbox(client, thread, from, json).await;
            }
            let limit = limit.unwrap_or(DEFAULT_INBOX_PAGE as u32);
            if limit == 0 || limit as usize > MAX_INBOX_PAGE {
                bail!("--limit {limit}: the page size must be from 1 to {MAX_INBOX_PAGE}");
            }
            let (messages, more) = client
                .call(|a| async move {
                    let mut r = a.inbox_request();
                    if let Some(t) = thread {
                        r.get().set_thread(&t.0);
                    }
                    r.get().set_from(from);
                    r.get().set_limit(limit);
                    let answer = r.send().promise.await?;
                    let answer = answer.get()?;
                    let mut out = Vec::new();
                    for m in answer.get_messages()?.iter() {
                        out.push(read_message(m)?);
                    }
                    Ok((out, answer.get_more()))
                })
                .await?;
            if json {
                print_json(&messages.iter().map(output::message_json).collect());
            } else {
                for m in &messages {
                    print_message(false, m);
                }
                if more && let Some(last) = messages.last() {
                    println!(
                        "(showing {} of more; next page: --after {})",
                        messages.len(),
                        last.number
                    );
                }
            }
        }
        other => bail!("internal error: {other:?} is not a mail command"),
    }
    Ok(())
}

/// The node's limit on the text of one message (`MAX_MESSAGE_TEXT`): the
/// text of `send` and `reply` without its references, a request's
/// description, a rejection's reason.
fn check_text_size(what: &str, len: usize) -> anyhow::Result<()> {
    if len > MAX_MESSAGE_TEXT {
        bail!(
            "{what} is {} ({len} bytes), over the limit of {} ({MAX_MESSAGE_TEXT} bytes) for the text of one message; \
             store a long text as a value (`capstan store --file FILE --name NAME`) and send a reference to it (`@NAME`)",
            bytes_human(len),
            bytes_human(MAX_MESSAGE_TEXT),
        );
    }
    Ok(())
}

fn parse_thread(s: &str) -> anyhow::Result<RequestId> {
    s.to_ascii_lowercase().parse::<RequestId>().map_err(|_| {
        anyhow!("invalid message id {s:?}: expected 32 hex digits (a message_id from `capstan inbox --json`)")
    })
}

fn print_message(json: bool, m: &Message) {
    if json {
        print_json(&output::message_json(m));
    } else {
        println!("{}", output::message_human(m));
    }
}

fn print_number(json: bool, number: u64) {
    if json {
        print_json(&json!({"number": number}));
    } else {
        println!("sent message {number}");
    }
}

/// `send` and `reply` (`to` empty and `reply_to` set: the node answers the sender).
async fn send(
    client: &Client,
    to: &str,
    text: &str,
    reply_to: Option<u64>,
    trace: Option<u64>,
) -> anyhow::Result<u64> {
    let parsed = text::parse(text).map_err(|e| anyhow!(e))?;
    check_text_size(
        "the message text",
        parsed.strings.iter().map(String::len).sum(),
    )?;
    if parsed.refs.len() > MAX_MESSAGE_REFS {
        bail!(
            "the message has {} references, over the limit of {MAX_MESSAGE_REFS} for one message; \
             put the things in a directory (`capstan mkdir`, `capstan copy`) and send a reference to it",
            parsed.refs.len()
        );
    }
    let req = RequestId::random();
    let number = client
        .call(|a| {
            let parsed = &parsed;
            async move {
                let mut r = a.send_request();
                let mut p = r.get();
                p.set_req_id(&req.0);
                p.set_to(to);
                let mut strings = p.reborrow().init_strings(parsed.strings.len() as u32);
                for (i, s) in parsed.strings.iter().enumerate() {
                    strings.set(i as u32, s.as_str());
                }
                let mut refs = p.reborrow().init_refs(parsed.refs.len() as u32);
                for (i, t) in parsed.refs.iter().enumerate() {
                    let mut b = refs.reborrow().get(i as u32);
                    b.set_path(t.path.as_str());
                    b.set_edge_name(t.edge.as_str());
                }
                if let Some(n) = reply_to {
                    p.set_reply_to(n);
                    p.set_is_reply(true);
                }
                p.set_trace(trace.unwrap_or(0));
                let answer = r.send().promise.await?;
                Ok(answer.get()?.get_number())
            }
        })
        .await?;
    Ok(number)
}

/// Prints each message pushed by the node, one line each, flushed.
struct Printer {
    json: bool,
    next: Rc<Cell<u64>>,
    /// With `--thread`: the message ids of the thread seen so far.
    thread: Option<RefCell<HashSet<Vec<u8>>>>,
    /// The numbers printed, the last [`PRINTED_KEPT`] of them.
    printed: Rc<RefCell<std::collections::BTreeSet<u64>>>,
}

/// Numbers a follower remembers having printed.
const PRINTED_KEPT: usize = 10_000;
/// How far below the highest number printed a follower that reconnects
/// looks for numbers not printed yet (late commits).
const RESUME_WINDOW: u64 = 256;

/// Where a follower that reconnects follows on from: the lowest number not
/// printed yet in the [`RESUME_WINDOW`] below `next` (the number after the
/// highest printed) and not below `from`, else `next`. Numbers commit out
/// of order, so one below the highest printed may still land: following
/// on from `next` lost it. What was printed again is skipped.
fn resume_from(printed: &std::collections::BTreeSet<u64>, from: u64, next: u64) -> u64 {
    let low = from.max(next.saturating_sub(RESUME_WINDOW));
    (low..next).find(|n| !printed.contains(n)).unwrap_or(next)
}

impl message_sink::Server for Printer {
    async fn push(
        self: Rc<Self>,
        params: message_sink::PushParams,
        _: message_sink::PushResults,
    ) -> Result<(), CapError> {
        let m = read_message(params.get()?.get_message()?)?;
        // Messages may come out of order (numbers commit out of order across
        // nodes, and a push the node missed comes later from its store): skip
        // only what was printed (before a reconnection too).
        {
            let mut printed = self.printed.borrow_mut();
            if m.number < self.next.get().saturating_sub(PRINTED_KEPT as u64)
                || !printed.insert(m.number)
            {
                return Ok(());
            }
            while printed.len() > PRINTED_KEPT {
                printed.pop_first();
            }
        }
        self.next.set(self.next.get().max(m.number + 1));
        if let Some(ids) = &self.thread {
            let mut ids = ids.borrow_mut();
            let member =
                ids.contains(&m.message_id) || m.reply_to.as_ref().is_some_and(|r| ids.contains(r));
            if !member {
                return Ok(());
            }
            ids.insert(m.message_id.clone());
        }
        let line = if self.json {
            output::message_json(&m).to_string()
        } else {
            output::message_human(&m)
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`capstan inbox --follow | head -1`): done.
            std::process::exit(0);
        }
        Ok(())
    }
}

async fn follow_inbox(
    client: &Client,
    thread: Option<RequestId>,
    from: u64,
    json: bool,
) -> anyhow::Result<()> {
    let next = Rc::new(Cell::new(from));
    let printer = Printer {
        json,
        next: next.clone(),
        thread: thread.map(|t| RefCell::new(HashSet::from([t.0.to_vec()]))),
        printed: Rc::new(RefCell::new(Default::default())),
    };
    let printed = printer.printed.clone();
    let sink: message_sink::Client = capnp_rpc::new_client(printer);
    client
        .follow(sink, || resume_from(&printed.borrow(), from, next.get()))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnecting_follower_follows_on_from_a_number_not_printed_yet() {
        let printed: std::collections::BTreeSet<u64> = [5, 6, 8, 9].into();
        // 7 was handed out before 8 and may still land
        assert_eq!(resume_from(&printed, 5, 10), 7);
        assert_eq!(resume_from(&printed, 8, 10), 10, "nothing missing from 8");
        let all: std::collections::BTreeSet<u64> = (0..1000).collect();
        assert_eq!(resume_from(&all, 0, 1000), 1000);
        // an old hole far below is not looked for again
        let mut old_hole = all.clone();
        old_hole.remove(&3);
        assert_eq!(resume_from(&old_hole, 0, 1000), 1000);
        old_hole.remove(&990);
        assert_eq!(resume_from(&old_hole, 0, 1000), 990);
        assert_eq!(resume_from(&Default::default(), 4, 4), 4, "nothing printed");
    }

    #[test]
    fn thread_ids_are_validated() {
        assert!(parse_thread(&"ab".repeat(16)).is_ok());
        assert!(parse_thread(&"AB".repeat(16)).is_ok());
        let e = parse_thread("xyz").unwrap_err().to_string();
        assert!(e.contains("expected 32 hex digits"), "{e}");
        assert!(parse_thread(&"ab".repeat(32)).is_err());
    }
}
