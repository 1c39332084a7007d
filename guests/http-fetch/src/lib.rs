//! http-fetch: a tool that fetches a URL through the `http` capability its
//! host granted (`capstan mkhttp`, `install … --grant http=NAME`).
//! Parameters: {"url": "...", "method": "GET"}; output: {"status": N,
//! "body": "..."}. The node adds credential headers; the tool never sees them.
wit_bindgen::generate!({ path: "../../wit/tool", world: "sandboxed-tool" });

use capstan::tool::host::{self, LogLevel};
use exports::capstan::tool::tool::{Guest, Request, Response};

struct HttpFetch;

/// Tiny JSON reader for a string field (no serde in a small guest).
fn str_param(params: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let i = params.find(&pat)?;
    let rest = &params[i + pat.len()..];
    let rest = &rest[rest.find(':')? + 1..];
    let rest = rest.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

fn json_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Guest for HttpFetch {
    fn execute(req: Request) -> Response {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        let Some(url) = str_param(&req.params, "url") else {
            return Response {
                output: None,
                error: Some("expected parameters {\"url\": \"...\", \"method\": \"GET\"}".into()),
            };
        };
        let method = str_param(&req.params, "method").unwrap_or_else(|| "GET".into());
        let body = str_param(&req.params, "body").map(String::into_bytes);
        host::log(LogLevel::Info, &format!("http-fetch: {method} {url}"));
        match host::http_request(&method, &url, "{}", body.as_deref(), None) {
            Ok(r) => Response {
                output: Some(format!(
                    "{{\"status\":{},\"body\":{}}}",
                    r.status,
                    json_string(&String::from_utf8_lossy(&r.body))
                )),
                error: None,
            },
            Err(e) => Response {
                output: None,
                error: Some(e),
            },
        }
    }

    fn schema() -> String {
        r#"{"type":"object","properties":{"url":{"type":"string"},"method":{"type":"string"},"body":{"type":"string"}},"required":["url"]}"#.into()
    }

    fn description() -> String {
        "Fetches a URL through the granted http capability.".into()
    }
}

export!(HttpFetch);
