//! The console's pages: server-rendered HTML (every text from mail, names
//! and guests escaped with [`escape`]; locator swiss numbers cut out of mail
//! text) and the two assets. The buttons are forms posted to `/endow` and
//! `/refuse`, doing what `capstan endow N --bind SLOT=PATH` and `capstan
//! reply N "refused: …"` do.

use std::collections::HashMap;
use std::fmt::Write as _;

use capstan_actors::{AgentHandle, EntryInfo, MessageBodyView, MessageView};
use capstan_proto::RequestId;
use serde_json::{Value, json};

use super::{Console, Request, Response, parse_form, percent_encode};
use crate::graph::escape;

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Most messages shown (the newest).
const MAX_SHOWN: usize = 300;
/// Pages of 1,000 read to find the newest messages.
const MAX_PAGES: usize = 20;
/// Most names offered in a slot's picker.
const MAX_PICKER: usize = 1000;
/// Most agents whose placement the cluster page shows.
const MAX_PLACEMENTS: usize = 100;
/// Longest refusal reason, bytes.
const MAX_REASON: usize = 4096;

/// Answers one authorized request.
pub async fn route(c: &Console, req: &Request, csrf: &str) -> Response {
    let who = if req.method == "POST" {
        form_value(req, "as")
    } else {
        req.param("as").unwrap_or("").to_string()
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/app.js") => Response::new(200, "text/javascript; charset=utf-8", APP_JS),
        ("GET", "/app.css") => Response::new(200, "text/css; charset=utf-8", APP_CSS),
        ("GET", "/favicon.ico") => Response::text(404, "no icon"),
        ("GET", path) => {
            let handle = match c.acting(&who).await {
                Ok(h) => h,
                Err(e) => {
                    return Response::new(
                        403,
                        "text/html; charset=utf-8",
                        layout(
                            c,
                            "Not allowed",
                            "",
                            (&who, csrf),
                            &[],
                            &format!(
                                "<p class=\"err\">cannot act as {}: {}</p><p><a href=\"/\">back to the root host</a></p>",
                                escape(&who),
                                escape(&format!("{e:#}"))
                            ),
                        ),
                    );
                }
            };
            let body = match path {
                "/" => inbox_section(c, &handle, &who, csrf).await,
                "/inbox/frag" => {
                    return Response::html(inbox_section(c, &handle, &who, csrf).await);
                }
                "/names" => names_page(&handle, &who, req.param("path").unwrap_or("")).await,
                "/guests" => guests_page(&handle).await,
                "/cluster" => cluster_page(c, &handle).await,
                "/graph" => graph_page(c, &handle, &who).await,
                "/graph.svg" => {
                    return match crate::graph::gather(&c.runtime, &handle, "").await {
                        Ok(g) => Response::new(200, "image/svg+xml", crate::graph::svg(&g)),
                        Err(e) => Response::text(400, &format!("{e:#}")),
                    };
                }
                _ => return Response::text(404, "not found"),
            };
            let title = match path {
                "/" => "Inbox",
                "/names" => "Names",
                "/guests" => "Guests",
                "/cluster" => "Cluster",
                _ => "Graph",
            };
            let agents = agents(c).await;
            Response::html(layout(c, title, path, (&who, csrf), &agents, &body))
        }
        ("POST", "/endow") | ("POST", "/refuse") => {
            let fetch = req.header("x-capstan-fetch") == Some("1");
            let outcome = match c.acting(&who).await {
                Ok(h) => act(&h, req).await,
                Err(e) => Err(format!("{e:#}")),
            };
            if fetch {
                let (code, v) = match outcome {
                    Ok(t) => (200, json!({"ok": true, "text": t})),
                    Err(e) => (400, json!({"ok": false, "error": e})),
                };
                Response::new(code, "application/json", v.to_string())
            } else {
                match outcome {
                    Ok(_) => Response::redirect(&format!("/?as={}", percent_encode(&who))),
                    Err(e) => Response::text(400, &e),
                }
            }
        }
        ("POST", _) => Response::text(404, "not found"),
        _ => Response::text(405, "method not allowed"),
    }
}

fn form_value(req: &Request, name: &str) -> String {
    parse_form(&String::from_utf8_lossy(&req.body))
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Endow or refuse: what the buttons do.
async fn act(h: &AgentHandle, req: &Request) -> Result<String, String> {
    let form = parse_form(&String::from_utf8_lossy(&req.body));
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let number: u64 = get("number")
        .parse()
        .map_err(|_| "the form has no message number".to_string())?;
    // The request id the page was rendered with: a second click applies once.
    let rid = hex::decode(get("req"))
        .ok()
        .and_then(|b| RequestId::from_slice(&b).ok())
        .unwrap_or_else(RequestId::random);
    if req.path == "/endow" {
        let bindings: Vec<(String, String)> = form
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("slot.")
                    .map(|s| (s.to_string(), v.to_string()))
            })
            .collect();
        let evaluator = match get("evaluator") {
            e if e.is_empty() => "evaluator".to_string(),
            e => e,
        };
        let o = h
            .endow(rid, &evaluator, number, &bindings)
            .await
            .map_err(|e| e.to_string())?;
        let what = match &o.result {
            Ok(r) => format!("result: {r}"),
            Err(e) => format!("error: {e}"),
        };
        Ok(match o.reply {
            Some(n) => format!("endowed message {number}: {what} (sent as message {n})"),
            None => format!("endowed message {number}: {what}"),
        })
    } else {
        let mut reason = get("reason");
        if reason.trim().is_empty() {
            reason = "the host refused this proposal".into();
        }
        if reason.len() > MAX_REASON {
            return Err(format!("the reason is longer than {MAX_REASON} bytes"));
        }
        let n = h
            .send(
                rid,
                "",
                vec![format!("refused: {reason}")],
                vec![],
                Some(number),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("refused message {number} (sent as message {n})"))
    }
}

/// The agents the root host holds by name (for the selector).
async fn agents(c: &Console) -> Vec<String> {
    c.runtime
        .root_host()
        .list("")
        .await
        .map(|es| {
            es.into_iter()
                .filter(|e| !is_special(&e.name) && (e.kind == "host" || e.kind == "guest"))
                .map(|e| e.name)
                .collect()
        })
        .unwrap_or_default()
}

fn is_special(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
}

fn q(who: &str) -> String {
    format!("as={}", percent_encode(who))
}

/// The page around `body`: navigation and the acting-agent selector.
fn layout(
    c: &Console,
    title: &str,
    active: &str,
    (who, csrf): (&str, &str),
    agents: &[String],
    body: &str,
) -> String {
    let mut s = String::with_capacity(body.len() + 2048);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><meta name=\"csrf-token\" content=\"{}\"><title>{} — capstan console</title><link rel=\"stylesheet\" href=\"/app.css\"><script src=\"/app.js\" defer></script></head><body data-as=\"{}\"><header><strong class=\"brand\">capstan</strong><nav>",
        escape(csrf),
        escape(title),
        escape(who)
    );
    for (path, name) in [
        ("/", "Inbox"),
        ("/names", "Names"),
        ("/guests", "Guests"),
        ("/cluster", "Cluster"),
        ("/graph", "Graph"),
    ] {
        let _ = write!(
            s,
            "<a href=\"{path}?{}\"{}>{name}</a>",
            escape(&q(who)),
            if path == active {
                " class=\"active\""
            } else {
                ""
            }
        );
    }
    let _ = write!(
        s,
        "</nav><form method=\"get\" action=\"{}\" class=\"as\"><label>acting as <select name=\"as\" id=\"as-select\"><option value=\"\">root host</option>",
        if active.is_empty() { "/" } else { active }
    );
    let mut listed = false;
    for a in agents {
        let sel = if a == who {
            listed = true;
            " selected"
        } else {
            ""
        };
        let _ = write!(
            s,
            "<option value=\"{}\"{sel}>{}</option>",
            escape(a),
            escape(a)
        );
    }
    if !who.is_empty() && !listed {
        let _ = write!(
            s,
            "<option value=\"{}\" selected>{}</option>",
            escape(who),
            escape(who)
        );
    }
    let _ = write!(
        s,
        "</select></label> <button type=\"submit\">Act</button></form></header><main><h1>{}</h1><p id=\"status\" role=\"status\"></p>{body}</main><footer>node {} · console on {}</footer></body></html>",
        escape(title),
        escape(&c.paths.home_str()),
        escape(&c.cfg.addr.to_string()),
    );
    s
}

/// `capstan://CLUSTER/SWISS?…` with the swiss number cut out.
pub fn redact_locators(text: &str) -> String {
    const P: &str = "capstan://";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(P) {
        out.push_str(&rest[..i + P.len()]);
        rest = &rest[i + P.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '"' || c == '<' || c == '>')
            .unwrap_or(rest.len());
        let loc = &rest[..end];
        match loc.split_once('/') {
            Some((cluster, swiss_and_more)) => {
                out.push_str(cluster);
                out.push_str("/[secret hidden]");
                if let Some(j) = swiss_and_more.find('?') {
                    out.push_str(&swiss_and_more[j..]);
                }
            }
            None => out.push_str(loc),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn message_text(m: &MessageView) -> String {
    match &m.body {
        MessageBodyView::Package { strings, names } => {
            let mut t = String::new();
            for (i, s) in strings.iter().enumerate() {
                t.push_str(s);
                if let Some(n) = names.get(i) {
                    t.push('@');
                    t.push_str(n);
                }
            }
            t
        }
        MessageBodyView::Request { description, state } => {
            format!(
                "request: {description} ({})",
                crate::server::state_text(state)
            )
        }
    }
}

/// A code proposal (`definition: …` then its JSON on the next line).
struct Proposal {
    source: String,
    slots: Vec<(String, String)>,
    values: Option<Value>,
}

fn proposal(text: &str) -> Option<Proposal> {
    let rest = text.strip_prefix("definition:")?;
    let (_, j) = rest.split_once('\n')?;
    let v: Value = serde_json::from_str(j).ok()?;
    let source = v["source"].as_str()?.to_string();
    let slots = v["slots"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, d)| (k.clone(), d.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let values = v
        .get("values")
        .filter(|x| !x.is_null() && x.as_object().is_none_or(|o| !o.is_empty()))
        .cloned();
    Some(Proposal {
        source,
        slots,
        values,
    })
}

/// The newest messages of the inbox (at most [`MAX_SHOWN`]), in order,
/// and whether newer ones are left to read (a long inbox is read
/// [`MAX_PAGES`] pages a request). Reading starts where the last window
/// began (numbers only grow), so each view reads little.
async fn newest(c: &Console, h: &AgentHandle) -> Result<(Vec<MessageView>, bool), String> {
    let start = c.inbox_start(h.id());
    let mut out: Vec<MessageView> = Vec::new();
    let mut from = start;
    let mut left = false;
    for i in 0..MAX_PAGES {
        let (page, more) = h
            .inbox_page(None, from, 1000)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(last) = page.last() {
            from = last.number + 1;
        }
        out.extend(page);
        if out.len() > MAX_SHOWN {
            out.drain(..out.len() - MAX_SHOWN);
        }
        if !more {
            break;
        }
        left = i + 1 == MAX_PAGES;
    }
    c.set_inbox_start(h.id(), out.first().map_or(start, |m| m.number));
    Ok((out, left))
}

/// The inbox as threads, newest activity first: the section the page
/// shows and live updates replace.
async fn inbox_section(c: &Console, h: &AgentHandle, who: &str, csrf: &str) -> String {
    let (msgs, left) = match newest(c, h).await {
        Ok(m) => m,
        Err(e) => {
            return format!(
                "<section id=\"inbox\" data-next=\"0\"><p class=\"err\">{}</p></section>",
                escape(&e)
            );
        }
    };
    let next = msgs.last().map_or(0, |m| m.number + 1);
    let by_id: HashMap<RequestId, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.message_id, i))
        .collect();
    // The thread of each message: the first of its reply chain shown.
    let mut root = vec![0usize; msgs.len()];
    for (i, m) in msgs.iter().enumerate() {
        let mut r = i;
        let mut cur = m.reply_to;
        for _ in 0..64 {
            match cur.and_then(|id| by_id.get(&id).copied()) {
                Some(j) if j < r => {
                    r = j;
                    cur = msgs[j].reply_to;
                }
                _ => break,
            }
        }
        root[i] = r;
    }
    let mut threads: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut pos: HashMap<usize, usize> = HashMap::new();
    for (i, &r) in root.iter().enumerate() {
        match pos.get(&r) {
            Some(&t) => threads[t].1.push(i),
            None => {
                pos.insert(r, threads.len());
                threads.push((r, vec![i]));
            }
        }
    }
    threads.sort_by_key(|(_, ms)| std::cmp::Reverse(*ms.last().unwrap_or(&0)));
    // Answered proposals: a later message from SELF replying to them.
    let answered: HashMap<RequestId, u64> = msgs
        .iter()
        .filter(|m| m.from == "SELF")
        .filter_map(|m| m.reply_to.map(|r| (r, m.number)))
        .collect();
    let names = if h.is_host() {
        h.list("").await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut s = format!(
        "<section id=\"inbox\" data-next=\"{next}\">{}",
        if msgs.is_empty() {
            "<p class=\"empty\">The inbox is empty.</p>"
        } else {
            ""
        }
    );
    if left {
        s.push_str("<p class=\"pending\">This inbox is long: older messages are shown; reload to read on to the newest.</p>");
    }
    // The proposals waiting for a decision, linked to their place.
    let pending: Vec<u64> = msgs
        .iter()
        .filter(|m| m.from != "SELF" && !answered.contains_key(&m.message_id))
        .filter(|m| proposal(&message_text(m)).is_some())
        .map(|m| m.number)
        .collect();
    if !pending.is_empty() {
        let _ = write!(
            s,
            "<p class=\"pending\">{} code proposal{} waiting for your decision:",
            pending.len(),
            if pending.len() == 1 { "" } else { "s" }
        );
        for n in &pending {
            let _ = write!(s, " <a href=\"#m-{n}\">message {n}</a>");
        }
        s.push_str("</p>");
    }
    for (_, ms) in &threads {
        s.push_str("<div class=\"thread\">");
        for &i in ms {
            let m = &msgs[i];
            let text = redact_locators(&message_text(m));
            let _ = write!(
                s,
                "<article class=\"msg\" id=\"m-{n}\" data-number=\"{n}\"><div class=\"meta\"><span class=\"num\">{n}.</span> from <b>{}</b> to <b>{}</b> <time>{}</time></div>",
                escape(&m.from),
                escape(&m.to),
                date(m.date_ms),
                n = m.number,
            );
            match proposal(&text).filter(|_| m.from != "SELF") {
                Some(p) => {
                    let first = text.lines().next().unwrap_or("");
                    let _ = write!(
                        s,
                        "<div class=\"proposal\" data-number=\"{}\"><p class=\"text\">{}</p><pre class=\"code\"><code>{}</code></pre>",
                        m.number,
                        escape(first),
                        highlight(&p.source)
                    );
                    if let Some(v) = &p.values {
                        let _ = write!(
                            s,
                            "<p>with stored results: <code>{}</code></p>",
                            escape(&v.to_string())
                        );
                    }
                    match answered.get(&m.message_id) {
                        Some(r) => {
                            let _ = write!(s, "<p class=\"answered\">answered (message {r})</p>");
                        }
                        None if h.is_host() => {
                            s.push_str(&proposal_forms(m.number, &p, &names, who, csrf));
                        }
                        None => s.push_str(
                            "<p class=\"answered\">pending: only a host can endow code</p>",
                        ),
                    }
                    s.push_str("</div>");
                }
                None => {
                    let _ = write!(s, "<div class=\"text\">{}</div>", escape(&text));
                }
            }
            s.push_str("</article>");
        }
        s.push_str("</div>");
    }
    s.push_str("</section>");
    s
}

fn hidden(s: &mut String, name: &str, value: &str) {
    let _ = write!(
        s,
        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
        escape(value)
    );
}

/// The Endow form (a picker per slot) and the Refuse form.
fn proposal_forms(number: u64, p: &Proposal, names: &[EntryInfo], who: &str, csrf: &str) -> String {
    let mut s = format!(
        "<form method=\"post\" action=\"/endow\" class=\"act endow\" data-key=\"{number}\">"
    );
    hidden(&mut s, "csrf", csrf);
    hidden(&mut s, "as", who);
    hidden(&mut s, "number", &number.to_string());
    hidden(&mut s, "req", &RequestId::random().to_hex());
    if p.slots.is_empty() {
        s.push_str("<p>No capabilities needed.</p>");
    }
    for (slot, description) in &p.slots {
        let _ = write!(
            s,
            "<label class=\"slot\"><span><code>{}</code> — {}</span><select name=\"slot.{}\" data-slot=\"{}\"><option value=\"\">choose a name…</option>",
            escape(slot),
            escape(description),
            escape(slot),
            escape(slot),
        );
        for e in names
            .iter()
            .filter(|e| e.kind != "special")
            .take(MAX_PICKER)
        {
            let _ = write!(
                s,
                "<option value=\"{}\">{} ({})</option>",
                escape(&e.name),
                escape(&e.name),
                escape(&e.kind)
            );
        }
        s.push_str("</select></label>");
    }
    s.push_str("<button type=\"submit\" class=\"endow-button\">Endow</button></form>");
    s.push_str("<form method=\"post\" action=\"/refuse\" class=\"act refuse\">");
    hidden(&mut s, "csrf", csrf);
    hidden(&mut s, "as", who);
    hidden(&mut s, "number", &number.to_string());
    hidden(&mut s, "req", &RequestId::random().to_hex());
    s.push_str("<input type=\"text\" name=\"reason\" placeholder=\"reason (optional)\" maxlength=\"4096\"><button type=\"submit\" class=\"refuse-button\">Refuse</button></form>");
    s
}

/// JavaScript source, escaped, with keywords, strings, numbers and
/// comments in spans.
pub fn highlight(src: &str) -> String {
    const KEYWORDS: &[&str] = &[
        "const",
        "let",
        "var",
        "function",
        "return",
        "if",
        "else",
        "for",
        "while",
        "do",
        "break",
        "continue",
        "new",
        "typeof",
        "instanceof",
        "in",
        "of",
        "true",
        "false",
        "null",
        "undefined",
        "this",
        "class",
        "extends",
        "try",
        "catch",
        "finally",
        "throw",
        "async",
        "await",
        "switch",
        "case",
        "default",
        "delete",
        "void",
        "yield",
    ];
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len() * 2);
    let mut i = 0;
    let span = |out: &mut String, class: &str, text: &str| {
        let _ = write!(out, "<span class=\"{class}\">{}</span>", escape(text));
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            span(&mut out, "cm", &chars[start..i].iter().collect::<String>());
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i = (i + 2).min(chars.len());
            span(&mut out, "cm", &chars[start..i].iter().collect::<String>());
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            span(&mut out, "st", &chars[start..i].iter().collect::<String>());
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            span(&mut out, "nu", &chars[start..i].iter().collect::<String>());
        } else if c.is_alphabetic() || c == '_' || c == '$' {
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect();
            if KEYWORDS.contains(&w.as_str()) {
                span(&mut out, "kw", &w);
            } else {
                out.push_str(&escape(&w));
            }
        } else {
            out.push_str(&escape(&c.to_string()));
            i += 1;
        }
    }
    out
}

/// A size in bytes, in KiB or MiB past 10 KiB.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a time in ms.
fn date(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let (h, m, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

async fn names_page(h: &AgentHandle, who: &str, path: &str) -> String {
    let mut s = String::new();
    // Breadcrumb.
    let _ = write!(
        s,
        "<p class=\"crumbs\"><a href=\"/names?{}\">names</a>",
        escape(&q(who))
    );
    let mut acc = String::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        if !acc.is_empty() {
            acc.push('.');
        }
        acc.push_str(part);
        let _ = write!(
            s,
            " . <a href=\"/names?{}&amp;path={}\">{}</a>",
            escape(&q(who)),
            escape(&percent_encode(&acc)),
            escape(part)
        );
    }
    s.push_str("</p>");
    match h.list(path).await {
        Ok(entries) => {
            s.push_str("<div class=\"scroll\"><table class=\"names\"><thead><tr><th>name</th><th>type</th><th>detail</th><th>id</th></tr></thead><tbody>");
            for e in entries {
                let full = if path.is_empty() {
                    e.name.clone()
                } else {
                    format!("{path}.{}", e.name)
                };
                let name = if e.kind == "directory" && !is_special(&e.name) {
                    format!(
                        "<a href=\"/names?{}&amp;path={}\">{}</a>",
                        escape(&q(who)),
                        escape(&percent_encode(&full)),
                        escape(&e.name)
                    )
                } else {
                    escape(&e.name)
                };
                let id = if e.kind == "special" {
                    String::new()
                } else {
                    e.id.short()
                };
                let _ = write!(
                    s,
                    "<tr><td>{name}</td><td><span class=\"type t-{}\">{}</span></td><td class=\"detail\">{}</td><td><code>{}</code></td></tr>",
                    escape(&e.kind),
                    escape(&e.kind),
                    escape(&redact_locators(&e.detail)),
                    escape(&id)
                );
            }
            s.push_str("</tbody></table></div>");
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">{}</p>", escape(&e.to_string()));
        }
    }
    s
}

async fn guests_page(h: &AgentHandle) -> String {
    match h.guests().await {
        Ok(gs) if gs.is_empty() => {
            "<p class=\"empty\">No guest with a component body.</p>".to_string()
        }
        Ok(gs) => {
            let mut s = String::from(
                "<div class=\"scroll\"><table class=\"guests\"><thead><tr><th>name</th><th>state</th><th>handled</th><th>failures</th><th>fuel (last)</th><th>memory (peak)</th><th>last error</th></tr></thead><tbody>",
            );
            for g in gs {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
                    escape(&g.name),
                    escape(&g.state),
                    g.handled,
                    g.failures,
                    g.fuel_last,
                    bytes(g.memory_peak),
                    escape(&g.last_error)
                );
            }
            s.push_str("</tbody></table></div>");
            s
        }
        Err(e) => format!("<p class=\"err\">{}</p>", escape(&e.to_string())),
    }
}

/// A JSON value as HTML: objects as definition lists, arrays of objects as tables.
fn json_html(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let mut s = String::from("<dl>");
            for (k, v) in o {
                let _ = write!(s, "<dt>{}</dt><dd>{}</dd>", escape(k), json_html(v));
            }
            s.push_str("</dl>");
            s
        }
        Value::Array(a) if a.iter().all(Value::is_object) && !a.is_empty() => {
            let mut keys: Vec<String> = a[0]
                .as_object()
                .map_or_else(Vec::new, |o| o.keys().cloned().collect());
            // The name first, then the rest in order.
            if let Some(i) = keys.iter().position(|k| k == "name") {
                let k = keys.remove(i);
                keys.insert(0, k);
            }
            let mut s = String::from("<div class=\"scroll\"><table><thead><tr>");
            for k in &keys {
                let _ = write!(s, "<th>{}</th>", escape(k));
            }
            s.push_str("</tr></thead><tbody>");
            for row in a {
                s.push_str("<tr>");
                for k in &keys {
                    let _ = write!(s, "<td>{}</td>", json_html(&row[k]));
                }
                s.push_str("</tr>");
            }
            s.push_str("</tbody></table></div>");
            s
        }
        Value::String(t) => escape(t),
        other => escape(&other.to_string()),
    }
}

async fn cluster_page(c: &Console, h: &AgentHandle) -> String {
    if c.runtime.membership().is_none() {
        return "<p class=\"empty\">This node is not in a cluster (it runs on an embedded store).</p>".to_string();
    }
    let (mut s, node) =
        match crate::cluster::command(&c.runtime, h, "status", "", &Default::default()).await {
            Ok(mut v) => {
                // Members (with their leases) as a table of their own.
                let members = v.as_object_mut().and_then(|o| o.remove("members"));
                let mut s = String::new();
                if let Some(m) = members {
                    s.push_str("<h2>Members and leases</h2>");
                    s.push_str(&json_html(&m));
                }
                (s, v)
            }
            Err(e) => return format!("<p class=\"err\">{}</p>", escape(&format!("{e:#}"))),
        };
    // Where the agents in your names live (at most MAX_PLACEMENTS of them).
    let agents: Vec<String> = h
        .list("")
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !is_special(&e.name) && (e.kind == "host" || e.kind == "guest"))
        .map(|e| e.name)
        .take(MAX_PLACEMENTS)
        .collect();
    let mut rows = Vec::new();
    for a in &agents {
        if let Ok(v) =
            crate::cluster::command(&c.runtime, h, "placement", a, &Default::default()).await
        {
            rows.push(v);
        }
    }
    s.push_str("<h2>Placements of your agents</h2>");
    if rows.is_empty() {
        s.push_str("<p class=\"empty\">No agent in your names.</p>");
    } else {
        s.push_str(&json_html(&Value::Array(rows)));
    }
    s.push_str("<h2>This node</h2>");
    s.push_str(&json_html(&node));
    s
}

async fn graph_page(c: &Console, h: &AgentHandle, who: &str) -> String {
    match crate::graph::gather(&c.runtime, h, "").await {
        Ok(g) => format!(
            "<p>{} formulas, {} names, {} locators out{}. <a href=\"/graph.svg?{}\">SVG</a></p><div class=\"graph\">{}</div>",
            g.nodes.len(),
            g.edges.len(),
            g.locators_out,
            if g.truncated { " (truncated)" } else { "" },
            escape(&q(who)),
            crate::graph::svg(&g)
        ),
        Err(e) => format!("<p class=\"err\">{}</p>", escape(&format!("{e:#}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlight_escapes_everything() {
        let h = highlight("const a = \"<b>\"; // </pre><script>\nx < 2");
        assert!(!h.contains("<b>"), "{h}");
        assert!(!h.contains("<script>"), "{h}");
        assert!(h.contains("<span class=\"kw\">const</span>"), "{h}");
        assert!(h.contains("&lt;/pre&gt;"), "{h}");
    }

    #[test]
    fn swiss_numbers_are_cut() {
        let t = redact_locators("see capstan://abc/SECRETSWISS?at=1.2.3.4:5 now");
        assert_eq!(t, "see capstan://abc/[secret hidden]?at=1.2.3.4:5 now");
        assert_eq!(date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(date(1_764_892_800_000), "2025-12-05 00:00:00 UTC");
    }

    #[test]
    fn proposals_parse() {
        let p = proposal(
            "definition: slots {reader: \"x\"}\n{\"source\":\"1+1\",\"slots\":{\"reader\":\"x\"}}",
        )
        .unwrap();
        assert_eq!(p.source, "1+1");
        assert_eq!(p.slots, vec![("reader".to_string(), "x".to_string())]);
        assert!(proposal("hello").is_none());
    }
}
