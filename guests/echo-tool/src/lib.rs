//! echo-tool: a tool in IronClaw's contract. Answers its `text` parameter
//! back, with the length; logs through the host.
wit_bindgen::generate!({ path: "../../wit/tool", world: "sandboxed-tool" });

use capstan::tool::host::{self, LogLevel};
use exports::capstan::tool::tool::{Guest, Request, Response};

struct EchoTool;

fn text_param(params: &str) -> Option<String> {
    // Tiny JSON reader for {"text": "..."} (no serde in a 20 KB guest).
    let i = params.find("\"text\"")?;
    let rest = &params[i + 6..];
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
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Guest for EchoTool {
    fn execute(req: Request) -> Response {
        panic_log::install(|m| host::log(LogLevel::Error, m));
        host::log(LogLevel::Info, "echo-tool: execute");
        match text_param(&req.params) {
            Some(t) => Response {
                output: Some(format!(
                    "{{\"echo\":{},\"length\":{}}}",
                    json_string(&t),
                    t.chars().count()
                )),
                error: None,
            },
            None => Response {
                output: None,
                error: Some("expected parameters {\"text\": \"...\"}".into()),
            },
        }
    }

    fn schema() -> String {
        r#"{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}"#.into()
    }

    fn description() -> String {
        "Echoes its text parameter back with its length.".into()
    }
}

export!(EchoTool);
