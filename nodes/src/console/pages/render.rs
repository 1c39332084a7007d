//! Rendering helpers: code highlighting, JSON, sizes and dates as HTML,
//! and locators redacted from text shown on a page.

use super::*;

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

pub(super) fn message_text(m: &MessageView) -> String {
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
pub(super) fn bytes(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a time in ms.
pub(super) fn date(ms: u64) -> String {
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

/// A JSON value as HTML: objects as definition lists, arrays of objects as tables.
pub(super) fn json_html(v: &Value) -> String {
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
