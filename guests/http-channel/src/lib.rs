//! http-channel: a channel between an outside chat server reached over HTTP
//! and Capstan mail. Its config (the text value granted as `config`) is
//! `{"url": "http://host:port/"}`; it polls `GET {url}poll`, whose body has
//! one message per line, `SENDER<TAB>TEXT`, emitting each as mail to its
//! host, and delivers mail sent to it with `POST {url}send`, body
//! `RECIPIENT<TAB>TEXT`. Both go through the granted `http` capability.
wit_bindgen::generate!({ path: "../../wit/channel", world: "sandboxed-channel" });

use std::sync::Mutex;

use capstan::channel::host::{self, LogLevel};
use exports::capstan::channel::channel::{ChannelConfig, Guest};

/// The chat server's base URL (the instance lives across calls).
static BASE: Mutex<String> = Mutex::new(String::new());

struct HttpChannel;

fn str_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let i = json.find(&pat)?;
    let rest = &json[i + pat.len()..];
    let rest = &rest[rest.find(':')? + 1..];
    let rest = rest.trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

fn base() -> String {
    BASE.lock().map(|b| b.clone()).unwrap_or_default()
}

impl Guest for HttpChannel {
    fn on_start(config_json: String) -> Result<ChannelConfig, String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let mut url = str_field(&config_json, "url")
            .ok_or_else(|| format!("config needs {{\"url\": \"http://…/\"}}, got {config_json}"))?;
        if !url.ends_with('/') {
            url.push('/');
        }
        host::log(LogLevel::Info, &format!("http-channel: chat server at {url}"));
        *BASE.lock().map_err(|_| "poisoned".to_string())? = url;
        Ok(ChannelConfig {
            poll_interval_ms: Some(200),
        })
    }

    fn on_poll() {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let url = format!("{}poll", base());
        match host::http_request("GET", &url, "{}", None, Some(5000)) {
            Ok(r) if r.status == 200 => {
                for line in String::from_utf8_lossy(&r.body).lines() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let (sender, text) = line.split_once('\t').unwrap_or(("someone", line));
                    if let Err(e) = host::emit_message(sender, text) {
                        host::log(LogLevel::Warn, &format!("http-channel: emit: {e}"));
                    }
                }
            }
            Ok(r) => host::log(LogLevel::Warn, &format!("http-channel: poll: status {}", r.status)),
            Err(e) => host::log(LogLevel::Warn, &format!("http-channel: poll: {e}")),
        }
    }

    fn on_respond(recipient: String, text: String) -> Result<(), String> {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let url = format!("{}send", base());
        let body = format!("{recipient}\t{text}");
        let r = host::http_request("POST", &url, "{}", Some(body.as_bytes()), Some(5000))?;
        if r.status / 100 != 2 {
            return Err(format!("the chat server answered status {}", r.status));
        }
        Ok(())
    }

    fn on_shutdown() {
        host::log(LogLevel::Info, "http-channel: shutting down");
    }
}

export!(HttpChannel);
