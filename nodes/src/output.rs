//! Rendering results for people and for `--json` (shapes: `nodes/CLI.md`).
//!
//! The client decodes every answer into the plain types here first, so that
//! rendering is pure and unit-tested.

use serde_json::{Value, json};

/// A directory entry as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub id: Vec<u8>,
    pub kind: String,
    pub detail: String,
}

/// A message as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub number: u64,
    pub message_id: Vec<u8>,
    pub reply_to: Option<Vec<u8>>,
    pub from: String,
    pub to: String,
    pub date_ms: u64,
    /// `package` or `request`.
    pub kind: String,
    pub strings: Vec<String>,
    pub names: Vec<String>,
    pub description: String,
    pub state: String,
}

impl Message {
    /// The strings joined with `@name` for each reference.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.strings.iter().enumerate() {
            out.push_str(s);
            if let Some(n) = self.names.get(i) {
                out.push('@');
                out.push_str(n);
            }
        }
        out
    }
}

/// The `--json` object of an entry.
pub fn entry_json(e: &Entry) -> Value {
    json!({"name": e.name, "id": hex::encode(&e.id), "type": e.kind, "detail": e.detail})
}

/// `list`, for people: aligned columns name, type, short id, detail.
pub fn entries_human(entries: &[Entry]) -> String {
    let w_name = entries.iter().map(|e| e.name.chars().count()).max();
    let w_kind = entries.iter().map(|e| e.kind.len()).max();
    let (Some(w_name), Some(w_kind)) = (w_name, w_kind) else {
        return String::new();
    };
    let mut out = String::new();
    for e in entries {
        let short = hex::encode(&e.id[..e.id.len().min(4)]);
        let line = format!(
            "{:w_name$}  {:w_kind$}  {short:8}  {}",
            e.name, e.kind, e.detail
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `show`, for people.
pub fn entry_human(e: &Entry) -> String {
    let mut out = format!(
        "name    {}\ntype    {}\nid      {}\n",
        e.name,
        e.kind,
        hex::encode(&e.id)
    );
    if !e.detail.is_empty() {
        out.push_str(&format!("detail  {}\n", e.detail));
    }
    out
}

/// The `--json` object of a message.
pub fn message_json(m: &Message) -> Value {
    json!({
        "number": m.number,
        "message_id": hex::encode(&m.message_id),
        "reply_to": m.reply_to.as_ref().map(hex::encode),
        "from": m.from,
        "to": m.to,
        "date_ms": m.date_ms,
        "type": m.kind,
        "strings": m.strings,
        "names": m.names,
        "text": m.text(),
        "description": m.description,
        "state": m.state,
    })
}

/// A JSON string literal: quotes and control characters escaped, other
/// characters (unicode included) as they are.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// One inbox line: `0. from HOST to SELF: "here is @greeting"` or
/// `1. from alice to SELF: request "need a doc" (pending)`.
pub fn message_human(m: &Message) -> String {
    let head = format!("{}. from {} to {}: ", m.number, m.from, m.to);
    if m.kind == "request" {
        format!("{head}request {} ({})", quoted(&m.description), m.state)
    } else {
        format!("{head}{}", quoted(&m.text()))
    }
}

/// `cat --json`.
pub fn cat_json(kind: &str, data: &[u8]) -> Value {
    match kind {
        "bytes" => json!({"kind": kind, "base64": data_encoding::BASE64.encode(data)}),
        _ => json!({"kind": kind, "text": String::from_utf8_lossy(data)}),
    }
}

/// Milliseconds, for people: `850ms`, `12.3s`, `4m05s`, `3h02m`, `2d04h`.
pub fn duration_human(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A size for people: `13 bytes`, `64 KiB`, `1.5 MiB`.
pub fn bytes_human(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    let (unit, size) = match n {
        0..KIB => return format!("{n} bytes"),
        KIB..MIB => ("KiB", KIB),
        _ => ("MiB", MIB),
    };
    if n.is_multiple_of(size) {
        format!("{} {unit}", n / size)
    } else {
        format!("{:.1} {unit}", n as f64 / size as f64)
    }
}

/// Prints a JSON value on one line.
pub fn print_json(v: &Value) {
    println!("{v}");
}

/// A command's JSON answer from the node (`text`), printed: as it is with
/// `--json`, else as `human` renders it. Returns the answer.
pub fn print_answer(
    text: &str,
    json: bool,
    human: impl FnOnce(&Value) -> String,
) -> anyhow::Result<Value> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("the node sent bad JSON: {e}"))?;
    if json {
        print_json(&v);
    } else {
        print!("{}", human(&v));
    }
    Ok(v)
}

/// The string field `k` of an answer (empty when absent).
pub fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// Runs `work`, and once it has taken more than a second shows `what (N s)…`
/// on stderr, updated twice a second, while it runs (only on a terminal:
/// scripts and logs get the result alone). The line is ended when `work`
/// finishes.
pub async fn with_progress<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    use std::io::Write as _;
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return work.await;
    }
    let started = std::time::Instant::now();
    let mut shown = false;
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                if started.elapsed() >= std::time::Duration::from_secs(1) {
                    shown = true;
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r{what} ({:.0} s)…", started.elapsed().as_secs_f64());
                    let _ = err.flush();
                }
            }
        }
    };
    if shown {
        eprintln!();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package() -> Message {
        Message {
            number: 0,
            message_id: vec![0xab; 16],
            reply_to: None,
            from: "HOST".into(),
            to: "SELF".into(),
            date_ms: 1_700_000_000_000,
            kind: "package".into(),
            strings: vec!["here is ".into(), "".into()],
            names: vec!["greeting".into()],
            description: String::new(),
            state: String::new(),
        }
    }

    fn request() -> Message {
        Message {
            number: 1,
            message_id: vec![1; 16],
            reply_to: Some(vec![2; 16]),
            from: "alice".into(),
            to: "SELF".into(),
            date_ms: 5,
            kind: "request".into(),
            strings: vec![],
            names: vec![],
            description: "need a doc".into(),
            state: "pending".into(),
        }
    }

    #[test]
    fn inbox_lines_match_the_contract() {
        assert_eq!(
            message_human(&package()),
            r#"0. from HOST to SELF: "here is @greeting""#
        );
        assert_eq!(
            message_human(&request()),
            r#"1. from alice to SELF: request "need a doc" (pending)"#
        );
        let mut m = package();
        m.strings = vec!["say \"hi\"\n→ ".into(), "!".into()];
        assert_eq!(
            message_human(&m),
            r#"0. from HOST to SELF: "say \"hi\"\n→ @greeting!""#
        );
    }

    #[test]
    fn message_json_shape() {
        let v = message_json(&package());
        assert_eq!(v["number"], 0);
        assert_eq!(v["message_id"], "ab".repeat(16));
        assert_eq!(v["reply_to"], Value::Null);
        assert_eq!(v["from"], "HOST");
        assert_eq!(v["to"], "SELF");
        assert_eq!(v["date_ms"], 1_700_000_000_000u64);
        assert_eq!(v["type"], "package");
        assert_eq!(v["strings"], json!(["here is ", ""]));
        assert_eq!(v["names"], json!(["greeting"]));
        assert_eq!(v["text"], "here is @greeting");
        let v = message_json(&request());
        assert_eq!(v["reply_to"], "02".repeat(16));
        assert_eq!(v["type"], "request");
        assert_eq!(v["description"], "need a doc");
        assert_eq!(v["state"], "pending");
        assert_eq!(v.as_object().unwrap().len(), 12);
    }

    #[test]
    fn entries() {
        let e = Entry {
            name: "greeting".into(),
            id: vec![0x12; 32],
            kind: "value".into(),
            detail: "text, 13 bytes".into(),
        };
        assert_eq!(
            entry_json(&e),
            json!({"name":"greeting","id":"12".repeat(32),"type":"value","detail":"text, 13 bytes"})
        );
        let h = Entry {
            name: "SELF".into(),
            id: vec![0x34; 32],
            kind: "host".into(),
            detail: String::new(),
        };
        assert_eq!(
            entries_human(&[e.clone(), h]),
            "greeting  value  12121212  text, 13 bytes\nSELF      host   34343434\n"
        );
        assert_eq!(entries_human(&[]), "");
        assert!(entry_human(&e).contains("detail  text, 13 bytes"));
    }

    #[test]
    fn cat_and_durations() {
        assert_eq!(cat_json("text", b"hi"), json!({"kind":"text","text":"hi"}));
        assert_eq!(
            cat_json("bytes", &[0, 255]),
            json!({"kind":"bytes","base64":"AP8="})
        );
        assert_eq!(bytes_human(13), "13 bytes");
        assert_eq!(bytes_human(64 * 1024), "64 KiB");
        assert_eq!(bytes_human(1536 * 1024), "1.5 MiB");
        assert_eq!(bytes_human(8 * 1024 * 1024), "8 MiB");
        assert_eq!(duration_human(850), "850ms");
        assert_eq!(duration_human(12_345), "12.3s");
        assert_eq!(duration_human(245_000), "4m05s");
        assert_eq!(duration_human(3 * 3_600_000 + 120_000), "3h02m");
    }
}
