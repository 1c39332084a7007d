//! matrix-channel: a channel between Matrix rooms and Capstan mail, speaking
//! the Matrix client-server API through the granted `http` capability (the
//! access token is that capability's credential header: this guest never
//! sees it).
//!
//! Config (the text value granted as `config`):
//!
//! ```json
//! {"homeserver": "https://matrix.example.org",
//!  "agent": "helper",            // optional: a name in the channel's names to mail; default its host
//!  "rooms": ["!abc:example.org"], // optional: only these rooms (default: every room it is in)
//!  "room": "!abc:example.org",    // optional: where mail that names no room goes
//!  "auto_join": true,             // optional: accept invitations (default true)
//!  "sync_timeout_ms": 1000}       // optional: the /sync long-poll (100 to 30000)
//! ```
//!
//! - Every poll long-polls `GET /_matrix/client/v3/sync` from the `since`
//!   token kept in the channel's durable state (`state-sync`), so a restart
//!   or a failover goes on where the last poll ended. Room messages from
//!   other users are emitted as mail (`SENDER: BODY`) keyed by their event
//!   id: a poll replayed after a crash emits nothing twice. The first start
//!   skips the rooms' backlog.
//! - Invitations are accepted (`POST /join/{room}`) when `auto_join`.
//! - Mail to the channel is posted with `PUT
//!   /rooms/{room}/send/m.room.message/{txnId}`, the txnId derived from the
//!   Capstan message id (a retried send posts once). The room: the one the
//!   mail replies to (a reply to a message this channel emitted), else a
//!   leading `@!room:server` in the mail (`@@!room:server` on the CLI), else
//!   `room` in the config, else the room last heard from. Text with Markdown
//!   formatting (`**bold**`, `*em*`, `` `code` ``, code blocks, links) also
//!   goes as `formatted_body` (org.matrix.custom.html).
wit_bindgen::generate!({ path: "../../wit/channel", world: "sandboxed-channel" });

use std::sync::Mutex;

use capstan::channel::host::{self, LogLevel};
use exports::capstan::channel::channel::{ChannelConfig, Guest};
use serde_json::{Value, json};

/// Threads remembered (mail id → room), oldest dropped first.
const MAX_THREADS: usize = 256;
/// Messages fetched per room per sync.
const TIMELINE_LIMIT: u32 = 100;
/// Longest message body taken from a room, bytes (mail is at most 64 KiB).
const MAX_BODY: usize = 32 * 1024;
/// Most messages emitted per poll (the host allows 256 per call); past it
/// the rest of the sync is skipped, with a warning, like a `limited` one.
const MAX_EMITS: usize = 200;
const STATE: &str = "sync";

#[derive(Default, Clone)]
struct Config {
    homeserver: String,
    agent: String,
    rooms: Vec<String>,
    room: String,
    auto_join: bool,
    sync_timeout_ms: u32,
    me: String,
}

/// What the channel keeps durable: the sync cursor and the threads.
#[derive(Default)]
struct Sync {
    since: Option<String>,
    /// (Capstan message id, room id), oldest first.
    threads: Vec<(String, String)>,
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

fn config() -> Result<Config, String> {
    CONFIG
        .lock()
        .map_err(|_| "poisoned".to_string())?
        .clone()
        .ok_or_else(|| "the channel is not started".to_string())
}

fn log(level: LogLevel, m: &str) {
    host::log(level, &format!("matrix-channel: {m}"));
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Room ids in a path: `!` and `:` as they are (Synapse takes them), the
/// rest encoded.
fn enc_room(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~!:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request to the homeserver; the JSON answer of a 2xx, else an error
/// with Matrix's errcode and error.
fn call(
    cfg: &Config,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout_ms: u32,
) -> Result<Value, String> {
    let url = format!("{}{path}", cfg.homeserver);
    let bytes = body.map(|b| b.to_string().into_bytes());
    let headers = if bytes.is_some() {
        r#"{"content-type": "application/json"}"#
    } else {
        "{}"
    };
    let r = host::http_request(method, &url, headers, bytes.as_deref(), Some(timeout_ms))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    if r.status / 100 != 2 {
        return Err(format!(
            "{method} {path}: the homeserver answered {} {} {}",
            r.status,
            v["errcode"].as_str().unwrap_or(""),
            v["error"].as_str().unwrap_or("")
        ));
    }
    Ok(v)
}

fn load() -> Result<Sync, String> {
    let Some(t) = host::state_get(STATE)? else {
        return Ok(Sync::default());
    };
    let v: Value =
        serde_json::from_str(&t).map_err(|e| format!("my sync state is damaged: {e}"))?;
    let threads = v["threads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Sync {
        since: v["since"].as_str().map(str::to_string),
        threads,
    })
}

fn save(s: &mut Sync) -> Result<(), String> {
    if s.threads.len() > MAX_THREADS {
        let cut = s.threads.len() - MAX_THREADS;
        s.threads.drain(..cut);
    }
    let threads: Vec<Value> = s.threads.iter().map(|(m, r)| json!([m, r])).collect();
    host::state_set(
        STATE,
        &json!({"since": s.since, "threads": threads}).to_string(),
    )
}

fn wanted(cfg: &Config, room: &str) -> bool {
    cfg.rooms.is_empty() || cfg.rooms.iter().any(|r| r == room)
}

/// One sync round: accept invitations, emit new room messages, advance the
/// durable cursor.
fn poll(cfg: &Config) -> Result<(), String> {
    let mut s = load()?;
    // The first sync only learns where the rooms are (no backlog).
    let limit = if s.since.is_some() { TIMELINE_LIMIT } else { 0 };
    let filter = json!({
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": limit, "types": ["m.room.message"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    });
    let mut path = format!(
        "/_matrix/client/v3/sync?filter={}&timeout={}",
        enc(&filter.to_string()),
        if s.since.is_some() {
            cfg.sync_timeout_ms
        } else {
            0
        }
    );
    if let Some(since) = &s.since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    let v = call(cfg, "GET", &path, None, cfg.sync_timeout_ms + 15_000)?;
    let Some(next) = v["next_batch"].as_str() else {
        return Err("the sync answer has no next_batch".into());
    };
    if cfg.auto_join
        && let Some(invites) = v["rooms"]["invite"].as_object()
    {
        for room in invites.keys() {
            if !wanted(cfg, room) {
                log(
                    LogLevel::Info,
                    &format!("not joining {room}: not in my rooms"),
                );
                continue;
            }
            match call(
                cfg,
                "POST",
                &format!("/_matrix/client/v3/join/{}", enc_room(room)),
                Some(&json!({})),
                15_000,
            ) {
                Ok(_) => log(LogLevel::Info, &format!("joined {room}")),
                Err(e) => log(LogLevel::Warn, &format!("joining {room}: {e}")),
            }
        }
    }
    let mut changed = s.since.as_deref() != Some(next);
    let (mut emitted, mut skipped) = (0, 0);
    if s.since.is_some()
        && let Some(joined) = v["rooms"]["join"].as_object()
    {
        for (room, r) in joined {
            if !wanted(cfg, room) {
                continue;
            }
            if r["timeline"]["limited"].as_bool() == Some(true) {
                log(
                    LogLevel::Warn,
                    &format!(
                        "{room}: more than {TIMELINE_LIMIT} messages since the last sync; older ones skipped"
                    ),
                );
            }
            for ev in r["timeline"]["events"].as_array().into_iter().flatten() {
                let (Some(id), Some(sender)) = (ev["event_id"].as_str(), ev["sender"].as_str())
                else {
                    continue;
                };
                if ev["type"] != "m.room.message" || sender == cfg.me {
                    continue;
                }
                let Some(body) = ev["content"]["body"].as_str() else {
                    continue; // redacted
                };
                if emitted >= MAX_EMITS {
                    skipped += 1;
                    continue;
                }
                let mut end = body.len().min(MAX_BODY);
                while !body.is_char_boundary(end) {
                    end -= 1;
                }
                let body = &body[..end];
                emitted += 1;
                let mail = host::emit(id, &cfg.agent, sender, body)?;
                s.threads.retain(|(m, _)| *m != mail);
                s.threads.push((mail, room.clone()));
                changed = true;
            }
        }
    }
    if skipped > 0 {
        log(
            LogLevel::Warn,
            &format!("{skipped} messages skipped: at most {MAX_EMITS} are mailed per sync"),
        );
    }
    if changed {
        s.since = Some(next.to_string());
        save(&mut s)?;
    }
    Ok(())
}

/// Markdown's common marks as Matrix HTML; None when the text has none.
fn formatted(text: &str) -> Option<String> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut html = String::new();
    let mut marked = false;
    let mut rest = text;
    // fenced code blocks first
    while let Some(i) = rest.find("```") {
        let after = &rest[i + 3..];
        let Some(j) = after.find("```") else { break };
        html.push_str(&inline(&esc(&rest[..i]), &mut marked));
        let code = after[..j]
            .split_once('\n')
            .map_or(&after[..j], |(lang, c)| {
                if lang.trim().chars().all(|c| c.is_ascii_alphanumeric()) {
                    c
                } else {
                    &after[..j]
                }
            });
        html.push_str(&format!(
            "<pre><code>{}</code></pre>",
            esc(code.trim_end_matches('\n'))
        ));
        marked = true;
        rest = after[j + 3..].trim_start_matches('\n');
    }
    html.push_str(&inline(&esc(rest), &mut marked));
    marked.then_some(html)
}

/// Inline marks of escaped text, and newlines as `<br>`.
fn inline(s: &str, marked: &mut bool) -> String {
    let mut out = String::new();
    for (n, line) in s.split('\n').enumerate() {
        if n > 0 {
            out.push_str("<br>");
        }
        let mut l = line.to_string();
        for (mark, tag) in [
            ("`", "code"),
            ("**", "strong"),
            ("__", "strong"),
            ("*", "em"),
            ("_", "em"),
        ] {
            l = pairs(&l, mark, tag, marked);
        }
        l = links(&l, marked);
        out.push_str(&l);
    }
    out
}

/// `MARK x MARK` → `<tag>x</tag>` (x not empty, not starting or ending with
/// a space); text inside `<code>` is left as it is.
fn pairs(s: &str, mark: &str, tag: &str, marked: &mut bool) -> String {
    let mut out = String::new();
    let mut rest = s;
    loop {
        if let Some(c) = rest.find("<code>")
            && rest.find(mark).is_none_or(|m| c < m)
        {
            let end = rest[c..].find("</code>").map_or(rest.len(), |e| c + e + 7);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        let Some(i) = rest.find(mark) else { break };
        let after = &rest[i + mark.len()..];
        let Some(j) = after.find(mark) else { break };
        let inner = &after[..j];
        let word_inside = mark.starts_with('_')
            && (rest[..i].chars().last().is_some_and(char::is_alphanumeric)
                || after[j + mark.len()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphanumeric));
        if inner.is_empty() || inner.starts_with(' ') || inner.ends_with(' ') || word_inside {
            out.push_str(&rest[..i + mark.len()]);
            rest = after;
            continue;
        }
        out.push_str(&rest[..i]);
        out.push_str(&format!("<{tag}>{inner}</{tag}>"));
        *marked = true;
        rest = &after[j + mark.len()..];
    }
    out.push_str(rest);
    out
}

/// `[text](http…)` → a link.
fn links(s: &str, marked: &mut bool) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        let after = &rest[i + 1..];
        let Some(j) = after.find("](") else { break };
        let Some(k) = after[j + 2..].find(')') else {
            break;
        };
        let (label, url) = (&after[..j], &after[j + 2..j + 2 + k]);
        if url.starts_with("http://") || url.starts_with("https://") {
            out.push_str(&rest[..i]);
            out.push_str(&format!("<a href=\"{url}\">{label}</a>"));
            *marked = true;
        } else {
            out.push_str(&rest[..i + 1 + j + 2 + k + 1]);
        }
        rest = &after[j + 2 + k + 1..];
    }
    out.push_str(rest);
    out
}

struct MatrixChannel;

impl Guest for MatrixChannel {
    fn on_start(config_json: String) -> Result<ChannelConfig, String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let v: Value = serde_json::from_str(&config_json)
            .map_err(|e| format!("config is not JSON ({e}): {config_json}"))?;
        let homeserver = v["homeserver"]
            .as_str()
            .ok_or_else(|| {
                format!("config needs {{\"homeserver\": \"https://…\"}}, got {config_json}")
            })?
            .trim_end_matches('/')
            .to_string();
        let strs = |k: &str| -> Vec<String> {
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        };
        let mut cfg = Config {
            homeserver,
            agent: v["agent"].as_str().unwrap_or("").to_string(),
            rooms: strs("rooms"),
            room: v["room"].as_str().unwrap_or("").to_string(),
            auto_join: v["auto_join"].as_bool().unwrap_or(true),
            sync_timeout_ms: v["sync_timeout_ms"]
                .as_u64()
                .unwrap_or(1000)
                .clamp(100, 30_000) as u32,
            me: String::new(),
        };
        let who = call(
            &cfg,
            "GET",
            "/_matrix/client/v3/account/whoami",
            None,
            15_000,
        )?;
        cfg.me = who["user_id"]
            .as_str()
            .ok_or("whoami answered no user_id")?
            .to_string();
        log(
            LogLevel::Info,
            &format!(
                "{} on {}, mailing {}",
                cfg.me,
                cfg.homeserver,
                if cfg.agent.is_empty() {
                    "HOST"
                } else {
                    &cfg.agent
                }
            ),
        );
        *CONFIG.lock().map_err(|_| "poisoned".to_string())? = Some(cfg);
        Ok(ChannelConfig {
            poll_interval_ms: Some(100),
        })
    }

    fn on_poll() {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        if let Err(e) = config().and_then(|c| poll(&c)) {
            log(LogLevel::Warn, &format!("sync: {e}"));
        }
    }

    fn on_respond(recipient: String, text: String) -> Result<(), String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let cfg = config()?;
        let ctx = host::respond_context().ok_or("no message is being handled")?;
        let s = load()?;
        let room = ctx
            .reply_to
            .as_ref()
            .and_then(|r| s.threads.iter().rev().find(|(m, _)| m == r))
            .map(|(_, room)| room.clone())
            .or_else(|| recipient.starts_with('!').then(|| recipient.clone()))
            .or_else(|| (!cfg.room.is_empty()).then(|| cfg.room.clone()))
            .or_else(|| s.threads.last().map(|(_, r)| r.clone()))
            .ok_or("no room to post to: the mail replies to no room message, names no room (@!room:server) and the config has no \"room\"")?;
        let text = if recipient.is_empty() || recipient.starts_with('!') {
            text
        } else {
            format!("{recipient}: {text}")
        };
        let mut body = json!({"msgtype": "m.text", "body": text});
        if let Some(html) = formatted(&text) {
            body["format"] = json!("org.matrix.custom.html");
            body["formatted_body"] = json!(html);
        }
        let txn = format!("capstan-{}", ctx.message_id);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            enc_room(&room),
            enc(&txn)
        );
        call(&cfg, "PUT", &path, Some(&body), 15_000).map(|_| ())
    }

    fn on_shutdown() {
        log(LogLevel::Info, "shutting down");
    }
}

export!(MatrixChannel);
